"""The Generate tab's regions: rows of a table (x0, y0, x1, y1, prompt, LoRA, weight) to Regions and back,
and a picture of the boxes over the canvas.

    >>> rows = [[0, 0, 0.5, 1, "a red circle", "", 1], [0.5, 0, 1, 1, "", "", 1]]
    >>> [r.prompt for r in regions_from_rows(None, rows)]  # rows without a prompt are left out
    ['a red circle']
"""

from __future__ import annotations

from typing import Any

from PIL import Image, ImageDraw

from studio.core.errors import ConfigError

HEADERS = ["x0", "y0", "x1", "y1", "prompt", "LoRA", "weight"]
BLANK_ROWS = [[0, 0, 0.5, 1, "", "", 1.0], [0.5, 0, 1, 1, "", "", 1.0]]
COLOURS = ["#e4572e", "#29335c", "#f3a712", "#669bbc", "#a8c686", "#8d6a9f"]


def _rows(rows: Any) -> list[list]:
    if rows is None:
        return []
    if hasattr(rows, "values") and hasattr(rows, "columns"):  # a pandas DataFrame
        rows = rows.values.tolist()
    return [list(r) for r in rows]


def _has_prompt(row: list) -> bool:
    return len(row) >= 5 and bool(str(row[4] or "").strip())


def _filled(rows: Any) -> list[list]:
    return [r for r in _rows(rows) if _has_prompt(r)]


def _pixel_box(row: list, size: int) -> list[float] | None:
    """A row's box on a `size`-pixel canvas (corners in 0-1, or pixels), or None when they are not numbers."""
    try:
        x0, y0, x1, y1 = (float(v) for v in row[:4])
    except (TypeError, ValueError):
        return None
    scale = size if max(x0, y0, x1, y1) <= 1 else 1
    return [x0 * scale, y0 * scale, x1 * scale - 1, y1 * scale - 1]


def _drawable(box: list[float] | None) -> bool:
    return box is not None and box[2] > box[0] and box[3] > box[1]


def regions_from_rows(ws, rows: Any) -> list:
    """Regions for the rows that have a prompt; LoRA files resolved inside the workspace."""
    from studio.generation.config import LoraSpec, Region

    out = []
    for n, row in enumerate(_filled(rows), start=1):
        try:
            box = tuple(float(v) for v in row[:4])
            weight = float(row[6]) if len(row) > 6 and str(row[6]).strip() not in ("", "None", "nan") else 1.0
        except (TypeError, ValueError):
            raise ConfigError(f"region row {n}: x0, y0, x1, y1 and weight must be numbers") from None
        lora = str(row[5] or "").strip() if len(row) > 5 else ""
        spec = LoraSpec(ws.resolve(lora), weight) if lora else None
        region = Region(box, str(row[4]).strip(), spec)  # type: ignore[arg-type]
        if max(box) <= 1:
            region.fractions(1, 1)  # a clear error for an empty or inverted box
        out.append(region)
    return out


def rows_from_record(regions: list[dict], ws_relative) -> list[list]:
    """Table rows for the regions of a generation record (LoRA paths as the workspace shows them)."""
    rows = []
    for r in regions:
        lora = r.get("lora") or {}
        path = ws_relative(lora["path"]) if lora else ""
        rows.append([*r["box"], r["prompt"], path, lora.get("weight", 1.0)])
    return rows or [list(row) for row in BLANK_ROWS]


def preview(rows: Any, size: int = 256) -> Image.Image:
    """The canvas with each region's box and prompt drawn on it (corners in 0-1, or pixels of a
    `size`-pixel image)."""
    canvas = Image.new("RGB", (size, size), "#f4f4f4")
    draw = ImageDraw.Draw(canvas, "RGBA")
    for row in _rows(rows):  # rows still without a prompt: a thin grey outline
        if len(row) >= 4 and not _has_prompt(row) and _drawable(box := _pixel_box(row, size)):
            draw.rectangle(box, outline="#b0b0b0", width=1)
    for n, row in enumerate(_filled(rows)):
        box = _pixel_box(row, size)
        if box is None:
            continue
        colour = COLOURS[n % len(COLOURS)]
        if _drawable(box):
            draw.rectangle(box, outline=colour, width=3, fill=colour + "33")
        label = f"{n + 1}. {str(row[4])[:28]}" + (
            " + LoRA" if len(row) > 5 and str(row[5] or "").strip() else ""
        )
        draw.text((box[0] + 5, box[1] + 5), label, fill=colour)
    return canvas
