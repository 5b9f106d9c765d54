"""A procedural image world: coloured shapes on coloured backgrounds, in a few styles, with captions.

Every image comes from a `Spec` (shape, colour, background, style, position, size) and every list of specs
comes from a seed, so the same seed always gives the same images. The built-in demo models are trained on
the "base" part of the world; some shapes and some styles are kept out of it on purpose: they are the new
subjects and new styles that LoRAs learn later, and the judges in `studio.demo.classifiers` know all of them.

    >>> from studio.demo.world import WORLD
    >>> specs = WORLD.sample(seed=0, n=4, split="base")
    >>> image = WORLD.render(specs[0])          # 64x64 RGB PIL image
    >>> WORLD.caption(specs[0])                 # e.g. "a red circle on a blue background"

Splits: "base" (base shapes x base styles), "holdout_subject" (held-out shapes, base styles),
"holdout_style" (base shapes, held-out styles) and "all".
"""

from __future__ import annotations

import math
import random
from dataclasses import dataclass
from typing import Literal

from PIL import Image, ImageDraw

from studio.core.errors import ConfigError

Split = Literal["base", "holdout_subject", "holdout_style", "all"]
SPLITS: tuple[str, ...] = ("base", "holdout_subject", "holdout_style", "all")

BASE_SHAPES: tuple[str, ...] = ("circle", "square", "triangle", "star", "cross", "diamond")
HOLDOUT_SHAPES: tuple[str, ...] = ("heart", "moon")
# The 128 px world holds two more subjects out, so that merges of 3 to 5 concepts can be measured.
HOLDOUT_SHAPES_128: tuple[str, ...] = HOLDOUT_SHAPES + ("arrow", "bolt")
SHAPES: tuple[str, ...] = BASE_SHAPES + HOLDOUT_SHAPES
ALL_SHAPES: tuple[str, ...] = BASE_SHAPES + HOLDOUT_SHAPES_128  # what render() can draw

COLOUR_RGB: dict[str, tuple[int, int, int]] = {
    "red": (220, 40, 40),
    "orange": (245, 140, 30),
    "yellow": (240, 220, 40),
    "green": (40, 170, 60),
    "blue": (40, 80, 220),
    "purple": (140, 60, 190),
    "white": (245, 245, 245),
    "black": (20, 20, 20),
}
COLOURS: tuple[str, ...] = tuple(COLOUR_RGB)
BACKGROUNDS: tuple[str, ...] = COLOURS  # plain backgrounds use the same palette (never the shape's colour)

BASE_STYLES: tuple[str, ...] = ("flat", "outlined", "shadowed")
HOLDOUT_STYLES: tuple[str, ...] = ("striped", "dotted", "pixel", "framed")
STYLES: tuple[str, ...] = BASE_STYLES + HOLDOUT_STYLES

ATTRIBUTES: dict[str, tuple[str, ...]] = {
    "shape": SHAPES,
    "colour": COLOURS,
    "background": BACKGROUNDS,
    "style": STYLES,
}

IMAGE_SIZE = 64  # the built-in world; World(image_size=128) draws the same designs at twice the detail
UNIT = 64  # style sizes (outline width, stripe period...) are given in pixels of a 64 px image
SUPERSAMPLE = 4  # draw at 4x and downsample, for smooth edges


@dataclass(frozen=True)
class Spec:
    """Everything needed to draw one image. Positions and sizes are fractions of the image side."""

    shape: str
    colour: str
    background: str
    style: str
    cx: float = 0.5  # centre x
    cy: float = 0.5  # centre y
    size: float = 0.28  # radius of the shape's circumscribed circle
    angle: float = 0.0  # rotation in degrees (kept small so a square stays a square)

    def attributes(self) -> dict[str, str]:
        """The four judged attributes of this image."""
        return {
            "shape": self.shape,
            "colour": self.colour,
            "background": self.background,
            "style": self.style,
        }


@dataclass(frozen=True)
class Sample:
    """One rendered example: the image, its caption and the spec it was drawn from."""

    image: Image.Image
    caption: str
    spec: Spec


