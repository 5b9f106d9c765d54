"""A persistent job queue: jobs and their events in one SQLite file, each job run in its own worker process.

The UI only submits jobs and reads their events; a `JobRunner` thread takes queued jobs one at a time (GPU
work is serialised) and runs each as `python -m studio.app.jobs --db FILE run ID`. A job that raises, runs out of
memory or crashes the interpreter ends as "failed" with its message; the UI keeps running. Cancelling stops
the worker process. Jobs that were running when the studio itself stopped are marked "interrupted" at the
next start (training ones can be resumed from their last checkpoint with resume = "latest").

    >>> store = JobStore("work/jobs.sqlite")                       # doctest: +SKIP
    >>> job_id = store.submit("train", {"method": "style", ...})    # doctest: +SKIP
    >>> runner = JobRunner(store, logs=Path("work/runs")); runner.start()   # doctest: +SKIP
    >>> store.get(job_id).status                                   # doctest: +SKIP
    'running'

Job kinds: "train" (a TrainConfig as a dict) and "merge" (a MergeConfig as a dict).
"""

from __future__ import annotations

import argparse
import json
import os
import sqlite3
import subprocess
import sys
import threading
import time
import traceback
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from studio.core.errors import ConfigError, StudioError

KINDS = ("train", "merge")
FINISHED = ("done", "failed", "cancelled", "interrupted")

_SCHEMA = """
CREATE TABLE IF NOT EXISTS jobs (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    kind TEXT NOT NULL,
    name TEXT NOT NULL,
    config TEXT NOT NULL,
    status TEXT NOT NULL DEFAULT 'queued',
    created REAL NOT NULL,
    started REAL,
    finished REAL,
    message TEXT NOT NULL DEFAULT '',
    result TEXT NOT NULL DEFAULT '{}',
    cancel INTEGER NOT NULL DEFAULT 0
);
CREATE TABLE IF NOT EXISTS events (
    seq INTEGER PRIMARY KEY AUTOINCREMENT,
    job_id INTEGER NOT NULL REFERENCES jobs(id),
    time REAL NOT NULL,
    kind TEXT NOT NULL,
    data TEXT NOT NULL
);
CREATE INDEX IF NOT EXISTS events_by_job ON events(job_id, seq);
"""


@dataclass(frozen=True)
class Job:
    """One row of the queue."""

    id: int
    kind: str
    name: str
    config: dict[str, Any]
    status: str  # queued, running, done, failed, cancelled, interrupted
    created: float
    started: float | None
    finished: float | None
    message: str
    result: dict[str, Any]
    cancel: bool

    @property
    def finished_or_stopped(self) -> bool:
        return self.status in FINISHED


