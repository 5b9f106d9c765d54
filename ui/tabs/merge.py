"""Merge tab: combine workspace LoRAs (linear / concat / SVD / TIES / DARE / ZipLoRA / orthogonal) as a job."""

from __future__ import annotations

from pathlib import Path

import gradio as gr

from studio.app.form_configs import DEMO_MODELS, merge_methods
from ui.forms import Form, handler


def submit_merge(services, values: dict) -> str:
    """Queue a merge job from the form; returns a line naming the job."""
    job_id, cfg = services.submit_merge(values)
    return (
        f"queued job {job_id}: {cfg.method} merge of {len(cfg.sources)} LoRAs into loras/{Path(cfg.out).name}"
    )


def build(services) -> None:
    ws = services.workspace
    with gr.Tab("Merge"):
        with gr.Row():
            with gr.Column():
                form = Form(
                    sources=gr.Dropdown(
                        ws.lora_files(), multiselect=True, allow_custom_value=True, label="LoRAs to merge"
                    ),
                    weights=gr.Textbox(label="Weights", placeholder="1, 1 (one per LoRA; default 1)"),
                    method=gr.Dropdown(merge_methods(), value="concat", label="Method"),
                    name=gr.Textbox(label="Output name", value="merged"),
                    overwrite=gr.Checkbox(label="Replace an existing file of that name"),
                    rank=gr.Number(value=0, precision=0, label="Rank (svd/ties/dare; 0 = largest source rank)"),
                    density=gr.Slider(0.05, 1.0, value=0.5, step=0.05, label="Density (ties/dare/magnitude)"),
                    model=gr.Dropdown(list(DEMO_MODELS), value="demo:sd15", allow_custom_value=True,
                                      label="Base model (ZipLoRA)"),
                    prompts=gr.Textbox(label="ZipLoRA prompts, one per LoRA, separated by |",
                                       placeholder="a sks shape | a red circle, framed style"),
                )  # fmt: skip
                with gr.Row():
                    refresh = gr.Button("Refresh LoRA list", size="sm")
                    submit = gr.Button("Queue merge", variant="primary")
                status = gr.Markdown(elem_id="merge-status")

        submit.click(handler(services, submit_merge, form), form.inputs, status, api_name="merge")
        refresh.click(
            lambda: gr.Dropdown(choices=ws.lora_files()), None, form["sources"], api_name="merge_loras"
        )
