"""Dataset tab: build a training folder from uploaded images with their .txt captions (paired by name), or
from the demo world; edit captions in a grid beside the thumbnails, find / replace, put a trigger word
first, delete images; see each image's size and the bucket it trains in at a resolution.
"""

from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace

import gradio as gr
from gradio.utils import get_upload_folder

from studio.app.datasets import DEMO_SETS
from studio.core.errors import ConfigError
from ui.forms import handler

TABLE = ["file", "caption", "size", "bucket"]


def add_images(services, name: str, files: list | None, caption: str) -> str:
    """Import uploaded images (and their .txt captions) into datasets/<name>; every problem names the file."""
    if not files:
        raise ConfigError("choose images (and .txt captions with the same names) to add")
    paths = [Path(f if isinstance(f, str) else f.name) for f in files]
    uploads = Path(get_upload_folder()).resolve()
    outside = [p for p in paths if uploads not in p.resolve().parents]
    if outside:  # a path on the server, not a file sent from the browser
        raise ConfigError(f"{outside[0].name}: only files uploaded from the page can be added")
    return services.add_images(name, [str(p) for p in paths], caption or "").summary()


def add_demo_set(services, name: str, which: str, count: int) -> str:
    """Write demo-world training images (with captions) into datasets/<name>."""
    written = services.add_demo_set(name, which, count)
    return f"wrote {written} images with captions to datasets/{name}"


def show(services, name: str, resolution: int):
    """(thumbnails, the caption grid) of a dataset."""
    if not name:
        return [], []
    folder = services.dataset_folder(name)
    rows = services.dataset_rows(name, int(resolution or 512))
    return [(str(folder / r[0]), r[0]) for r in rows], rows


def save_captions(services, name: str, table) -> str:
    rows = table.values.tolist() if hasattr(table, "values") else list(table or [])
    changed = services.save_captions(name, {str(r[0]): str(r[1]) for r in rows if r and r[0]})
    return f"saved {changed} caption(s)"


def replace_text(services, name: str, find: str | None, replace: str | None) -> str:
    return f"changed {services.replace_in_captions(name, find or '', replace or '')} caption(s)"


def prepend(services, name: str, trigger: str | None) -> str:
    trigger = trigger or ""
    return f"put {trigger.strip()!r} first in {services.prepend_trigger(name, trigger)} caption(s)"


def delete(services, name: str, picked: str) -> str:
    images = [p.strip() for p in (picked or "").split(",") if p.strip()]
    if not images:
        raise ConfigError("click the images to delete in the thumbnails first")
    gone = services.delete_images(name, images)
    return f"moved {len(gone)} image(s) to the trash: {', '.join(gone)}"


def build(services) -> dict[str, gr.Dropdown]:
    """The tab; returns its list of datasets (refreshed by the page)."""
    with gr.Tab("Dataset", id="dataset"):
        with gr.Row():
            with gr.Column(scale=2):
                c = add_column()
            with gr.Column(scale=3):
                c |= edit_column(services.workspace.dataset_names())
        wire(services, SimpleNamespace(**c))
    return {"datasets": c["pick"]}


def add_column() -> dict[str, gr.components.Component]:
    """Name, uploads and their caption, the demo world's sets, the status line."""
    name = gr.Textbox(label="Dataset name", value="my-dataset")
    files = gr.File(
        label="Images and their .txt captions", file_count="multiple", file_types=["image", ".txt"]
    )
    caption = gr.Textbox(label="Caption for images without a .txt", placeholder="a photo of sks dog")
    add = gr.Button("Add to dataset", variant="primary")
    with gr.Accordion("Or start from the demo world", open=False):
        which = gr.Dropdown(list(DEMO_SETS), value=list(DEMO_SETS)[0], label="Demo set")
        count = gr.Slider(4, 32, value=8, step=1, label="Images")
        add_demo = gr.Button("Write demo set")
    status = gr.Markdown(elem_id="dataset-status")
    return {"name": name, "files": files, "caption": caption, "add": add, "which": which, "count": count,
            "add_demo": add_demo, "status": status}  # fmt: skip


