"""Dataset tab: make a training folder in the workspace from uploaded images and a caption (or from the
demo world), and look through a folder with its captions."""

from __future__ import annotations

from pathlib import Path

import gradio as gr
from gradio.utils import get_upload_folder

from studio.app.datasets import DEMO_SETS, dataset_images, write_caption
from studio.core.errors import ConfigError
from ui.forms import handler


def add_images(services, name: str, files: list | None, caption: str) -> str:
    """Import uploaded files into datasets/<name>; unreadable files are skipped and named."""
    if not files:
        raise ConfigError("choose one or more images to add")
    paths = [Path(f if isinstance(f, str) else f.name) for f in files]
    uploads = Path(get_upload_folder()).resolve()
    outside = [p for p in paths if uploads not in p.resolve().parents]
    if outside:  # a path on the server, not a file sent from the browser
        raise ConfigError(f"{outside[0].name}: only files uploaded from the page can be added")
    return services.add_images(name, [str(p) for p in paths], caption).summary()


def add_demo_set(services, name: str, which: str, count: int) -> str:
    """Write demo-world training images (with captions) into datasets/<name>."""
    written = services.add_demo_set(name, which, count)
    return f"wrote {written} images with captions to datasets/{name}"


def set_caption(services, name: str, image: str, caption: str) -> str:
    """Write the caption of one image of a dataset."""
    ws = services.workspace
    if not image:
        raise ConfigError("pick an image in the gallery first")
    path = ws.resolve(ws.datasets / ws.check_name(name, "dataset") / ws.check_name(image, "image"))
    if not path.is_file():
        raise ConfigError(f"no image {image!r} in dataset {name!r}")
    write_caption(path, caption)
    return f"caption of {image} saved"


def show(services, name: str) -> list[tuple[str, str]]:
    """(image path, caption) of each image in a dataset, for the gallery."""
    if not name:
        return []
    folder = services.workspace.resolve(services.workspace.datasets / services.workspace.check_name(name))
    if not folder.is_dir():
        raise ConfigError(f"no dataset {name!r} in the workspace")
    items = []
    for image in dataset_images(folder):
        caption = image.with_suffix(".txt")
        items.append((str(image), caption.read_text().strip() if caption.is_file() else "(no caption)"))
    return items


def build(services) -> None:
    ws = services.workspace
    with gr.Tab("Dataset"):
        with gr.Row():
            with gr.Column():
                name = gr.Textbox(label="Dataset name", value="my-dataset")
                files = gr.File(label="Images", file_count="multiple", file_types=["image"])
                caption = gr.Textbox(label="Caption for these images", placeholder="a photo of sks dog")
                add = gr.Button("Add images", variant="primary")
                with gr.Accordion("Or start from the demo world", open=False):
                    which = gr.Dropdown(list(DEMO_SETS), value=list(DEMO_SETS)[0], label="Demo set")
                    count = gr.Slider(4, 32, value=8, step=1, label="Images")
                    add_demo = gr.Button("Write demo set")
                status = gr.Markdown(elem_id="dataset-status")
            with gr.Column():
                pick = gr.Dropdown(ws.dataset_names(), label="Show dataset", allow_custom_value=True)
                gallery = gr.Gallery(label="Images and captions", columns=4, height=360)
                with gr.Row():
                    picked = gr.Textbox(label="Image", interactive=False, scale=1)
                    picked_caption = gr.Textbox(label="Its caption", scale=3)
                save_caption = gr.Button("Save caption", size="sm")

        def after_add(message: str, dataset: str):
            return message, gr.Dropdown(choices=ws.dataset_names(), value=dataset)

        add.click(
            handler(services, add_images), [name, files, caption], status, api_name="add_images"
        ).success(after_add, [status, name], [status, pick], api_name=False)
        add_demo.click(
            handler(services, add_demo_set), [name, which, count], status, api_name="add_demo_set"
        ).success(after_add, [status, name], [status, pick], api_name=False)
        pick.change(handler(services, show), pick, gallery, api_name="show_dataset")

        def on_select(event: gr.SelectData):
            image, caption = event.value["image"]["path"], event.value.get("caption") or ""
            return Path(image).name, "" if caption == "(no caption)" else caption

        gallery.select(on_select, None, [picked, picked_caption], api_name=False)
        save_caption.click(
            handler(services, set_caption), [pick, picked, picked_caption], status, api_name="set_caption"
        ).success(handler(services, show), pick, gallery, api_name=False)
