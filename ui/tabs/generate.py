"""Generate tab: a prompt, a base model (the built-in demo model by default) and a stack of workspace LoRAs;
the history of every image the workspace made (settings read back from each PNG, "reuse these settings"),
and comparison grids (LoRA weight or each LoRA across, seeds down), as A1111's X/Y plot.
"""

from __future__ import annotations

import time
from pathlib import Path

import gradio as gr

from studio.app.form_configs import DEMO_MODELS
from studio.app.regions import BLANK_ROWS, HEADERS, drawn_box, preview
from ui.forms import Form, handler

MODES = ["merge", "switch", "composite"]


def generate(services, values: dict) -> tuple[list, str]:
    """Make the images a form asks for; returns (images, a line with the seeds used and where they went)."""
    if not str(values.get("prompt") or "").strip():
        gr.Warning("The prompt is empty: the model draws whatever it likes.")
    started = time.time()
    results = services.generate(values)
    for note in results[0].notes if results else ():
        gr.Warning(note)
    names = ", ".join(r.path.name for r in results if r.path)
    seeds = ", ".join(str(r.seed) for r in results)
    info = f"{len(results)} image(s) in {time.time() - started:.1f} s · seed {seeds} · saved in outputs/: {names}"
    return [r.image for r in results], info


def show_history(services) -> list[tuple[str, str]]:
    """(image, caption) of every image the workspace made, newest first."""
    return [(item.path, item.caption) for item in services.history()]


def reuse(services, name: str) -> list:
    """The form's fields as they were for one image of the history."""
    if not name:
        raise gr.Error("click an image of the history first")
    values = services.reuse(name)
    return [values[k] for k in REUSED]


def compare(services, values: dict) -> tuple[str, str]:
    """A comparison grid with the form's settings; returns (the grid image, a line saying where it is)."""
    path = services.compare(values, values.get("columns", ""), values.get("seeds", ""))
    return str(path), f"grid saved as outputs/grids/{Path(path).name}"


REUSED = ("prompt", "negative_prompt", "model", "loras", "weights", "mode", "steps", "cfg", "seed", "size",
          "regions", "region_base", "region_mode")  # fmt: skip


def build(services) -> dict[str, gr.components.Component]:
    """The tab; returns its components other tabs and the page drive (LoRA lists, the stack)."""
    ws = services.workspace
    with gr.Tab("Generate", id="generate"):
        with gr.Row():
            with gr.Column(scale=3):
                prompt = gr.Textbox(label="Prompt", value="a red circle on a blue background", lines=2)
                negative = gr.Textbox(label="Negative prompt", lines=1)
                model = gr.Dropdown(
                    list(DEMO_MODELS), value="demo:sd15", allow_custom_value=True, label="Base model",
                    info="built-in demo model, or a diffusers folder / .safetensors file in the workspace",
                )  # fmt: skip
                with gr.Row():
                    loras = gr.Dropdown(ws.lora_files(), value=[], multiselect=True, allow_custom_value=True,
                                        label="LoRAs", scale=3)  # fmt: skip
                    weights = gr.Textbox(label="LoRA weights", placeholder="1, 0.8 (default 1)", scale=1)
                mode = gr.Radio(MODES, value="merge", label="Multi-LoRA mode")
                with gr.Accordion("B-LoRA (SDXL): content of one, style of another", open=False):
                    with gr.Row():
                        b_content = gr.Dropdown(
                            ws.lora_files(), value=None, allow_custom_value=True, label="Content from"
                        )
                        b_style = gr.Dropdown(
                            ws.lora_files(), value=None, allow_custom_value=True, label="Style from"
                        )
                regions, region_base, region_mode = _regions(ws)
                with gr.Accordion("Settings", open=False):
                    with gr.Row():
                        steps = gr.Slider(1, 100, value=20, step=1, label="Steps")
                        cfg = gr.Slider(1, 15, value=7.5, step=0.5, label="Guidance (CFG)")
                    with gr.Row():
                        seed = gr.Number(value=-1, precision=0, label="Seed (-1 = random)")
                        size = gr.Number(value=0, precision=0, label="Size (px, 0 = the model's own)")
                        count = gr.Slider(1, 8, value=1, step=1, label="Images")
                run = gr.Button("Generate", variant="primary")
            with gr.Column(scale=2):
                gallery = gr.Gallery(label="Images", columns=2, height=360, elem_id="generate-gallery")
                info = gr.Markdown(elem_id="generate-info")
        form = Form(
            prompt=prompt, negative_prompt=negative, model=model, loras=loras, weights=weights, mode=mode,
            steps=steps, cfg=cfg, seed=seed, size=size, count=count, b_lora_content=b_content,
            b_lora_style=b_style, regions=regions, region_base=region_base, region_mode=region_mode,
        )  # fmt: skip
        run.click(handler(services, generate, form), form.inputs, [gallery, info], api_name="generate")
        _history(services, form)
        _compare(services, form)
    return {"loras": loras, "b_content": b_content, "b_style": b_style, "weights": weights}


