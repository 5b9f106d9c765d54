"""Train tab: pick a method, a base model and a workspace dataset; the run is queued as a job and its live
view opens in the Jobs tab.

A preset (presets/train_*.toml) fills the recipe; the fields here and the "more options" TOML override it.
The config is checked before it is queued (page limits on steps, resolution, batch size and rank are named
when crossed), and once this machine has run a job, the form says how long the new one will take.
"""

from __future__ import annotations

import gradio as gr

from studio.app.form_configs import DEMO_MODELS, PAGE_LIMITS, training_methods
from studio.app.job_view import duration
from studio.core.errors import StudioError
from studio.core.model_paths import DEMO_MODELS as DEMO_SIZES
from studio.core.model_paths import demo_model_name
from studio.core.options import preset_names
from ui.forms import Form, handler


def submit_training(services, values: dict):
    """Queue a training job from the form; returns (a line naming the job, its id for the Jobs view)."""
    job_id, cfg = services.submit_training(values)
    line = f"queued job {job_id}: {cfg.method} LoRA {cfg.output_name!r}, {cfg.max_steps} steps. Its live view is in the Jobs tab."
    return line, job_id


def estimate(services, values: dict) -> str:
    """How long the job would take here, judged from the jobs this machine has run; a bad field says why."""
    try:
        found = services.estimate_training(values)
    except StudioError as exc:
        return f"⚠ {exc}"
    if found is None:
        return "Time estimate: after the first finished job on this machine."
    return f"Time estimate: about {duration(found.seconds)} (from the pace of job {found.from_job})."


def _built_in(model: str | None) -> tuple[str, int] | None:
    """(family, image size) of a built-in demo model choice ("demo:sd15-128"), None for any other model."""
    text = model or ""
    return DEMO_SIZES.get(text.removeprefix("demo:")) if text.startswith("demo:") else None


def sdxl_for_b_lora(method: str, model: str) -> str:
    """B-LoRA is an SDXL method: picked with an SD1.5 demo model, the form offers the SDXL one of its size."""
    built_in = _built_in(model)
    if method == "b_lora" and built_in and built_in[0] == "sd15":
        return f"demo:{demo_model_name('sdxl', built_in[1])}"
    return model


def demo_resolution(model: str, resolution):
    """A demo model trains at the size of its world (64 or 128 px); other models keep what the field says."""
    built_in = _built_in(model)
    return built_in[1] if built_in else resolution


# the /train endpoint's parameters, in this order (scripts that call it by position keep working)
FIELDS = ("method", "preset", "model", "dataset", "name", "prompt", "steps", "rank", "learning_rate", "batch_size",
          "resolution", "prior_preservation", "class_prompt", "reg_dataset", "more", "network", "sample_prompts",
          "sample_every", "token_words")  # fmt: skip


def build(services, tabs: gr.Tabs, jobs_view: gr.Number) -> dict[str, gr.Dropdown]:
    """The tab; returns its lists that follow the workspace (refreshed by the page)."""
    with gr.Tab("Train", id="train") as tab:
        with gr.Row():
            with gr.Column():
                fields = what_to_train(services.workspace.dataset_names())
            with gr.Column():
                fields |= how_to_train()
        estimate_line = gr.Markdown(elem_id="train-estimate")
        submit = gr.Button("Queue training", variant="primary")
        status = gr.Markdown(elem_id="train-status")
        form = Form(**{name: fields[name] for name in FIELDS})
        form["method"].change(sdxl_for_b_lora, [form["method"], form["model"]], form["model"], api_name=False)
        form["model"].change(
            demo_resolution, [form["model"], form["resolution"]], form["resolution"], api_name=False
        )
        queued = gr.Number(visible=False)
        submit.click(
            handler(services, submit_training, form), form.inputs, [status, queued], api_name="train"
        ).success(lambda job: (job, gr.Tabs(selected="jobs")), queued, [jobs_view, tabs], api_name=False)
        show_estimate = handler(services, estimate, form)
        for field in ("steps", "batch_size", "resolution", "model", "dataset"):
            form[field].change(
                show_estimate, form.inputs, estimate_line, api_name=False, show_progress="hidden"
            )
        tab.select(
            show_estimate, form.inputs, estimate_line, api_name="train_estimate", show_progress="hidden"
        )
    return {"datasets": form["dataset"], "reg_datasets": form["reg_dataset"]}


