"""The worker side of the job queue: `python -m studio.app.worker --db FILE run ID` runs one job.

A worker records its own ending in the store (done, or failed with the reason), so a job whose studio has
stopped still ends properly; the studio that started it, or the next one, only watches the process.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
import traceback
from pathlib import Path
from typing import Any

from studio.app.jobs import JobStore
from studio.core.errors import StudioError


def run_job(store: JobStore, job_id: int) -> int:
    """Run one job in this process (the worker side); its ending is recorded in the store. Returns an exit code."""
    job = store.get(job_id)
    try:
        result = _JOB_KINDS[job.kind](job.config, lambda event: store.add_event(job_id, event))
    except StudioError as exc:
        store.add_event(job_id, {"event": "error", "message": str(exc)})
        store.finish(job_id, "failed", str(exc))
        return 1
    except Exception as exc:  # a bug or a library error: keep the traceback in the job's log
        traceback.print_exc()
        message = f"{type(exc).__name__}: {exc}"
        store.add_event(job_id, {"event": "error", "message": message})
        store.finish(job_id, "failed", message)
        return 1
    store.finish(job_id, "done", result.get("summary", ""), result)
    return 0


def _train(config: dict[str, Any], emit) -> dict[str, Any]:
    from studio.core.options import build_config
    from trainers.config import TrainConfig
    from trainers.loop import train

    result = train(build_config(TrainConfig, config), on_event=emit)
    return {
        "path": str(result.path),
        "files": [str(p) for p in result.files],
        "steps": result.step,
        "summary": f"saved {result.path.name} after {result.step} steps ({result.seconds:.0f} s)",
    }


def _merge(config: dict[str, Any], emit) -> dict[str, Any]:
    from merging import MergeConfig, run_merge
    from studio.core.options import build_config

    def progress(event: dict[str, Any]) -> None:
        if "stage" in event:
            emit({"event": "log", "time": time.time(), "message": event["stage"]})
        elif "step" in event:
            emit({"event": "step", "time": time.time(), **event})

    result = run_merge(build_config(MergeConfig, config), progress=progress)
    path = result.out or result.into_base
    return {"path": str(path), "files": [str(p) for p in (result.out, result.into_base) if p],
            "summary": f"wrote {Path(str(path)).name}", "report": json.loads(result.report.to_json())}  # fmt: skip


_JOB_KINDS = {"train": _train, "merge": _merge}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m studio.app.worker", description="Run one queued job.")
    parser.add_argument("--db", required=True, type=Path, help="the queue's SQLite file")
    sub = parser.add_subparsers(dest="cmd", required=True)
    sub.add_parser("run").add_argument("job_id", type=int)
    args = parser.parse_args(argv)
    return run_job(JobStore(args.db), args.job_id)


if __name__ == "__main__":
    sys.exit(main())
