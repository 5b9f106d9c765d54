"""A persistent job queue: jobs and their events in one SQLite file, each job run in its own worker process.

The page only submits jobs and reads their events; a JobRunner (studio.app.runner) takes queued jobs one at a
time and runs each in a worker process (studio.app.worker), whose pid and start time are kept here so that a
restarted studio finds a worker that is still alive and follows it.

    >>> store = JobStore("work/jobs.sqlite")                       # doctest: +SKIP
    >>> job_id = store.submit("train", {"method": "style", ...})    # doctest: +SKIP
    >>> store.get(job_id).status                                   # doctest: +SKIP
    'queued'

Job kinds: "train" (a TrainConfig as a dict) and "merge" (a MergeConfig as a dict).
"""

from __future__ import annotations

import json
import sqlite3
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from studio.core.errors import ConfigError

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
    cancel INTEGER NOT NULL DEFAULT 0,
    pid INTEGER,
    pid_started REAL
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
    pid: int | None = None  # the worker process running the job, and when that process started
    pid_started: float | None = None

    @property
    def finished_or_stopped(self) -> bool:
        return self.status in FINISHED


class JobStore:
    """Jobs and events in a SQLite file; safe to use from several threads and processes at once."""

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._uri = self.path.resolve().as_uri()
        with self._connect(create=True) as db:
            db.executescript(_SCHEMA)
            columns = {row["name"] for row in db.execute("PRAGMA table_info(jobs)")}
            for column, kind in (
                ("pid", "INTEGER"),
                ("pid_started", "REAL"),
            ):  # queues made by older versions
                if column not in columns:
                    db.execute(f"ALTER TABLE jobs ADD COLUMN {column} {kind}")

    @contextmanager
    def _connect(self, create: bool = False) -> Iterator[sqlite3.Connection]:
        """A connection; only the constructor may make the file, so a queue deleted under a running studio
        is reported, never silently replaced by an empty one."""
        try:
            db = sqlite3.connect(
                f"{self._uri}?mode={'rwc' if create else 'rw'}", uri=True, timeout=30, isolation_level=None
            )
        except sqlite3.OperationalError as exc:
            if create or self.path.is_file():
                raise
            raise ConfigError(
                f"the job queue {self.path} is gone (deleted or moved while the studio ran): put it back, or "
                "restart the studio to make a new one"
            ) from exc
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
        """Mark the oldest queued job running and return it; None when the queue is empty or a job is still
        running (one job at a time, whichever studio process started it)."""
        with self._connect() as db:
            db.execute("BEGIN IMMEDIATE")
            busy = db.execute("SELECT 1 FROM jobs WHERE status = 'running' LIMIT 1").fetchone()
            row = (
                None
                if busy
                else db.execute("SELECT * FROM jobs WHERE status = 'queued' ORDER BY id LIMIT 1").fetchone()
            )
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

    def set_worker(self, job_id: int, pid: int, started: float) -> None:
        """Record the process running a job (so a restarted studio can find it)."""
        with self._connect() as db:
            db.execute("UPDATE jobs SET pid = ?, pid_started = ? WHERE id = ?", (pid, started, job_id))

    def running(self) -> list[Job]:
        """Jobs marked running, oldest first."""
        with self._connect() as db:
            rows = db.execute("SELECT * FROM jobs WHERE status = 'running' ORDER BY id").fetchall()
        return [_job(r) for r in rows]

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
        pid=row["pid"],
        pid_started=row["pid_started"],
    )
