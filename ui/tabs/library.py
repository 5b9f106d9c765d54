"""Library tab: every LoRA in the workspace with its family, kind, rank, blocks, trigger words and caption
tags, training settings, size and sample images; download it, use it in Generate, or delete it to the
trash (and restore it from there).
"""

from __future__ import annotations

import json

import gradio as gr

from studio.app.library import COLUMNS
from ui.forms import handler


def library_rows(services) -> list[list]:
    return [entry.row() for entry in services.library.entries()]


def details(services, path: str):
    """(description, sample images, the file to download) of one LoRA."""
    if not path:
        return "Click a LoRA in the list.", [], None
    entry = services.library.entry(path)
    if entry.error:
        return f"**{entry.name}** cannot be read: {entry.error}", [], None
    lines = [
        f"### {entry.name}",
        f"`{entry.path}` · {entry.family} · {', '.join(entry.kinds)} · rank {', '.join(map(str, entry.ranks)) or '-'}"
        f" · {entry.modules} modules · {entry.size_bytes / 2**20:.1f} MB",
        f"**Blocks:** {', '.join(entry.blocks) or '-'}",
    ]
    if entry.trigger:
        lines.append(f"**Trigger / prompt:** {entry.trigger}")
    if entry.words:
        vectors = ", ".join(f"`{w}` ({n} vector{'s' * (n > 1)})" for w, n in entry.words.items())
        lines.append(
            f"**Learnt words:** {vectors}: bundled in the file, they work where the prompt says them"
        )
    if entry.tags:
        lines.append("**Caption tags:** " + ", ".join(f"{t} ({n})" for t, n in entry.tags))
    if entry.training:
        lines.append("**Trained with:** `" + json.dumps(entry.training) + "`")
    samples = [(p, p.rsplit("/", 1)[-1]) for p in entry.samples[:24]]
    return "\n\n".join(lines), samples, str(services.workspace.root / entry.path)


def delete(services, path: str) -> str:
    if not path:
        raise gr.Error("click a LoRA in the list first")
    item = services.library.delete(path)
    return f"moved {path} to the trash ({item}); restore it below"


def trash_rows(services) -> list[list]:
    return [[item, original] for item, original in services.library.trash_items()]


def restore(services, item: str) -> str:
    if not item:
        raise gr.Error("click an item of the trash first")
    return f"restored {services.library.restore(item)}"


def build(services, tabs: gr.Tabs, generate: dict) -> gr.Dataframe:
    """The tab; returns its table (the page refreshes it when the workspace changes)."""
    with gr.Tab("Library", id="library") as tab:
        with gr.Row():
            with gr.Column(scale=3):
                table = gr.Dataframe(headers=COLUMNS, value=library_rows(services), interactive=False,
                                     label="LoRAs of this workspace (click one)", elem_id="library-table")  # fmt: skip
                picked = gr.Textbox(label="LoRA", interactive=False, elem_id="library-picked")
                with gr.Row():
                    use = gr.Button("Use in Generate", variant="primary")
                    remove = gr.Button("Delete (to the trash)", variant="stop")
                status = gr.Markdown(elem_id="library-status")
            with gr.Column(scale=2):
                about = gr.Markdown("Click a LoRA in the list.", elem_id="library-details")
                download = gr.File(label="Download", interactive=False)
                samples = gr.Gallery(label="Its sample images", columns=4, height=240, fit_columns=False)
        with gr.Accordion("Trash", open=False) as trash_box:
            trash = gr.Dataframe(headers=["item", "was"], interactive=False, label="Deleted LoRAs")
            item = gr.Textbox(label="Item", interactive=False)
            put_back = gr.Button("Restore")

        def on_select(event: gr.SelectData):
            row = event.row_value or []
            return row[1] if len(row) > 1 else ""

        def first_cell(event: gr.SelectData):
            return (event.row_value or [""])[0]

        listing = handler(services, library_rows)
        table.select(on_select, None, picked, api_name=False)
        picked.change(handler(services, details, inputs={"path": None}), picked, [about, samples, download],
                      api_name="lora_details")  # fmt: skip
        tab.select(listing, None, table, api_name="library", show_progress="hidden")

        def use_in_generate(path: str, stack: list | None):
            if not path:
                raise gr.Error("click a LoRA in the list first")
            stack = [*(stack or [])]
            return (stack if path in stack else [*stack, path]), gr.Tabs(selected="generate")

        use.click(use_in_generate, [picked, generate["loras"]], [generate["loras"], tabs], api_name=False)
        remove.click(
            handler(services, delete, inputs={"path": None}), picked, status, api_name="delete_lora"
        ).success(listing, None, table, api_name=False).success(
            handler(services, trash_rows), None, trash, api_name=False
        )
        trash_box.expand(handler(services, trash_rows), None, trash, api_name="trash")
        trash.select(first_cell, None, item, api_name=False)
        put_back.click(
            handler(services, restore, inputs={"item": None}), item, status, api_name="restore_lora"
        ).success(listing, None, table, api_name=False).success(
            handler(services, trash_rows), None, trash, api_name=False
        )
    return table
