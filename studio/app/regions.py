"""The Generate tab's regions: rows of a table (x0, y0, x1, y1, prompt, LoRA, weight) to Regions and back,
and a picture of the boxes over the canvas.

    >>> rows = [[0, 0, 0.5, 1, "a red circle", "", 1], [0.5, 0, 1, 1, "", "", 1]]
    >>> [r.prompt for r in regions_from_rows(None, rows)]  # rows without a prompt are left out
    ['a red circle']
    >>> rows, pending = drawn_box(BLANK_ROWS, None, 64, 32)  # a first click on the canvas holds a corner
    >>> drawn_box(rows, pending, 192, 224)[0][0][:4]  # the second makes the box, in the first blank row
    [0.25, 0.12, 0.75, 0.88]
"""

from __future__ import annotations

from typing import Any

from PIL import Image, ImageDraw

from studio.core.errors import ConfigError

HEADERS = ["x0", "y0", "x1", "y1", "prompt", "LoRA", "weight"]
BLANK_ROWS = [[0, 0, 0.5, 1, "", "", 1.0], [0.5, 0, 1, 1, "", "", 1.0]]
CANVAS = 256  # the preview's side in pixels
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


def drawn_box(rows: Any, pending: Any, x: float, y: float, size: int = CANVAS) -> tuple[list[list], Any]:
    """A click at pixel (x, y) of the canvas: the first click holds a corner (returned as pending), the
    second makes the box between the two corners, in fractions of the image, as the first row still blank
    (no prompt, its box as the table starts) or as a new row. (rows, pending corner or None)."""
    corner = (min(max(x / size, 0.0), 1.0), min(max(y / size, 0.0), 1.0))
    if not pending:
        return _rows(rows), list(corner)
    (ax, ay), (bx, by) = pending, corner
    box = [round(min(ax, bx), 2), round(min(ay, by), 2), round(max(ax, bx), 2), round(max(ay, by), 2)]
    if box[2] - box[0] < 0.02 or box[3] - box[1] < 0.02:  # two clicks on one spot: start again from it
        return _rows(rows), list(corner)
    rows = _rows(rows)
    blanks = [b[:4] for b in BLANK_ROWS]
    for row in rows:
        if not _has_prompt(row) and [_number(v) for v in row[:4]] in blanks:
            row[:4] = box
            return rows, None
    return [*rows, [*box, "", "", 1.0]], None


def _number(value: Any) -> float | None:
    try:
        return float(value)
    except (TypeError, ValueError):
        return None


def preview(rows: Any, size: int = CANVAS, pending: Any = None) -> Image.Image:
    """The canvas with each region's box and prompt drawn on it (corners in 0-1, or pixels of a
    `size`-pixel image), and a cross at a drawn box's first corner while the second is awaited."""
    canvas = Image.new("RGB", (size, size), "#f4f4f4")
    draw = ImageDraw.Draw(canvas, "RGBA")
    if pending:
        x, y = pending[0] * size, pending[1] * size
        draw.line([(x - 8, y), (x + 8, y)], fill="#e4572e", width=2)
        draw.line([(x, y - 8), (x, y + 8)], fill="#e4572e", width=2)
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
