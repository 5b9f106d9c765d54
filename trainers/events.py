"""Machine-readable training events: one JSON object per line in <output_dir>/events.jsonl.

The UI and the job queue read this file (or pass a callback) to follow a run. Every event has "event" and
"time"; the kinds are:

    start       {"max_steps", "method", "family", "modules", "trainable_params", "resumed_from_step",
                 "world_size", "effective_batch"}
    step        {"step", "loss", "lr", "images_per_s"}
    sample      {"step", "paths", "prompts"}
    checkpoint  {"step", "path"}
    done        {"step", "path", "files", "seconds", "steps_per_process"}
    error       {"step", "message", "last_checkpoint"}
    log         {"message"}

    >>> events = EventLog("out/events.jsonl")  # doctest: +SKIP
    >>> events.emit("step", step=1, loss=0.12, lr=1e-4)  # doctest: +SKIP
"""

from __future__ import annotations

import json
import math
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

EventCallback = Callable[[dict[str, Any]], None]


class EventLog:
    """Appends events to a JSON-lines file (flushed per line) and passes each to an optional callback
    and to `sinks` (e.g. a TensorBoardSink)."""

    def __init__(self, path: str | Path | None, callback: EventCallback | None = None, enabled: bool = True,
                 sinks: tuple[EventCallback, ...] = ()):  # fmt: skip
        self.path = Path(path) if path else None
        self.callback = callback
        self.sinks = sinks
        self.enabled = enabled
        self.write_error: str | None = None  # why the file stopped taking events (a full disk), if it did
        if self.path and enabled:
            self.path.parent.mkdir(parents=True, exist_ok=True)

    def emit(self, kind: str, **fields: Any) -> dict[str, Any]:
        """Append one event; a file that cannot be written (disk full) does not stop the callback, which
        still carries every event (the job queue keeps them in its database)."""
        event = {"event": kind, "time": round(time.time(), 3), **{k: _plain(v) for k, v in fields.items()}}
        if not self.enabled:
            return event
        if self.path and self.write_error is None:
            try:
                with open(self.path, "a", encoding="utf-8") as f:
                    f.write(json.dumps(event) + "\n")
            except OSError as exc:
                self.write_error = exc.strerror or str(exc)
                print(
                    f"warning: cannot write {self.path} ({self.write_error}); events go on elsewhere",
                    file=sys.stderr,
                )
        if self.callback:
            self.callback(event)
        for sink in self.sinks:
            sink(event)
        return event


class TensorBoardSink:
    """The run's events as TensorBoard logs (loss, learning rate, images/s; sample images), beside
    events.jsonl: what kohya's and OneTrainer's users open. Needs the tensorboard package."""

    def __init__(self, logdir: str | Path) -> None:
        from torch.utils.tensorboard import SummaryWriter

        self.writer = SummaryWriter(log_dir=str(logdir))

    def __call__(self, event: dict[str, Any]) -> None:
        kind, step = event["event"], event.get("step", 0)
        if kind == "step":
            for name in ("loss", "lr", "images_per_s"):
                if isinstance(event.get(name), (int, float)):
                    self.writer.add_scalar(f"train/{name}", event[name], step)
        elif kind == "sample":
            import numpy as np
            from PIL import Image

            for i, path in enumerate(event.get("paths", [])):
                with Image.open(path) as image:
                    self.writer.add_image(
                        f"samples/{i}", np.asarray(image.convert("RGB")), step, dataformats="HWC"
                    )
        if kind in ("step", "sample", "done", "error"):
            self.writer.flush()
        if kind in ("done", "error"):
            self.writer.close()


def _plain(value: Any) -> Any:
    """JSON-friendly value: paths as strings, non-finite floats as strings ("nan", "inf")."""
    if isinstance(value, Path):
        return str(value)
    if isinstance(value, float) and not math.isfinite(value):
        return str(value)
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    if isinstance(value, dict):
        return {str(k): _plain(v) for k, v in value.items()}
    return value


def read_events(path: str | Path) -> list[dict[str, Any]]:
    """All events of a run (a torn last line, from a crash mid-write, is skipped)."""
    out = []
    for line in Path(path).read_text(encoding="utf-8").splitlines():
        try:
            out.append(json.loads(line))
        except json.JSONDecodeError:
            continue
    return out
