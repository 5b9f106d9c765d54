"""Train tab: pick a method, a base model and a workspace dataset; the run is queued as a job (Jobs tab).

A preset (presets/train_*.toml) fills the recipe; the fields here and the "more options" TOML override it.
The config is checked before it is queued, so a bad option is reported at once, not minutes later.
"""

from __future__ import annotations

import tomllib

import gradio as gr

from studio.config import PRESETS_DIR, build_config, config_to_dict, load_preset
from studio.errors import ConfigError
from ui.forms import Form, handler, model_choice
from ui.tabs.generate import MODELS

METHODS = ["dreambooth", "style", "b_lora", "orthogonal"]


def train_presets() -> list[str]:
    return [""] + sorted(p.stem.removeprefix("train_") for p in PRESETS_DIR.glob("train_*.toml"))


def submit_training(services, values: dict) -> str:
    """Build and check a TrainConfig from the form, queue it; returns a line naming the job."""
    from trainers.config import TrainConfig

    ws = services.workspace
    name = ws.check_name(values["name"], "LoRA name")
    dataset = ws.check_name(values["dataset"] or "", "dataset")
    data_dir = ws.resolve(ws.datasets / dataset)
    if not data_dir.is_dir():
        raise ConfigError(f"no dataset {dataset!r}: make one in the Dataset tab first")
    options = load_preset(f"train_{values['preset']}", "train") if values.get("preset") else {}
    options |= {
        "method": values["method"],
        "model": model_choice(ws, values["model"]),
        "data_dir": str(data_dir),
        "output_dir": str(ws.runs / name),
        "output_name": name,
        "prompt": values["prompt"],
        "max_steps": int(values["steps"]),
        "rank": int(values["rank"]),
        "learning_rate": float(values["learning_rate"]),
        "batch_size": int(values["batch_size"]),
        "resolution": int(values["resolution"]),
    }
    if int(values["resolution"]) < 256:  # the demo models' 64 px images need buckets that small
        options |= {"min_bucket_reso": 64, "max_bucket_reso": 256, "bucket_step": 64}
    if values.get("prior_preservation"):
        options |= {
            "prior_preservation": True,
            "class_prompt": values["class_prompt"],
            "class_data_dir": str(ws.runs / name / "class_images"),
        }
    if values["method"] == "b_lora":
        options["split"] = (
            True  # also write the content and style halves, for the Generate tab's B-LoRA mixing
        )
    options |= _more_options(values.get("more", ""))
    cfg = build_config(TrainConfig, options)
    job_id = services.jobs.submit("train", config_to_dict(cfg), name)
    return (
        f"queued job {job_id}: {cfg.method} LoRA {name!r}, {cfg.max_steps} steps. Follow it in the Jobs tab."
    )


def _more_options(text: str) -> dict:
    if not (text or "").strip():
        return {}
    try:
        return tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"more options: not valid TOML ({exc}); write one key = value per line") from None


def build(services) -> None:
    ws = services.workspace
    with gr.Tab("Train"):
        with gr.Row():
            with gr.Column():
                with gr.Row():
                    method = gr.Dropdown(METHODS, value="dreambooth", label="Method")
                    preset = gr.Dropdown(train_presets(), value="", label="Preset (optional)")
                with gr.Row():
                    model = gr.Dropdown(
                        MODELS, value="demo:sd15", allow_custom_value=True, label="Base model"
                    )
                    dataset = gr.Dropdown(ws.dataset_names(), label="Dataset", allow_custom_value=True)
                name = gr.Textbox(label="LoRA name", value="my-lora")
                prompt = gr.Textbox(label="Instance prompt / trigger (for images without a caption)",
                                    value="a sks shape")  # fmt: skip
                with gr.Row():
                    prior = gr.Checkbox(label="Prior preservation (DreamBooth)")
                    class_prompt = gr.Textbox(label="Class prompt", value="a shape on a blue background")
            with gr.Column():
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
            prior_preservation=prior, class_prompt=class_prompt, more=more,
        )  # fmt: skip

        form["method"].change(  # B-LoRA is an SDXL method: offer the SDXL demo model when it is picked
            lambda method, model: "demo:sdxl" if method == "b_lora" and model == "demo:sd15" else model,
            [form["method"], form["model"]], form["model"], api_name=False,
        )  # fmt: skip
        submit.click(handler(services, submit_training, form), form.inputs, status, api_name="train")
        refresh.click(
            lambda: gr.Dropdown(choices=ws.dataset_names()), None, form["dataset"], api_name="datasets"
        )