class JobStore:
    """Jobs and events in a SQLite file; safe to use from several threads and processes at once."""

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        with self._connect() as db:
            db.executescript(_SCHEMA)

    @contextmanager
    def _connect(self) -> Iterator[sqlite3.Connection]:
        db = sqlite3.connect(self.path, timeout=30, isolation_level=None)
        try:
            db.execute("PRAGMA journal_mode=WAL")
            db.row_factory = sqlite3.Row
            yield db
        finally:
            db.close()

    # ---------------------------------------------------------------- jobs
    def submit(self, kind: str, config: dict[str, Any], name: str = "") -> int:
        """Queue a job; returns its id."""
        if kind not in KINDS:
            raise ConfigError(f"unknown job kind {kind!r}; choose one of {', '.join(KINDS)}")
        with self._connect() as db:
            cur = db.execute(
                "INSERT INTO jobs (kind, name, config, created) VALUES (?, ?, ?, ?)",
                (kind, name or kind, json.dumps(config, default=str), time.time()),
            )
            return int(cur.lastrowid)

    def get(self, job_id: int) -> Job:
        with self._connect() as db:
            row = db.execute("SELECT * FROM jobs WHERE id = ?", (job_id,)).fetchone()
        if row is None:
            raise ConfigError(f"no job {job_id}")
        return _job(row)

    def jobs(self, limit: int = 50) -> list[Job]:
        """The newest jobs first."""
        with self._connect() as db:
            rows = db.execute("SELECT * FROM jobs ORDER BY id DESC LIMIT ?", (limit,)).fetchall()
        return [_job(r) for r in rows]

    def claim_next(self) -> Job | None:
        """Mark the oldest queued job running and return it (None when the queue is empty)."""
        with self._connect() as db:
            db.execute("BEGIN IMMEDIATE")
            row = db.execute("SELECT * FROM jobs WHERE status = 'queued' ORDER BY id LIMIT 1").fetchone()
            if row is None:
                db.execute("COMMIT")
                return None
            db.execute(
                "UPDATE jobs SET status = 'running', started = ? WHERE id = ?", (time.time(), row["id"])
            )
            db.execute("COMMIT")
        return self.get(row["id"])

    def finish(self, job_id: int, status: str, message: str = "", result: dict | None = None) -> None:
        """Record how a job ended; a job already finished keeps its first ending."""
        if status not in FINISHED:
            raise ValueError(status)
        with self._connect() as db:
            db.execute(
                "UPDATE jobs SET status = ?, finished = ?, message = ?, result = ? "
                "WHERE id = ? AND status IN ('queued', 'running')",
                (status, time.time(), message, json.dumps(result or {}, default=str), job_id),
            )

    def request_cancel(self, job_id: int) -> Job:
        """Cancel a queued job at once; ask the runner to stop a running one."""
        with self._connect() as db:
            db.execute("UPDATE jobs SET cancel = 1 WHERE id = ?", (job_id,))
        job = self.get(job_id)
        if job.status == "queued":
            self.finish(job_id, "cancelled", "cancelled before it started")
        return self.get(job_id)

    def recover(self) -> list[int]:
        """Jobs left 'running' by a studio that stopped: mark them interrupted. Returns their ids."""
        with self._connect() as db:
            ids = [r["id"] for r in db.execute("SELECT id FROM jobs WHERE status = 'running'").fetchall()]
        for job_id in ids:
            self.finish(
                job_id,
                "interrupted",
                "the studio stopped while this job ran; training resumes from its last checkpoint "
                "when submitted again with resume = latest",
            )
        return ids

    # ---------------------------------------------------------------- events
    def add_event(self, job_id: int, event: dict[str, Any]) -> None:
        data = {k: v for k, v in event.items() if k not in ("event", "time")}
        with self._connect() as db:
            db.execute(
                "INSERT INTO events (job_id, time, kind, data) VALUES (?, ?, ?, ?)",
                (
                    job_id,
                    event.get("time", time.time()),
                    event.get("event", "log"),
                    json.dumps(data, default=str),
                ),
            )

    def events(self, job_id: int, after: int = 0) -> list[dict[str, Any]]:
        """A job's events after sequence number `after`, oldest first; each has "seq", "event", "time"."""
        with self._connect() as db:
            rows = db.execute(
                "SELECT * FROM events WHERE job_id = ? AND seq > ? ORDER BY seq", (job_id, after)
            ).fetchall()
        return [
            {"seq": r["seq"], "event": r["kind"], "time": r["time"], **json.loads(r["data"])} for r in rows
        ]

    def last_event(self, job_id: int, kind: str) -> dict[str, Any] | None:
        """A job's newest event of one kind (e.g. its last "step"), or None."""
        with self._connect() as db:
            row = db.execute(
                "SELECT * FROM events WHERE job_id = ? AND kind = ? ORDER BY seq DESC LIMIT 1", (job_id, kind)
            ).fetchone()
        return None if row is None else _event(row)


def _event(row: sqlite3.Row) -> dict[str, Any]:
    return {"seq": row["seq"], "event": row["kind"], "time": row["time"], **json.loads(row["data"])}