def edit_column(datasets: list[str]) -> dict[str, gr.components.Component]:
    """The dataset shown: thumbnails, the caption grid, bulk caption edits, deleting picked images."""
    with gr.Row():
        pick = gr.Dropdown(datasets, value=None, label="Show dataset", allow_custom_value=True)
        resolution = gr.Number(value=64, precision=0, label="Buckets at resolution")
    thumbs = gr.Gallery(label="Images (click to pick for deleting)", columns=6, height=240, fit_columns=False)
    table = gr.Dataframe(headers=TABLE, interactive=True, static_columns=[0, 2, 3], wrap=True,
                         label="Captions (edit the caption column, then save)", elem_id="captions")  # fmt: skip
    with gr.Row():
        save = gr.Button("Save captions", variant="primary")
        picked = gr.Textbox(label="Picked images", scale=2)
        remove = gr.Button("Delete picked", variant="stop")
    with gr.Row():
        find = gr.Textbox(label="Find")
        replace = gr.Textbox(label="Replace with")
        do_replace = gr.Button("Replace in all captions")
    with gr.Row():
        trigger = gr.Textbox(label="Trigger word", placeholder="sks")
        do_prepend = gr.Button("Put it first in every caption")
    return {"pick": pick, "resolution": resolution, "thumbs": thumbs, "table": table, "save": save, "picked": picked,
            "remove": remove, "find": find, "replace": replace, "do_replace": do_replace, "trigger": trigger,
            "do_prepend": do_prepend}  # fmt: skip


def wire(services, c: SimpleNamespace) -> None:
    """The tab's events; each action refreshes the dataset shown."""
    view = handler(services, show, inputs={"name": None, "resolution": 64})
    refresh, shown = [c.pick, c.resolution], [c.thumbs, c.table]

    def after_add(message: str, dataset: str):
        return message, gr.Dropdown(choices=services.workspace.dataset_names(), value=dataset), None

    c.add.click(handler(services, add_images, inputs={"name": "my-dataset", "files": None, "caption": None}),
                [c.name, c.files, c.caption], c.status, api_name="add_images").success(
        after_add, [c.status, c.name], [c.status, c.pick, c.files], api_name=False)  # fmt: skip
    c.add_demo.click(handler(services, add_demo_set, inputs={"name": "my-dataset", "which": list(DEMO_SETS)[0], "count": 8}),
                     [c.name, c.which, c.count], c.status, api_name="add_demo_set").success(
        after_add, [c.status, c.name], [c.status, c.pick, c.files], api_name=False)  # fmt: skip
    c.pick.change(view, refresh, shown, api_name="show_dataset")
    c.resolution.change(view, refresh, shown, api_name=False)

    def on_pick(event: gr.SelectData, current: str):
        image = Path(event.value["image"]["path"]).name
        names = [n.strip() for n in (current or "").split(",") if n.strip()]
        names = [n for n in names if n != image] if image in names else [*names, image]
        return ", ".join(names)

    c.thumbs.select(on_pick, c.picked, c.picked, api_name=False)
    edits = {"name": None, "table": None}
    c.save.click(handler(services, save_captions, inputs=edits), [c.pick, c.table], c.status, api_name="save_captions").success(
        view, refresh, shown, api_name=False)  # fmt: skip
    c.do_replace.click(handler(services, replace_text, inputs={"name": None, "find": None, "replace": None}),
                       [c.pick, c.find, c.replace], c.status, api_name="replace_captions").success(
        view, refresh, shown, api_name=False)  # fmt: skip
    c.do_prepend.click(handler(services, prepend, inputs={"name": None, "trigger": None}), [c.pick, c.trigger], c.status,
                       api_name="prepend_trigger").success(view, refresh, shown, api_name=False)  # fmt: skip
    c.remove.click(handler(services, delete, inputs={"name": None, "picked": None}), [c.pick, c.picked], c.status,
                   api_name="delete_images").success(view, refresh, shown, api_name=False).success(
        lambda: "", None, c.picked, api_name=False)  # fmt: skip
