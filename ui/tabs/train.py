"""Train tab: pick a method, a base model and a workspace dataset; the run is queued as a job (Jobs tab).

A preset (presets/train_*.toml) fills the recipe; the fields here and the "more options" TOML override it.
The config is checked before it is queued, so a bad option is reported at once, not minutes later.
"""

from __future__ import annotations

import gradio as gr

from studio.app.form_configs import DEMO_MODELS, training_methods
from studio.core.options import preset_names
from ui.forms import Form, handler


def submit_training(services, values: dict) -> str:
    """Queue a training job from the form; returns a line naming the job."""
    job_id, cfg = services.submit_training(values)
    return (
        f"queued job {job_id}: {cfg.method} LoRA {cfg.output_name!r}, {cfg.max_steps} steps. "
        "Follow it in the Jobs tab."
    )


def build(services) -> None:
    ws = services.workspace
    with gr.Tab("Train"):
        with gr.Row():
            with gr.Column():
                with gr.Row():
                    method = gr.Dropdown(training_methods(), value="dreambooth", label="Method")
                    preset = gr.Dropdown(["", *preset_names("train")], value="", label="Preset (optional)")
                with gr.Row():
                    model = gr.Dropdown(
                        list(DEMO_MODELS), value="demo:sd15", allow_custom_value=True, label="Base model"
                    )
                    dataset = gr.Dropdown(ws.dataset_names(), label="Dataset", allow_custom_value=True)
                name = gr.Textbox(label="LoRA name", value="my-lora")
                prompt = gr.Textbox(label="Instance prompt / trigger (for images without a caption)",
                                    value="a sks shape")  # fmt: skip
                with gr.Row():
                    prior = gr.Checkbox(label="Prior preservation (DreamBooth)")
                    class_prompt = gr.Textbox(label="Class prompt", value="a shape on a blue background")
            with gr.Column():
                network = gr.Dropdown(
                    ["lora", "locon", "loha", "lokr", "dora"], value="lora", label="Network",
                    info="LoRA; LoCon adds the convs; LyCORIS LoHa / LoKr; DoRA (weight-decomposed LoRA)",
                )  # fmt: skip
                with gr.Row():
                    steps = gr.Number(value=300, precision=0, label="Steps")
                    rank = gr.Number(value=8, precision=0, label="Rank")
                    learning_rate = gr.Number(value=1e-3, label="Learning rate")
                with gr.Row():
                    batch_size = gr.Number(value=4, precision=0, label="Batch size")
                    resolution = gr.Number(value=64, precision=0, label="Resolution",
                                           info="64 for the demo models, 512 SD1.5, 1024 SDXL")  # fmt: skip
                more = gr.Code(label="More options (TOML, any training option)", language=None,
                               value='# e.g.\n# conv_rank = 8\n# up_lr_weight = "cosine+0.2"\n')  # fmt: skip
        with gr.Row():
            refresh = gr.Button("Refresh datasets", size="sm")
            submit = gr.Button("Queue training", variant="primary")
        status = gr.Markdown(elem_id="train-status")
        form = Form(
            method=method, preset=preset, model=model, dataset=dataset, name=name, prompt=prompt, steps=steps,
            rank=rank, learning_rate=learning_rate, batch_size=batch_size, resolution=resolution,
            prior_preservation=prior, class_prompt=class_prompt, more=more, network=network,
        )  # fmt: skip

        form["method"].change(  # B-LoRA is an SDXL method: offer the SDXL demo model when it is picked
            lambda method, model: "demo:sdxl" if method == "b_lora" and model == "demo:sd15" else model,
            [form["method"], form["model"]], form["model"], api_name=False,
        )  # fmt: skip
        submit.click(handler(services, submit_training, form), form.inputs, status, api_name="train")
        refresh.click(
            lambda: gr.Dropdown(choices=ws.dataset_names()), None, form["dataset"], api_name="datasets"
        )
