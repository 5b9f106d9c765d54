"""The one place that builds the studio's services for the page: workspace, job queue and runner, generation.

The page's handlers call these methods with the plain values of a form; everything else (configs, paths,
jobs, torch) stays on this side.

>>> services = build_services("studio-work")                            # doctest: +SKIP
>>> job_id, cfg = services.submit_training({"method": "style", ...})    # doctest: +SKIP
>>> services.close()                                                     # doctest: +SKIP
"""

from __future__ import annotations

import threading
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from studio.app import form_configs
from studio.app.datasets import import_images, write_demo_set
from studio.app.jobs import JobStore
from studio.app.runner import JobRunner
from studio.app.workspace import Workspace
from studio.core.options import config_to_dict


@dataclass
class Services:
    """What the page's handlers use. Generation runs in the page's process, one request at a time
    (`generate_lock`); training and merging run in worker processes through the job queue."""

    workspace: Workspace
    jobs: JobStore
    runner: JobRunner | None
    allow_pickle: bool = False  # the page may load pickle files only when the studio was started so
    generate_lock: threading.Lock = field(default_factory=threading.Lock)
    _generation: object | None = None

    @property
    def generation(self):
        """The generation service, made on first use (it imports torch and diffusers)."""
        if self._generation is None:
            from studio.generation import GenerationService

            self._generation = GenerationService()
        return self._generation

    # ------------------------------------------------------------------------------------------ jobs
    def submit_training(self, values: dict[str, Any]):
        """Check a Train form and queue it; returns (job id, the TrainConfig)."""
        cfg = form_configs.train_config(self.workspace, values, self.allow_pickle)
        return self.jobs.submit("train", config_to_dict(cfg), cfg.output_name), cfg

    def submit_merge(self, values: dict[str, Any]):
        """Check a Merge form and queue it; returns (job id, the MergeConfig)."""
        cfg = form_configs.merge_config(self.workspace, values, self.allow_pickle)
        return self.jobs.submit("merge", config_to_dict(cfg), Path(cfg.out).stem), cfg

    # ------------------------------------------------------------------------------------ generation
    def generate(self, values: dict[str, Any]):
        """Make the images a Generate form asks for (saved in outputs/); returns the GeneratedImages."""
        cfg = form_configs.generate_config(self.workspace, values, self.allow_pickle)
        with self.generate_lock:  # one generation at a time: they share the loaded model (and the GPU)
            return self.generation.generate(cfg)

    # -------------------------------------------------------------------------------------- datasets
    def add_images(self, name: str, files: list[str], caption: str):
        """Import files into datasets/<name>; returns the ImportReport (unreadable files named, skipped)."""
        folder = self.workspace.datasets / self.workspace.check_name(name, "dataset name")
        return import_images(files, folder, caption)

    def add_demo_set(self, name: str, which: str, count: int) -> int:
        """Write demo-world training images into datasets/<name>; returns how many."""
        folder = self.workspace.datasets / self.workspace.check_name(name, "dataset name")
        return write_demo_set(folder, which, int(count))

    def close(self, wait_s: float = 120.0) -> None:
        """Stop the job runner and let a running generation finish (a process that exits while torch works
        in another thread can abort instead of exiting)."""
        if self.runner is not None:
            self.runner.stop()
        if self.generate_lock.acquire(timeout=wait_s):
            self.generate_lock.release()


def build_services(root: str | Path, run_jobs: bool = True, allow_pickle: bool = False) -> Services:
    """Services over the workspace at `root` (made if missing); `run_jobs` starts the job runner thread."""
    workspace = Workspace.create(root)
    store = JobStore(workspace.jobs_db)
    runner = JobRunner(store, logs=workspace.runs).start() if run_jobs else None
    return Services(workspace, store, runner, allow_pickle=allow_pickle)