def _regions(ws) -> tuple[gr.Dataframe, gr.Slider, gr.Radio]:
    """A prompt (and a LoRA) per box: typed in a table or drawn by two clicks on the canvas, which shows
    the boxes as they are."""
    with gr.Accordion("Regions: a prompt (and a LoRA) per box of the image", open=False):
        gr.Markdown(
            "Corners as fractions of the image (0-1) or in pixels; or click two opposite corners on the "
            "canvas to draw a box. The prompt above covers the rest of the image; rows without a prompt are "
            "left out. LoRA: a file of the workspace (e.g. `loras/dog.safetensors`), added to the stack "
            "inside its box. A subject LoRA holds in a small box when it was also trained at the box's size "
            "(Train tab, more options: `extra_resolutions = [256]`) and for more steps than a whole-picture "
            "LoRA needs."
        )
        with gr.Row():
            table = gr.Dataframe(
                value=BLANK_ROWS, headers=HEADERS, datatype=["number"] * 4 + ["str", "str", "number"],
                row_count=2, column_count=7, interactive=True, type="array", scale=3,
                elem_id="generate-regions",
            )  # fmt: skip
            canvas = gr.Image(value=preview(BLANK_ROWS), label="Boxes over the canvas: click two corners to add one",
                              interactive=False, height=256, width=256, scale=1, min_width=256, buttons=[],
                              elem_id="generate-canvas")  # fmt: skip
            corner = gr.State(None)
        with gr.Row():
            base = gr.Slider(0, 1, value=0.2, step=0.05, label="Global prompt kept inside the boxes")
            mode = gr.Radio(
                [("each box sees the whole picture (mask)", "mask"), ("each box is a picture of its own (area)", "area")],
                value="mask", label="Regions drawn as", elem_id="generate-region-mode",
            )  # fmt: skip
        table.change(preview, table, canvas, api_name=False, show_progress="hidden")

        def on_click(rows, pending, event: gr.SelectData):
            """The first corner is only marked (the table untouched), the second adds the box."""
            rows, pending = drawn_box(rows, pending, *event.index)
            return gr.skip() if pending else rows, pending, preview(rows, pending=pending)

        canvas.select(
            on_click,
            [table, corner],
            [table, corner, canvas],
            api_name=False,
            show_progress="hidden",
            trigger_mode="always_last",  # a quick second click waits for the first (not dropped)
        )
    return table, base, mode


def _history(services, form: Form) -> None:
    with gr.Accordion("History: every image of this workspace", open=False) as box:
        history = gr.Gallery(
            columns=6, height=300, label="History, newest first", elem_id="history", fit_columns=False
        )
        with gr.Row():
            picked = gr.Textbox(label="Image", interactive=False, scale=3)
            again = gr.Button("Reuse these settings", scale=1)
    listing = handler(services, show_history)
    box.expand(listing, None, history, api_name="history", show_progress="hidden")

    def on_select(event: gr.SelectData):
        return str(Path(event.value["image"]["path"]).name)

    history.select(on_select, None, picked, api_name=False)
    again.click(
        handler(services, reuse, inputs={"name": None}), picked, [form[k] for k in REUSED], api_name="reuse"
    )


def _compare(services, form: Form) -> None:
    with gr.Accordion("Compare: a grid of LoRA weights (or each LoRA) by seeds", open=False):
        with gr.Row():
            columns = gr.Textbox(
                label="Across: LoRA weights, or 'each' for each LoRA alone", value="0, 0.5, 1"
            )
            seeds = gr.Textbox(label="Down: seeds", value="1, 2")
            make = gr.Button("Make grid")
        grid = gr.Image(label="Grid", type="filepath", elem_id="compare-grid")
        where = gr.Markdown(elem_id="compare-info")
    both = Form(**form.components, columns=columns, seeds=seeds)
    make.click(handler(services, compare, both), both.inputs, [grid, where], api_name="compare")
