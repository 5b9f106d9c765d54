"""What the page shows of one job while it runs and after: progress, speed, ETA, the loss curve, samples,
the events, and a merge's report. Read from the job queue's events (studio.app.jobs), so a restarted
studio shows a job exactly as before.

    >>> view = job_view(store, 3)                         # doctest: +SKIP
    >>> view.step, view.total, round(view.eta_s)          # doctest: +SKIP
    (120, 300, 95)
    >>> view.loss[-1]                                     # doctest: +SKIP
    {'step': 120, 'loss': 0.081, 'smoothed': 0.093}
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from studio.app.jobs import Job, JobStore

SMOOTHING = 0.9  # TensorBoard's default: smoothed = 0.9 * previous + 0.1 * value (debiased)


@dataclass
class Sample:
    path: str
    step: int
    prompt: str


@dataclass
class JobView:
    """One job as the page shows it (see the module docstring)."""

    job: Job
    step: int = 0
    total: int | None = None
    it_per_s: float | None = None  # optimizer steps per second, over the last few steps
    eta_s: float | None = None
    loss: list[dict[str, float]] = field(default_factory=list)  # step, loss, smoothed
    samples: list[Sample] = field(default_factory=list)  # newest first
    log: list[str] = field(default_factory=list)
    report: dict[str, Any] | None = None  # a merge's report (studio_merge_report)

    @property
    def fraction(self) -> float:
        return min(1.0, self.step / self.total) if self.total else (1.0 if self.job.status == "done" else 0.0)

    def progress_line(self) -> str:
        """e.g. "running · step 120 / 300 · 2.31 it/s · about 1 min 18 s left"."""
        parts = [self.job.status]
        if self.total:
            parts.append(f"step {self.step} / {self.total}")
        elif self.step:
            parts.append(f"step {self.step}")
        if self.it_per_s:
            parts.append(f"{self.it_per_s:.3g} it/s")
        if self.eta_s is not None and self.job.status == "running":
            parts.append(f"about {duration(self.eta_s)} left")
        elif self.job.finished and self.job.started:
            parts.append(f"took {duration(self.job.finished - self.job.started)}")
        if self.job.message:
            parts.append(self.job.message[:300])
        return " · ".join(parts)


def job_view(store: JobStore, job_id: int, log_lines: int = 200) -> JobView:
    """Everything the page shows of one job (see the module docstring)."""
    job = store.get(job_id)
    merge_steps = job.config.get("steps") if job.config.get("method") == "ziplora" else None  # others: none
    view = JobView(job, total=job.config.get("max_steps") or merge_steps)
    steps: list[tuple[float, int]] = []
    smoothed, weight = 0.0, 0.0
    for event in store.events(job_id):
        kind = event["event"]
        if kind == "step":
            view.step = int(event.get("step", view.step))
            steps.append((event["time"], view.step))
            if isinstance(event.get("loss"), (int, float)):
                smoothed = SMOOTHING * smoothed + (1 - SMOOTHING) * event["loss"]
                weight = SMOOTHING * weight + (1 - SMOOTHING)
                view.loss.append({"step": view.step, "loss": event["loss"], "smoothed": smoothed / weight})
        elif kind == "sample":
            prompts = event.get("prompts") or []
            for i, path in enumerate(event.get("paths", [])):
                prompt = prompts[i] if i < len(prompts) else ""
                view.samples.insert(0, Sample(str(path), int(event.get("step", 0)), prompt))
        elif kind == "start" and event.get("max_steps"):
            view.total = int(event["max_steps"])
        view.log.append(log_line(event))
    view.log = view.log[-log_lines:]
    view.it_per_s, view.eta_s = speed(steps, view.total)
    if job.kind == "merge":
        view.report = job.result.get("report")
    return view


def speed(
    steps: list[tuple[float, int]], total: int | None, window: int = 20
) -> tuple[float | None, float | None]:
    """(steps per second over the last `window` steps, seconds left), from (time, step) pairs."""
    recent = steps[-window:]
    if len(recent) < 2 or recent[-1][0] <= recent[0][0]:
        return None, None
    rate = (recent[-1][1] - recent[0][1]) / (recent[-1][0] - recent[0][0])
    if rate <= 0:
        return None, None
    left = (total - recent[-1][1]) / rate if total else None
    return rate, left


def log_line(event: dict[str, Any]) -> str:
    stamp = time.strftime("%H:%M:%S", time.localtime(event.get("time", 0)))
    details = {k: v for k, v in event.items() if k not in ("seq", "event", "time")}
    text = ", ".join(f"{k}={_short(v)}" for k, v in details.items())
    return f"{stamp} {event.get('event', '?')}: {text}"


def _short(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:.4g}"
    if isinstance(value, list) and value and all(isinstance(v, str) for v in value):
        return ", ".join(Path(v).name for v in value[:4]) + (" ..." if len(value) > 4 else "")
    return str(value)[:200]


def duration(seconds: float) -> str:
    """'45 s', '3 min 05 s', '1 h 02 min'."""
    seconds = max(0, round(seconds))
    if seconds < 60:
        return f"{seconds} s"
    if seconds < 3600:
        return f"{seconds // 60} min {seconds % 60:02d} s"
    return f"{seconds // 3600} h {seconds % 3600 // 60:02d} min"


def report_rows(report: dict[str, Any]) -> list[list]:
    """A merge report as table rows: source, weight, modules, preservation error, worst, interference."""
    rows = []
    for s in report.get("sources", []):
        interference = ", ".join(f"{k} {v:.3g}" for k, v in (s.get("interference") or {}).items()) or "-"
        rows.append([s["label"], s["weight"], s["modules"], s["preservation"], s["worst"], interference])
    return rows


def report_summary(report: dict[str, Any]) -> str:
    """One line on the merged file, then one "- warning: ..." line per warning of the merge."""
    ranks = report.get("ranks") or []
    rank = f"{ranks[0]}-{ranks[-1]}" if len(ranks) > 1 else (str(ranks[0]) if ranks else "?")
    size = report.get("file_bytes") or report.get("tensor_bytes")
    text = f"{report.get('method')}: {report.get('modules')} modules, rank {rank}, {report.get('parameters', 0):,} parameters"
    if size:
        text += f", {size / 2**20:.1f} MB"
    text += f"; difference from the exact weighted sum {report.get('exactness', 0):.3g}"
    warnings = [f"- warning: {w}" for w in report.get("warnings") or []]
    return "\n".join([text, "", *warnings]) if warnings else text
