"""The one place that builds the studio's services for the UI: workspace, job queue and runner, generation.

>>> services = build_services("studio-work")     # doctest: +SKIP
>>> services.jobs.submit("train", {...})          # doctest: +SKIP
>>> services.close()                              # doctest: +SKIP
"""

from __future__ import annotations

import threading
from dataclasses import dataclass, field
from pathlib import Path

from studio.jobs import JobRunner, JobStore
from studio.workspace import Workspace


@dataclass
class Services:
    """What the UI's handlers use. Generation runs in the UI process, one request at a time (`generate_lock`);
    training and merging run in worker processes through the job queue."""

    workspace: Workspace
    jobs: JobStore
    runner: JobRunner | None
    generate_lock: threading.Lock = field(default_factory=threading.Lock)
    _generation: object | None = None

    @property
    def generation(self):
        """The generation service, made on first use (it imports torch and diffusers)."""
        if self._generation is None:
            from studio.generate import GenerationService

            self._generation = GenerationService()
        return self._generation

    def close(self, wait_s: float = 120.0) -> None:
        """Stop the job runner and let a running generation finish (a process that exits while torch works
        in another thread can abort instead of exiting)."""
        if self.runner is not None:
            self.runner.stop()
        if self.generate_lock.acquire(timeout=wait_s):
            self.generate_lock.release()


def build_services(root: str | Path, run_jobs: bool = True) -> Services:
    """Services over the workspace at `root` (made if missing); `run_jobs` starts the job runner thread."""
    workspace = Workspace.create(root)
    store = JobStore(workspace.jobs_db)
    runner = JobRunner(store, logs=workspace.runs).start() if run_jobs else None
    return Services(workspace, store, runner)
