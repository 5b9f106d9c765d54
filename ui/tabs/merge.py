"""Merge tab: combine workspace LoRAs (linear / concat / SVD / TIES / DARE / ZipLoRA / orthogonal) as a job."""

from __future__ import annotations

import typing

import gradio as gr

from studio.config import build_config, config_to_dict
from studio.errors import ConfigError
from ui.forms import Form, handler, model_choice, parse_weights
from ui.tabs.generate import MODELS


def merge_methods() -> list[str]:
    from merging.config import Method

    return list(typing.get_args(Method))


def submit_merge(services, values: dict) -> str:
    """Build and check a MergeConfig from the form, queue it; returns a line naming the job."""
    from merging import MergeConfig

    ws = services.workspace
    sources = values.get("sources") or []
    if len(sources) < 2:
        raise ConfigError("choose at least two LoRAs to merge")
    weights = parse_weights(values.get("weights", ""), len(sources))
    name = ws.check_name(values["name"], "output name")
    options = {
        "sources": [f"{ws.resolve(s)}:{w}" for s, w in zip(sources, weights)],
        "method": values["method"],
        "out": str(ws.loras / f"{name}.safetensors"),
        "overwrite": bool(values.get("overwrite")),
        "density": float(values["density"]),
        "prompts": [p.strip() for p in (values.get("prompts") or "").split("|") if p.strip()],
    }
    if int(values.get("rank") or 0) > 0:
        options["rank"] = int(values["rank"])
    if values["method"].startswith("ziplora"):
        options["model"] = model_choice(ws, values["model"])
    cfg = build_config(MergeConfig, options)
    cfg.check_complete()
    job_id = services.jobs.submit("merge", config_to_dict(cfg), name)
    return f"queued job {job_id}: {cfg.method} merge of {len(sources)} LoRAs into loras/{name}.safetensors"


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
                    model=gr.Dropdown(MODELS, value="demo:sd15", allow_custom_value=True,
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