@dataclass(frozen=True)
class World:
    """The vocabularies, which parts are held out, and how images and captions are made."""

    base_shapes: tuple[str, ...] = BASE_SHAPES
    holdout_shapes: tuple[str, ...] = HOLDOUT_SHAPES
    base_styles: tuple[str, ...] = BASE_STYLES
    holdout_styles: tuple[str, ...] = HOLDOUT_STYLES
    colours: tuple[str, ...] = COLOURS
    backgrounds: tuple[str, ...] = BACKGROUNDS
    size_range: tuple[float, float] = (0.22, 0.34)
    jitter: float = 0.12  # how far the centre may move from the middle
    image_size: int = IMAGE_SIZE

    @property
    def shapes(self) -> tuple[str, ...]:
        return self.base_shapes + self.holdout_shapes

    @property
    def styles(self) -> tuple[str, ...]:
        return self.base_styles + self.holdout_styles

    def attributes(self) -> dict[str, tuple[str, ...]]:
        """What the judges of this world tell apart: every shape, colour, background and style."""
        return {
            "shape": self.shapes,
            "colour": self.colours,
            "background": self.backgrounds,
            "style": self.styles,
        }

    # ---------------------------------------------------------------- specs
    def split_vocab(self, split: str) -> tuple[tuple[str, ...], tuple[str, ...]]:
        """(shapes, styles) allowed in a split."""
        if split == "base":
            return self.base_shapes, self.base_styles
        if split == "holdout_subject":
            return self.holdout_shapes, self.base_styles
        if split == "holdout_style":
            return self.base_shapes, self.holdout_styles
        if split == "all":
            return self.shapes, self.styles
        raise ConfigError(f"Unknown world split {split!r}; choose one of {', '.join(SPLITS)}.")

    def random_spec(
        self,
        rng: random.Random,
        shapes: tuple[str, ...],
        styles: tuple[str, ...],
        colours: tuple[str, ...] | None = None,
        backgrounds: tuple[str, ...] | None = None,
    ) -> Spec:
        """Draw one spec from `rng`; the shape colour is never the background colour."""
        shape = rng.choice(shapes)
        colour = rng.choice(colours or self.colours)
        background = rng.choice([b for b in (backgrounds or self.backgrounds) if b != colour])
        style = rng.choice(styles)
        size = rng.uniform(*self.size_range)
        cx = 0.5 + rng.uniform(-self.jitter, self.jitter)
        cy = 0.5 + rng.uniform(-self.jitter, self.jitter)
        angle = rng.uniform(-12.0, 12.0) if shape not in ("circle",) else 0.0
        return Spec(
            shape, colour, background, style, round(cx, 4), round(cy, 4), round(size, 4), round(angle, 2)
        )

    def sample(self, seed: int, n: int, split: str = "base") -> list[Spec]:
        """`n` specs from `split`; the same (seed, n, split) always gives the same list."""
        shapes, styles = self.split_vocab(split)
        rng = random.Random(f"world:{split}:{seed}")
        return [self.random_spec(rng, shapes, styles) for _ in range(n)]

    # ---------------------------------------------------------------- captions
    def caption(self, spec: Spec, subject: str | None = None, style_word: str | None = None) -> str:
        """The canonical caption: "a red circle on a blue background" (+ ", striped style" unless flat).

        `subject` replaces "<colour> <shape>" (DreamBooth: "sks shape"); `style_word` replaces the style name.
        """
        thing = subject if subject is not None else f"{spec.colour} {spec.shape}"
        text = f"a {thing} on a {spec.background} background"
        if style_word is not None:
            text += f", {style_word} style"
        elif spec.style != "flat":
            text += f", {spec.style} style"
        return text

    def caption_variant(self, spec: Spec, rng: random.Random) -> str:
        """A training caption: the canonical one most of the time, otherwise with parts left out.

        Leaving parts out teaches the model what each word controls and gives it the class noun "shape".
        """
        colour = "" if rng.random() < 0.15 else f"{spec.colour} "
        shape = "shape" if rng.random() < 0.1 else spec.shape
        text = f"a {colour}{shape}"
        if rng.random() >= 0.15:
            text += f" on a {spec.background} background"
        if spec.style != "flat" or rng.random() < 0.2:
            text += f", {spec.style} style"
        return text

    # ---------------------------------------------------------------- rendering
    def render(self, spec: Spec, size: int | None = None) -> Image.Image:
        """Draw `spec` as a `size` x `size` RGB image (default: the world's image size)."""
        size = size or self.image_size
        for name, value, allowed in (
            ("shape", spec.shape, ALL_SHAPES),
            ("colour", spec.colour, COLOURS),
            ("background", spec.background, BACKGROUNDS),
            ("style", spec.style, STYLES),
        ):
            if value not in allowed:
                raise ConfigError(f"Unknown {name} {value!r}; choose one of {', '.join(allowed)}.")
        big = size * SUPERSAMPLE
        fg, bg = COLOUR_RGB[spec.colour], COLOUR_RGB[spec.background]
        canvas = Image.new("RGB", (big, big), bg)
        points = shape_polygon(spec.shape, spec.cx * big, spec.cy * big, spec.size * big, spec.angle)
        draw = ImageDraw.Draw(canvas)
        unit = big / UNIT  # one pixel of a 64 px image
        if spec.style == "shadowed":
            offset = 3.0 * unit
            shadow = [(x + offset, y + offset) for x, y in points]
            draw.polygon(shadow, fill=_mix(bg, (0, 0, 0), 0.55))
        if spec.style == "framed":  # a border round the whole picture, in the shape's colour
            width = round(5 * unit)
            draw.rectangle([0, 0, big - 1, big - 1], outline=fg, width=width)
        if spec.style == "outlined":
            draw.polygon(points, outline=fg, width=round(3.5 * unit))
        elif spec.style in ("striped", "dotted"):
            mask = Image.new("L", (big, big), 0)
            ImageDraw.Draw(mask).polygon(points, fill=255)
            canvas.paste(_pattern(spec.style, fg, big, unit), (0, 0), mask)
        else:
            draw.polygon(points, fill=fg)
        image = canvas.resize((size, size), Image.Resampling.BOX)
        if spec.style == "pixel":
            cells = UNIT // 4  # 16 cells across at any image size
            image = image.resize((cells, cells), Image.Resampling.BOX).resize(
                (size, size), Image.Resampling.NEAREST
            )
        return image

    def render_samples(self, specs: list[Spec]) -> list[Sample]:
        """Render specs with their canonical captions."""
        return [Sample(self.render(s), self.caption(s), s) for s in specs]

    # ---------------------------------------------------------------- LoRA training sets
    def dreambooth_set(
        self,
        n: int = 8,
        seed: int = 0,
        shape: str = "heart",
        colour: str = "red",
        token: str = "sks",
        class_noun: str = "shape",
    ) -> list[Sample]:
        """A DreamBooth instance set: one subject (a held-out shape in one colour, flat) on varied backgrounds.

        Captions read "a sks shape on a blue background"; the matching class prompt is `class_prompt(...)`.
        """
        rng = random.Random(f"dreambooth:{shape}:{colour}:{seed}")
        specs = [self.random_spec(rng, (shape,), ("flat",), colours=(colour,)) for _ in range(n)]
        return [Sample(self.render(s), self.caption(s, subject=f"{token} {class_noun}"), s) for s in specs]

    @staticmethod
    def class_prompt(background: str, class_noun: str = "shape") -> str:
        """The prior-preservation prompt matching `dreambooth_set` captions."""
        return f"a {class_noun} on a {background} background"

    def style_set(
        self, style: str = "striped", n: int = 8, seed: int = 0, token: str | None = None
    ) -> list[Sample]:
        """A style set: base shapes in one (usually held-out) style.

        Captions end in ", striped style", or ", sks style" when `token` is given.
        """
        if style not in STYLES:
            raise ConfigError(f"Unknown style {style!r}; choose one of {', '.join(STYLES)}.")
        rng = random.Random(f"style:{style}:{seed}")
        specs = [self.random_spec(rng, self.base_shapes, (style,)) for _ in range(n)]
        return [Sample(self.render(s), self.caption(s, style_word=token), s) for s in specs]


