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

from studio.app import datasets, form_configs, history
from studio.app.estimates import Estimate, training_estimate
from studio.app.job_view import JobView, job_view
from studio.app.jobs import JobStore
from studio.app.library import Library
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
    library: Library = field(init=False)

    def __post_init__(self) -> None:
        self.library = Library(self.workspace)

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

    def estimate_training(self, values: dict[str, Any]) -> Estimate | None:
        """How long the Train form's job would take here (None before the first finished job)."""
        numbers = form_configs.within_limits(values)
        config = {"max_steps": numbers.get("steps", 1), "batch_size": numbers.get("batch_size", 1),
                  "resolution": numbers.get("resolution", 512),
                  "model": form_configs.model_choice(self.workspace, values.get("model", ""))}  # fmt: skip
        return training_estimate(self.jobs, config)

    def job_view(self, job_id: int) -> JobView:
        return job_view(self.jobs, int(job_id))

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

    def compare(self, values: dict[str, Any], columns: str, seeds: str):
        """A comparison grid (A1111's X/Y plot): columns are LoRA weights ("0, 0.5, 1", every LoRA of the
        stack at that weight) or "each" (every LoRA of the stack alone); rows are seeds. Returns the path
        of the grid image written into outputs/grids/."""
        from studio.app.compare import compare_grid

        with self.generate_lock:
            return compare_grid(self, values, columns, seeds)

    def history(self, limit: int = 60):
        return history.history(self.workspace, limit)

    def reuse(self, name: str) -> dict[str, Any]:
        return history.reuse(self.workspace, name)

    # -------------------------------------------------------------------------------------- datasets
    def dataset_folder(self, name: str, must_exist: bool = True) -> Path:
        return self.workspace.dataset_folder(name, must_exist=must_exist)

    def add_images(self, name: str, files: list[str], caption: str):
        """Import files (images, and .txt captions paired by name) into datasets/<name>; returns the
        ImportReport (unreadable files named and skipped, images already there left out)."""
        return datasets.import_images(files, self.dataset_folder(name, must_exist=False), caption)

    def add_demo_set(self, name: str, which: str, count: int) -> int:
        """Write demo-world training images into datasets/<name>; returns how many."""
        return datasets.write_demo_set(self.dataset_folder(name, must_exist=False), which, int(count))

    def dataset_rows(self, name: str, resolution: int) -> list[list]:
        return datasets.dataset_rows(self.dataset_folder(name), int(resolution))

    def save_captions(self, name: str, captions: dict[str, str]) -> int:
        return datasets.save_captions(self.dataset_folder(name), captions)

    def replace_in_captions(self, name: str, find: str, replace: str) -> int:
        return datasets.replace_in_captions(self.dataset_folder(name), find, replace)

    def prepend_trigger(self, name: str, trigger: str) -> int:
        return datasets.prepend_trigger(self.dataset_folder(name), trigger)

    def delete_images(self, name: str, images: list[str]) -> list[str]:
        return datasets.delete_images(self.dataset_folder(name), images, self.library.trash)

    # ------------------------------------------------------------------------------- what changed
    def version(self) -> tuple:
        """Changes whenever a LoRA, a dataset or a job's state changes: the page refreshes its lists then."""
        ws = self.workspace
        loras = tuple((p, (ws.root / p).stat().st_mtime_ns) for p in ws.lora_files())
        jobs = tuple((j.id, j.status) for j in self.jobs.jobs(20))
        return loras, tuple(ws.dataset_names()), jobs

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
