"""Drawing the demo world: shape outlines, fill patterns and one shape painted on a canvas.

Sizes are in pixels of a 64 px image (`unit` = one such pixel on the canvas), so a 128 px world draws the same
designs at twice the detail.
"""

from __future__ import annotations

import math

from PIL import Image, ImageDraw

from studio.core.errors import ConfigError


def mix(a: tuple[int, int, int], b: tuple[int, int, int], t: float) -> tuple[int, int, int]:
    return tuple(round(x * (1 - t) + y * t) for x, y in zip(a, b))  # type: ignore[return-value]


def contrast_shade(rgb: tuple[int, int, int]) -> tuple[int, int, int]:
    """The second colour of a striped/dotted fill: lighter for dark colours, darker for light ones."""
    luminance = (0.299 * rgb[0] + 0.587 * rgb[1] + 0.114 * rgb[2]) / 255
    return mix(rgb, (255, 255, 255), 0.6) if luminance < 0.55 else mix(rgb, (0, 0, 0), 0.5)


def pattern(style: str, fg: tuple[int, int, int], big: int, unit: float) -> Image.Image:
    """A `big` x `big` fill pattern for striped (diagonal bands) or dotted (grid of dots) shapes."""
    shade = contrast_shade(fg)
    pattern = Image.new("RGB", (big, big), fg)
    draw = ImageDraw.Draw(pattern)
    if style == "striped":
        period, band = 20 * unit, 10 * unit  # coarser than a latent cell (8 px): the demo VAE keeps it
        k = -big
        while k < big:
            draw.polygon([(k, 0), (k + band, 0), (k + band + big, big), (k + big, big)], fill=shade)
            k += period
    else:
        spacing, radius = 16 * unit, 4.5 * unit
        y = spacing / 2
        while y < big:
            x = spacing / 2
            while x < big:
                draw.ellipse([x - radius, y - radius, x + radius, y + radius], fill=shade)
                x += spacing
            y += spacing
    return pattern


def shape_polygon(
    shape: str, cx: float, cy: float, r: float, angle: float = 0.0
) -> list[tuple[float, float]]:
    """The outline of `shape` centred at (cx, cy) with circumradius about `r`, rotated by `angle` degrees."""
    if shape not in _OUTLINES:
        raise ConfigError(f"Unknown shape {shape!r}.")
    c, s = math.cos(math.radians(angle)), math.sin(math.radians(angle))
    return [(cx + r * (x * c - y * s), cy + r * (x * s + y * c)) for x, y in _OUTLINES[shape]()]


def _star() -> list[tuple[float, float]]:
    rads = [1.0 if i % 2 == 0 else 0.42 for i in range(10)]
    return [
        (rad * math.cos(t - math.pi / 2), rad * math.sin(t - math.pi / 2) + 0.08)
        for rad, t in zip(rads, _turns(10))
    ]


def _heart() -> list[tuple[float, float]]:
    pts = []
    for t in _turns(64):
        x = 16 * math.sin(t) ** 3
        y = 13 * math.cos(t) - 5 * math.cos(2 * t) - 2 * math.cos(3 * t) - math.cos(4 * t)
        pts.append((x / 17.0, -y / 17.0 - 0.05))
    return pts


def _moon() -> list[tuple[float, float]]:
    """A crescent: the outer circle's far arc, then the inner circle's arc back (circles meet at +-58 deg)."""
    outer = [(math.cos(t), math.sin(t)) for t in _span(math.radians(58), math.radians(302), 48)]
    inner = [
        (0.5 + 0.85 * math.cos(t), 0.85 * math.sin(t)) for t in _span(math.radians(272), math.radians(88), 40)
    ]
    return [(x + 0.25, y) for x, y in outer + inner]


_A, _B = 0.3, 0.9  # the cross's half width and half length
# each shape's outline around (0, 0) with circumradius about 1, before scaling and rotating
_OUTLINES = {
    "circle": lambda: [(math.cos(t), math.sin(t)) for t in _turns(64)],
    "square": lambda: [(-0.78, -0.78), (0.78, -0.78), (0.78, 0.78), (-0.78, 0.78)],
    "diamond": lambda: [(0, -1.0), (0.72, 0), (0, 1.0), (-0.72, 0)],
    "triangle": lambda: [(math.cos(t - math.pi / 2), math.sin(t - math.pi / 2) + 0.15) for t in _turns(3)],
    "star": _star,
    "cross": lambda: [
        (-_A, -_B),
        (_A, -_B),
        (_A, -_A),
        (_B, -_A),
        (_B, _A),
        (_A, _A),
        (_A, _B),
        (-_A, _B),
        (-_A, _A),
        (-_B, _A),
        (-_B, -_A),
        (-_A, -_A),
    ],  # fmt: skip
    "heart": _heart,
    "arrow": lambda: [
        (-0.95, -0.22),
        (0.1, -0.22),
        (0.1, -0.6),
        (0.95, 0),
        (0.1, 0.6),
        (0.1, 0.22),
        (-0.95, 0.22),
    ],
    "bolt": lambda: [
        (0.2, -1.0),
        (-0.55, 0.12),
        (-0.05, 0.12),
        (-0.25, 1.0),
        (0.55, -0.2),
        (0.05, -0.2),
        (0.35, -1.0),
    ],
    "moon": _moon,
}


def _turns(n: int) -> list[float]:
    return [2 * math.pi * i / n for i in range(n)]


def _span(a: float, b: float, n: int) -> list[float]:
    return [a + (b - a) * i / (n - 1) for i in range(n)]


def paint_shape(
    canvas: Image.Image,
    points: list[tuple[float, float]],
    style: str,
    fg: tuple[int, int, int],
    bg: tuple[int, int, int],
    unit: float,
) -> None:
    """Paint one shape (its outline `points`) in `style` onto `canvas`: fill, outline, shadow or pattern."""
    draw = ImageDraw.Draw(canvas)
    if style == "shadowed":
        offset = 3.0 * unit
        draw.polygon([(x + offset, y + offset) for x, y in points], fill=mix(bg, (0, 0, 0), 0.55))
    if style == "outlined":
        draw.polygon(points, outline=fg, width=round(3.5 * unit))
    elif style in ("striped", "dotted"):
        mask = Image.new("L", canvas.size, 0)
        ImageDraw.Draw(mask).polygon(points, fill=255)
        canvas.paste(pattern(style, fg, max(canvas.size), unit).crop((0, 0, *canvas.size)), (0, 0), mask)
    else:
        draw.polygon(points, fill=fg)


def paint_frame(canvas: Image.Image, fg: tuple[int, int, int], unit: float) -> None:
    """The "framed" style: a border round the whole picture."""
    width, height = canvas.size
    ImageDraw.Draw(canvas).rectangle([0, 0, width - 1, height - 1], outline=fg, width=round(5 * unit))
