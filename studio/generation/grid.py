"""Comparison grids, as A1111's X/Y plot makes them: one image per (row, column) with the values written on
the edges, to judge a LoRA at several weights and seeds, or one LoRA against another.

    >>> grid = compose_grid([[a, b], [c, d]], rows=["seed 1", "seed 2"], columns=["weight 0.5", "weight 1"])
"""

from __future__ import annotations

from collections.abc import Sequence

from PIL import Image, ImageDraw, ImageFont

MARGIN_TOP, MARGIN_LEFT, PAD = 28, 120, 4
MIN_CELL = 160


def compose_grid(
    images: Sequence[Sequence[Image.Image]], rows: Sequence[str], columns: Sequence[str]
) -> Image.Image:
    """One picture of `images` (a list of rows), labelled with `rows` on the left and `columns` on top.
    Small images (the demo models' 64 px) are enlarged, pixels kept sharp, so the grid can be read."""
    images = [[_at_least(img, MIN_CELL) for img in row] for row in images]
    cell_w = max(img.width for row in images for img in row)
    cell_h = max(img.height for row in images for img in row)
    width = MARGIN_LEFT + len(columns) * (cell_w + PAD)
    height = MARGIN_TOP + len(rows) * (cell_h + PAD)
    canvas = Image.new("RGB", (width, height), (255, 255, 255))
    draw = ImageDraw.Draw(canvas)
    font = ImageFont.load_default()
    for j, label in enumerate(columns):
        draw.text((MARGIN_LEFT + j * (cell_w + PAD) + 2, 8), _fit(label, cell_w), fill=(0, 0, 0), font=font)
    for i, label in enumerate(rows):
        top = MARGIN_TOP + i * (cell_h + PAD)
        draw.text((4, top + cell_h // 2 - 6), _fit(label, MARGIN_LEFT - 8), fill=(0, 0, 0), font=font)
        for j, img in enumerate(images[i]):
            canvas.paste(img, (MARGIN_LEFT + j * (cell_w + PAD), top))
    return canvas


def _at_least(image: Image.Image, side: int) -> Image.Image:
    factor = -(-side // max(image.width, image.height))  # ceil
    if factor <= 1:
        return image
    return image.resize((image.width * factor, image.height * factor), Image.Resampling.NEAREST)


def _fit(text: str, pixels: int) -> str:
    """Cut a label to about the room it has (the default font is ~6 px a character)."""
    room = max(4, pixels // 6)
    return text if len(text) <= room else text[: room - 1] + "…"
