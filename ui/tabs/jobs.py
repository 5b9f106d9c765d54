"""Jobs tab: the queue, and the live view of the job clicked: progress bar with step / total, it/s and ETA,
the loss curve (raw and smoothed), sample images newest first, the event log, and a merge's report.

It follows the job by itself (a timer), so a page opened on a running job, or after a restart, shows it as
it goes.
"""

from __future__ import annotations

import html

import gradio as gr
import pandas as pd

from studio.app.job_view import report_rows, report_summary
from ui.forms import handler

COLUMNS = ["id", "kind", "name", "status", "progress", "message"]
REPORT_COLUMNS = ["source", "weight", "modules", "preservation error", "worst module error", "interference"]


def job_rows(services, limit: int = 30) -> list[list]:
    """One row per job, newest first: progress is the last step seen (e.g. "120/300, loss 0.081")."""
    rows = []
    for job in services.jobs.jobs(limit):
        rows.append([job.id, job.kind, job.name, job.status, _progress(services, job), job.message[:200]])
    return rows


def _progress(services, job) -> str:
    if job.status == "queued":
        return ""
    total = job.config.get("max_steps") or job.config.get("steps")
    last = services.jobs.last_event(job.id, "step")
    if last is None:
        return "starting" if job.status == "running" else ""
    text = f"{last['step']}/{total}" if total else str(last["step"])
    if isinstance(last.get("loss"), (int, float)):
        text += f", loss {last['loss']:.4g}"
    return text


def progress_bar(fraction: float, line: str, status: str) -> str:
    colour = {"failed": "#dc2626", "cancelled": "#6b7280", "interrupted": "#6b7280"}.get(status, "#f97316")
    return (
        '<div id="job-progress">'
        '<div style="background:#e5e7eb;border-radius:6px;height:16px;overflow:hidden">'
        f'<div style="width:{100 * fraction:.1f}%;background:{colour};height:100%"></div></div>'
        f'<div style="margin-top:4px">{html.escape(line)}</div></div>'
    )


def open_job(services, job_id):
    """Everything the view shows of one job: title, progress, loss curve, its caption, samples, log, report."""
    if job_id in (None, "", 0):
        return (
            "Click a job in the list to follow it.",
            progress_bar(0, "", ""),
            None,
            "",
            [],
            "",
            gr.update(visible=False),
            "",
        )
    view = services.job_view(int(job_id))
    job = view.job
    title = f"### job {job.id} · {job.kind} · {job.name}"
    loss = pd.DataFrame(
        [{"step": p["step"], "loss": p["loss"], "series": "raw"} for p in view.loss]
        + [{"step": p["step"], "loss": p["smoothed"], "series": "smoothed"} for p in view.loss]
    )
    points = f"loss over {len(view.loss)} steps (raw and smoothed)" if view.loss else "no loss yet"
    samples = [(s.path, f"step {s.step} · {s.prompt}") for s in view.samples]
    report = gr.update(visible=False)
    summary = ""
    if view.report:
        report = gr.update(value=report_rows(view.report), visible=True)
        summary = report_summary(view.report)
    plot = loss if view.loss else None
    return (title, progress_bar(view.fraction, view.progress_line(), job.status), plot, points, samples,
            "\n".join(reversed(view.log)), report, summary)  # fmt: skip


def cancel(services, job_id) -> str:
    if job_id in (None, "", 0):
        return "click a job first"
    job = services.jobs.request_cancel(int(job_id))
    return f"job {job.id}: {'cancelled' if job.status == 'cancelled' else 'stopping'}"


def build(services) -> gr.State:
    """The tab; returns the State holding the job on show (other tabs open a job they queued)."""
    with gr.Tab("Jobs", id="jobs"):
        selected = gr.State(0)
        with gr.Row():
            with gr.Column(scale=2):
                table = gr.Dataframe(headers=COLUMNS, value=job_rows(services), interactive=False,
                                     label="Jobs, newest first (click one to follow it)", elem_id="jobs-table")  # fmt: skip
                job_id = gr.Number(label="Job id", precision=0, value=0, elem_id="job-id")
                stop = gr.Button("Cancel this job", variant="stop")
                status = gr.Markdown(elem_id="jobs-status")
            with gr.Column(scale=3):
                title = gr.Markdown("Click a job in the list to follow it.", elem_id="job-title")
                bar = gr.HTML(progress_bar(0, "", ""))
                plot = gr.LinePlot(
                    x="step", y="loss", color="series", label="Loss", height=260, elem_id="job-loss"
                )
                points = gr.Markdown(elem_id="job-loss-points")
                samples = gr.Gallery(
                    label="Samples, newest first",
                    columns=4,
                    height=260,
                    elem_id="job-samples",
                    fit_columns=False,
                )
                summary = gr.Markdown(elem_id="job-report-summary")
                report = gr.Dataframe(
                    headers=REPORT_COLUMNS, visible=False, interactive=False, label="Merge report"
                )
                log = gr.Textbox(label="Events, newest first", lines=10, max_lines=20, elem_id="job-log")
        view = [title, bar, plot, points, samples, log, report, summary]
        show = handler(services, open_job, inputs={"job_id": 0})
        follow = handler(services, open_job, inputs={"job_id": 0}, polling=True)

        def on_select(event: gr.SelectData):
            row = event.row_value or []
            return int(row[0]) if row else 0

        table.select(on_select, None, job_id, api_name=False)
        job_id.change(lambda j: int(j or 0), job_id, selected, api_name=False).then(
            show, job_id, view, api_name="job_view", show_progress="hidden"
        )
        timer = gr.Timer(1.5)
        timer.tick(
            handler(services, job_rows, polling=True), None, table, api_name=False, show_progress="hidden"
        )
        timer.tick(follow, selected, view, api_name=False, show_progress="hidden")
        stop.click(handler(services, cancel, inputs={"job_id": 0}), job_id, status, api_name="cancel_job")
        gr.Button("Refresh", size="sm").click(handler(services, job_rows), None, table, api_name="jobs")
    return job_id
