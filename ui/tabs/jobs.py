"""Jobs tab: the queue with each job's progress, the events of one job, and cancel."""

from __future__ import annotations

import time

import gradio as gr

from ui.forms import handler

COLUMNS = ["id", "kind", "name", "status", "progress", "message"]


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


def job_log(services, job_id) -> str:
    """The events of one job as text lines."""
    if job_id in (None, ""):
        return ""
    job = services.jobs.get(int(job_id))
    lines = [
        f"job {job.id} ({job.kind} {job.name}): {job.status}" + (f": {job.message}" if job.message else "")
    ]
    for event in services.jobs.events(job.id):
        details = {k: v for k, v in event.items() if k not in ("seq", "event", "time")}
        stamp = time.strftime("%H:%M:%S", time.localtime(event["time"]))
        lines.append(f"{stamp} {event['event']}: " + ", ".join(f"{k}={v}" for k, v in details.items()))
    return "\n".join(lines[:1] + lines[1:][-200:])


def cancel(services, job_id) -> str:
    if job_id in (None, ""):
        return "choose a job id"
    job = services.jobs.request_cancel(int(job_id))
    return f"job {job.id}: {'cancelled' if job.status == 'cancelled' else 'stopping'}"


def build(services) -> None:
    with gr.Tab("Jobs"):
        table = gr.Dataframe(
            headers=COLUMNS, value=job_rows(services), interactive=False, label="Jobs (newest first)"
        )
        with gr.Row():
            job_id = gr.Number(label="Job id", precision=0)
            show = gr.Button("Show events")
            stop = gr.Button("Cancel job", variant="stop")
        status = gr.Markdown(elem_id="jobs-status")
        log = gr.Textbox(label="Events", lines=12, max_lines=30)
        timer = gr.Timer(2.0)

        timer.tick(handler(services, job_rows), None, table, api_name=False, show_progress="hidden")
        show.click(handler(services, job_log), job_id, log, api_name="job_log")
        stop.click(handler(services, cancel), job_id, status, api_name="cancel_job")
        gr.Button("Refresh", size="sm").click(handler(services, job_rows), None, table, api_name="jobs")