def what_to_train(datasets: list[str]) -> dict[str, gr.components.Component]:
    """The left column: method, preset, base model, datasets, names and prompts, network type."""
    with gr.Row():
        method = gr.Dropdown(training_methods(), value="dreambooth", label="Method")
        preset = gr.Dropdown(["", *preset_names("train")], value="", label="Preset (optional)")
    with gr.Row():
        model = gr.Dropdown(list(DEMO_MODELS), value="demo:sd15", allow_custom_value=True, label="Base model")
        dataset = gr.Dropdown(
            datasets, value=None, label="Dataset", allow_custom_value=True, elem_id="train-dataset"
        )
    name = gr.Textbox(label="LoRA name", value="my-lora")
    prompt = gr.Textbox(label="Instance prompt / trigger (for images without a caption)", value="a sks shape")
    token_words = gr.Textbox(
        label="Learn trigger words (optional)",
        placeholder="sks",
        info="each word's token embedding trains with the LoRA and is saved in its file (pivotal tuning)",
        elem_id="train-token-words",
    )
    with gr.Row():
        prior = gr.Checkbox(label="Prior preservation (DreamBooth)")
        class_prompt = gr.Textbox(label="Class prompt", value="a shape on a blue background")
    reg_dataset = gr.Dropdown(
        datasets,
        value=None,
        label="Regularisation dataset (style, optional)",
        info="captioned images without the style, trained alongside: keeps the content",
        allow_custom_value=True,
        elem_id="train-reg-dataset",
    )
    network = gr.Dropdown(
        ["lora", "locon", "loha", "lokr", "dora"],
        value="lora",
        label="Network",
        info="LoRA; LoCon adds the convs; LyCORIS LoHa / LoKr; DoRA (weight-decomposed LoRA)",
    )
    return {"method": method, "preset": preset, "model": model, "dataset": dataset, "name": name, "prompt": prompt,
            "prior_preservation": prior, "class_prompt": class_prompt, "reg_dataset": reg_dataset,
            "network": network, "token_words": token_words}  # fmt: skip


def how_to_train() -> dict[str, gr.components.Component]:
    """The right column: steps, rank, learning rate, batch size, resolution, samples and more options."""
    limit = PAGE_LIMITS
    with gr.Row():
        steps = gr.Number(
            value=300, precision=0, label="Steps", minimum=limit["steps"][0], maximum=limit["steps"][1]
        )
        rank = gr.Number(
            value=8, precision=0, label="Rank", minimum=limit["rank"][0], maximum=limit["rank"][1]
        )
        learning_rate = gr.Number(value=1e-3, label="Learning rate")
    with gr.Row():
        batch_size = gr.Number(
            value=4, precision=0, label="Batch size", minimum=1, maximum=limit["batch_size"][1]
        )
        resolution = gr.Number(
            value=64,
            precision=0,
            label="Resolution",
            minimum=64,
            maximum=limit["resolution"][1],
            info="64 for the demo models, 512 SD1.5, 1024 SDXL",
        )
    with gr.Row():
        sample_prompts = gr.Textbox(
            label="Sample prompts (one per line)", lines=2, value="a sks shape on a blue background"
        )
        sample_every = gr.Number(value=50, precision=0, label="Sample every N steps (0 = off)", minimum=0)
    more = gr.Code(
        label="More options (TOML, any training option)",
        language=None,
        value='# e.g.\n# conv_rank = 8\n# up_lr_weight = "cosine+0.2"\n# extra_resolutions = [768, 1024]\n'
        "# token_lr = 1e-3  # the rate the learnt trigger words train at\n",
    )
    return {"steps": steps, "rank": rank, "learning_rate": learning_rate, "batch_size": batch_size,
            "resolution": resolution, "sample_prompts": sample_prompts, "sample_every": sample_every, "more": more}  # fmt: skip
