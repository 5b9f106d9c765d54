"""How long a training job will take, judged from the jobs this machine has already run.

A finished training job's events give its pace (pixels of training images per second, between its first
and last step) and its start-up time (queued -> first step). A new job is estimated from the newest
finished job on the same base model (any model when there is none): steps x batch x resolution^2 (with
extra training resolutions, the mean of their squares) at that pace, plus that start-up. None before the
machine has run a job: the page then says nothing.

    >>> estimate = training_estimate(store, {"max_steps": 300, "batch_size": 4, "resolution": 64, ...})  # doctest: +SKIP
    >>> round(estimate.seconds)  # doctest: +SKIP
    95
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from studio.app.jobs import Job, JobStore


@dataclass
class Estimate:
    seconds: float
    from_job: int


@dataclass
class Pace:
    pixels_per_s: float
    startup_s: float
    model: str
    job: int


def job_pace(store: JobStore, job: Job) -> Pace | None:
    steps = [e for e in store.events(job.id) if e["event"] == "step"]
    if len(steps) < 3 or not job.started:
        return None
    cfg = job.config
    span = steps[-1]["time"] - steps[0]["time"]
    done = steps[-1]["step"] - steps[0]["step"]
    if span <= 0 or done <= 0:
        return None
    pixels = done * int(cfg.get("batch_size", 1)) * image_pixels(cfg)
    startup = max(0.0, steps[0]["time"] - job.started)
    return Pace(pixels / span, startup, str(cfg.get("model", "")), job.id)


def training_estimate(store: JobStore, config: dict[str, Any], look_back: int = 50) -> Estimate | None:
    """Seconds `config` (a TrainConfig as a dict) will take here; see the module docstring."""
    paces = []
    for job in store.jobs(look_back):
        if job.kind == "train" and job.status == "done" and (pace := job_pace(store, job)) is not None:
            paces.append(pace)
    if not paces:
        return None
    same = [p for p in paces if p.model == str(config.get("model", ""))]
    pace = (same or paces)[0]  # the newest
    pixels = int(config["max_steps"]) * int(config.get("batch_size", 1)) * image_pixels(config)
    return Estimate(pace.startup_s + pixels / pace.pixels_per_s, pace.job)


def image_pixels(config: dict[str, Any]) -> float:
    """Pixels of an average training image: resolution^2, or its mean over the extra resolutions too."""
    sizes = list(
        dict.fromkeys([int(config.get("resolution", 512)), *map(int, config.get("extra_resolutions") or [])])
    )
    return sum(r * r for r in sizes) / len(sizes)