def _job(row: sqlite3.Row) -> Job:
    return Job(
        id=row["id"],
        kind=row["kind"],
        name=row["name"],
        config=json.loads(row["config"]),
        status=row["status"],
        created=row["created"],
        started=row["started"],
        finished=row["finished"],
        message=row["message"],
        result=json.loads(row["result"]),
        cancel=bool(row["cancel"]),
    )


# ------------------------------------------------------------------------------------------------ runner
class JobRunner:
    """Runs queued jobs one at a time, each in a fresh worker process, from a background thread."""

    def __init__(self, store: JobStore, logs: Path, poll_s: float = 0.5, env: dict[str, str] | None = None):
        self.store = store
        self.logs = Path(logs)
        self.poll_s = poll_s
        self.env = env
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._process: subprocess.Popen | None = None

    def start(self) -> JobRunner:
        self.store.recover()
        self._thread = threading.Thread(target=self._loop, name="lora-studio-jobs", daemon=True)
        self._thread.start()
        return self

    def stop(self, timeout: float = 10.0) -> None:
        """Stop taking jobs; a running job's worker is stopped and the job marked interrupted."""
        self._stop.set()
        if self._thread:
            self._thread.join(timeout)

    @property
    def worker_pid(self) -> int | None:
        """The process id of the running job's worker, if one is running."""
        process = self._process
        return process.pid if process is not None and process.poll() is None else None

    def log_path(self, job_id: int) -> Path:
        return self.logs / f"job-{job_id}.log"

    def _loop(self) -> None:
        while not self._stop.is_set():
            try:
                job = self.store.claim_next()
                if job is None:
                    self._stop.wait(self.poll_s)
                    continue
                self._run(job)
            except Exception:  # the runner outlives any one job's trouble, including a locked database
                traceback.print_exc()
                self._stop.wait(self.poll_s)

    def _run(self, job: Job) -> None:
        self.logs.mkdir(parents=True, exist_ok=True)
        command = [sys.executable, "-m", "studio.app.jobs", "--db", str(self.store.path), "run", str(job.id)]
        env = dict(os.environ if self.env is None else self.env)
        env.setdefault("HF_HUB_OFFLINE", "1")
        with open(self.log_path(job.id), "ab") as log:
            process = self._process = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, env=env)
            while process.poll() is None:
                if self._stop.is_set():
                    _terminate(process)
                    self.store.finish(job.id, "interrupted", "the studio stopped while this job ran")
                    return
                if self.store.get(job.id).cancel:
                    _terminate(process)
                    self.store.finish(job.id, "cancelled", "cancelled while running")
                    return
                time.sleep(self.poll_s)
        if process.returncode != 0:  # the worker died before it could record why (crash, out of memory, kill)
            tail = _tail(self.log_path(job.id))
            self.store.finish(
                job.id, "failed", f"the worker process exited with code {process.returncode}. {tail}".strip()
            )


def _terminate(process: subprocess.Popen, grace_s: float = 10.0) -> None:
    process.terminate()
    try:
        process.wait(grace_s)
    except subprocess.TimeoutExpired:
        process.kill()
        process.wait()


def _tail(path: Path, lines: int = 3) -> str:
    try:
        text = path.read_text(errors="replace").strip().splitlines()
    except OSError:
        return ""
    return " | ".join(text[-lines:])


# ------------------------------------------------------------------------------------------------ worker
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
            "summary": f"wrote {Path(str(path)).name}"}  # fmt: skip


_JOB_KINDS = {"train": _train, "merge": _merge}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m studio.app.jobs", description="Run one queued job (worker side)."
    )
    parser.add_argument("--db", required=True, type=Path, help="the queue's SQLite file")
    sub = parser.add_subparsers(dest="cmd", required=True)
    sub.add_parser("run").add_argument("job_id", type=int)
    args = parser.parse_args(argv)
    return run_job(JobStore(args.db), args.job_id)


if __name__ == "__main__":
    sys.exit(main())
