"""Generate tab: a prompt, a base model (the built-in demo model by default) and a stack of workspace LoRAs."""

from __future__ import annotations

import time

import gradio as gr

from studio.app.form_configs import DEMO_MODELS
from ui.forms import Form, handler

MODES = ["merge", "switch", "composite"]


def generate(services, values: dict) -> tuple[list, str]:
    """Make the images a form asks for; returns (images, a line saying what was made and where)."""
    started = time.time()
    results = services.generate(values)
    names = ", ".join(r.path.name for r in results if r.path)
    info = f"{len(results)} image(s) in {time.time() - started:.1f} s, seeds {results[0].seed}..{results[-1].seed}"
    return [r.image for r in results], f"{info}; saved in outputs/: {names}"


def build(services) -> None:
    ws = services.workspace
    with gr.Tab("Generate"):
        with gr.Row():
            with gr.Column(scale=3):
                prompt = gr.Textbox(label="Prompt", value="a red circle on a blue background", lines=2)
                negative = gr.Textbox(label="Negative prompt", lines=1)
                model = gr.Dropdown(
                    list(DEMO_MODELS), value="demo:sd15", allow_custom_value=True, label="Base model",
                    info="built-in demo model, or a diffusers folder / .safetensors file in the workspace",
                )  # fmt: skip
                with gr.Row():
                    loras = gr.Dropdown(
                        ws.lora_files(), multiselect=True, allow_custom_value=True, label="LoRAs", scale=3
                    )
                    weights = gr.Textbox(label="LoRA weights", placeholder="1, 0.8 (default 1)", scale=1)
                mode = gr.Radio(MODES, value="merge", label="Multi-LoRA mode")
                with gr.Accordion("B-LoRA (SDXL): content of one, style of another", open=False):
                    with gr.Row():
                        b_content = gr.Dropdown(
                            ws.lora_files(), allow_custom_value=True, label="Content from"
                        )
                        b_style = gr.Dropdown(ws.lora_files(), allow_custom_value=True, label="Style from")
                with gr.Accordion("Settings", open=False):
                    with gr.Row():
                        steps = gr.Slider(1, 100, value=20, step=1, label="Steps")
                        cfg = gr.Slider(1, 15, value=7.5, step=0.5, label="Guidance (CFG)")
                    with gr.Row():
                        seed = gr.Number(value=0, precision=0, label="Seed")
                        size = gr.Number(value=0, precision=0, label="Size (px, 0 = the model's own)")
                        count = gr.Slider(1, 8, value=1, step=1, label="Images")
                with gr.Row():
                    refresh = gr.Button("Refresh LoRA list", size="sm")
                    run = gr.Button("Generate", variant="primary")
            with gr.Column(scale=2):
                gallery = gr.Gallery(label="Images", columns=2, height=360)
                info = gr.Markdown(elem_id="generate-info")
        form = Form(
            prompt=prompt, negative_prompt=negative, model=model, loras=loras, weights=weights, mode=mode,
            steps=steps, cfg=cfg, seed=seed, size=size, count=count, b_lora_content=b_content,
            b_lora_style=b_style,
        )  # fmt: skip

        run.click(handler(services, generate, form), form.inputs, [gallery, info], api_name="generate")
        refresh.click(
            lambda: [gr.Dropdown(choices=ws.lora_files())] * 3, None, [loras, b_content, b_style],
            api_name="generate_loras",
        )  # fmt: skip