def _mix(a: tuple[int, int, int], b: tuple[int, int, int], t: float) -> tuple[int, int, int]:
    return tuple(round(x * (1 - t) + y * t) for x, y in zip(a, b))  # type: ignore[return-value]


def contrast_shade(rgb: tuple[int, int, int]) -> tuple[int, int, int]:
    """The second colour of a striped/dotted fill: lighter for dark colours, darker for light ones."""
    luminance = (0.299 * rgb[0] + 0.587 * rgb[1] + 0.114 * rgb[2]) / 255
    return _mix(rgb, (255, 255, 255), 0.6) if luminance < 0.55 else _mix(rgb, (0, 0, 0), 0.5)


def _pattern(style: str, fg: tuple[int, int, int], big: int, unit: float) -> Image.Image:
    """A full-canvas fill pattern for striped (diagonal bands) or dotted (grid of dots) shapes."""
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
    if shape == "circle":
        pts = [(math.cos(t), math.sin(t)) for t in _turns(64)]
    elif shape == "square":
        s = 0.78
        pts = [(-s, -s), (s, -s), (s, s), (-s, s)]
    elif shape == "diamond":
        pts = [(0, -1.0), (0.72, 0), (0, 1.0), (-0.72, 0)]
    elif shape == "triangle":
        pts = [(math.cos(t - math.pi / 2), math.sin(t - math.pi / 2) + 0.15) for t in _turns(3)]
    elif shape == "star":
        pts = []
        for i, t in enumerate(_turns(10)):
            rad = 1.0 if i % 2 == 0 else 0.42
            pts.append((rad * math.cos(t - math.pi / 2), rad * math.sin(t - math.pi / 2) + 0.08))
    elif shape == "cross":
        a, b = 0.3, 0.9
        pts = [
            (-a, -b),
            (a, -b),
            (a, -a),
            (b, -a),
            (b, a),
            (a, a),
            (a, b),
            (-a, b),
            (-a, a),
            (-b, a),
            (-b, -a),
            (-a, -a),
        ]
    elif shape == "heart":
        pts = []
        for t in _turns(64):
            x = 16 * math.sin(t) ** 3
            y = 13 * math.cos(t) - 5 * math.cos(2 * t) - 2 * math.cos(3 * t) - math.cos(4 * t)
            pts.append((x / 17.0, -y / 17.0 - 0.05))
    elif shape == "arrow":  # pointing right: a shaft and a head
        pts = [(-0.95, -0.22), (0.1, -0.22), (0.1, -0.6), (0.95, 0), (0.1, 0.6), (0.1, 0.22), (-0.95, 0.22)]
    elif shape == "bolt":  # a lightning bolt
        pts = [
            (0.2, -1.0),
            (-0.55, 0.12),
            (-0.05, 0.12),
            (-0.25, 1.0),
            (0.55, -0.2),
            (0.05, -0.2),
            (0.35, -1.0),
        ]
    elif shape == "moon":
        # a crescent: the outer circle's far arc, then the inner circle's arc back (circles meet at +-58 deg)
        outer = [(math.cos(t), math.sin(t)) for t in _span(math.radians(58), math.radians(302), 48)]
        inner = [
            (0.5 + 0.85 * math.cos(t), 0.85 * math.sin(t))
            for t in _span(math.radians(272), math.radians(88), 40)
        ]
        pts = [(x + 0.25, y) for x, y in outer + inner]
    else:
        raise ConfigError(f"Unknown shape {shape!r}; choose one of {', '.join(ALL_SHAPES)}.")
    c, s = math.cos(math.radians(angle)), math.sin(math.radians(angle))
    return [(cx + r * (x * c - y * s), cy + r * (x * s + y * c)) for x, y in pts]


def _turns(n: int) -> list[float]:
    return [2 * math.pi * i / n for i in range(n)]


def _span(a: float, b: float, n: int) -> list[float]:
    return [a + (b - a) * i / (n - 1) for i in range(n)]


WORLD = World()
WORLD_128 = World(holdout_shapes=HOLDOUT_SHAPES_128, image_size=128)
WORLDS = {64: WORLD, 128: WORLD_128}


def world_for(image_size: int) -> World:
    """The demo world drawn at `image_size` pixels (64: the built-in models, 128: the larger world)."""
    if image_size not in WORLDS:
        raise ConfigError(f"no demo world at {image_size} px; choose {' or '.join(map(str, WORLDS))}")
    return WORLDS[image_size]
