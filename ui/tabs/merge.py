"""Merge tab: combine workspace LoRAs (linear / concat / SVD / TIES / DARE / ZipLoRA / fusion / orthogonal)
as a job; its report (each source's preservation and interference, rank, size) shows in the job's view.
A preset (presets/merge_*.toml) fills the method, density and rank; the form's fields override it."""

from __future__ import annotations

from pathlib import Path

import gradio as gr

from studio.app.form_configs import DEMO_MODELS, merge_methods
from studio.core.options import load_preset, preset_names
from ui.forms import Form, handler


def submit_merge(services, values: dict):
    """Queue a merge job from the form; returns (a line naming the job, its id for the Jobs view)."""
    job_id, cfg = services.submit_merge(values)
    line = (
        f"queued job {job_id}: {cfg.method} merge of {len(cfg.sources)} LoRAs into loras/{Path(cfg.out).name}"
    )
    return line, job_id


# the /merge endpoint's parameters, in this order (scripts that call it by position keep working)
FIELDS = ("sources", "weights", "method", "name", "overwrite", "rank", "density", "model", "prompts", "references",
          "more", "preset")  # fmt: skip


def preset_fields(name: str | None):
    """A merge preset picked: its method, density and rank shown in the form's fields (the fields win over
    the preset when the merge is queued, as in the Train tab); the others apply underneath."""
    if not name:
        return gr.update(), gr.update(), gr.update()
    values = load_preset(name, "merge")
    return tuple(values.get(key, gr.update()) for key in ("method", "density", "rank"))


def build(services, tabs: gr.Tabs, jobs_view: gr.Number) -> dict[str, gr.Dropdown]:
    """The tab; returns its LoRA list (refreshed by the page)."""
    ws = services.workspace
    with gr.Tab("Merge", id="merge"):
        with gr.Row():
            with gr.Column():
                fields = dict(
                    sources=gr.Dropdown(ws.lora_files(), value=[], multiselect=True, allow_custom_value=True,
                                        label="LoRAs to merge"),
                    weights=gr.Textbox(label="Weights", placeholder="1, 1 (one per LoRA; default 1)"),
                )  # fmt: skip
                with gr.Row():
                    fields["method"] = gr.Dropdown(merge_methods(), value="concat", label="Method")
                    fields["preset"] = gr.Dropdown(["", *preset_names("merge")], value="",
                                                   label="Preset (optional)")  # fmt: skip
                fields |= dict(
                    name=gr.Textbox(label="Output name", value="merged"),
                    overwrite=gr.Checkbox(label="Replace an existing file of that name"),
                    rank=gr.Number(value=0, precision=0, label="Rank (svd/ties/dare; 0 = largest source rank)"),
                    density=gr.Slider(0.05, 1.0, value=0.5, step=0.05, label="Density (ties/dare/magnitude)"),
                    model=gr.Dropdown(list(DEMO_MODELS), value="demo:sd15", allow_custom_value=True,
                                      label="Base model (ZipLoRA, fusion, and DoRA sources)"),
                    prompts=gr.Textbox(label="ZipLoRA / fusion prompts, one per LoRA, separated by |",
                                       placeholder="a sks shape | a red circle, framed style"),
                    references=gr.Textbox(
                        label="Reference datasets (ZipLoRA / fusion), one per LoRA, separated by | "
                              "(e.g. each LoRA's training set; empty = images generated from the prompt)",
                        placeholder="heart | moon"),
                    more=gr.Code(
                        label="More options (TOML, any merge option)", language=None,
                        value='# e.g.\n# fusion_ridge = 0.01\n# fusion_order = "joint"\n# steps = 200\n',
                    ),
                )  # fmt: skip
                form = Form(**{name: fields[name] for name in FIELDS})
                submit = gr.Button("Queue merge", variant="primary")
                status = gr.Markdown(elem_id="merge-status")
        form["preset"].change(
            preset_fields, form["preset"], [form["method"], form["density"], form["rank"]], api_name=False
        )
        queued = gr.Number(visible=False)
        submit.click(
            handler(services, submit_merge, form), form.inputs, [status, queued], api_name="merge"
        ).success(lambda job: (job, gr.Tabs(selected="jobs")), queued, [jobs_view, tabs], api_name=False)
    return {"sources": form["sources"]}
