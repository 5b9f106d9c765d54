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

import random
from dataclasses import dataclass, replace
from typing import Literal

from PIL import Image

from studio.core.errors import ConfigError
from studio.demo.drawing import paint_frame, paint_shape, shape_polygon

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
class Pair:
    """Two shapes side by side on one background, in one style: what a prompt with "on the left" and "on
    the right" draws (the 128 px world's base model learns positions from these)."""

    left: Spec
    right: Spec

    @property
    def background(self) -> str:
        return self.left.background

    @property
    def style(self) -> str:
        return self.left.style


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
    pair_share: float = 0.0  # share of `sample`'s scenes that are a Pair (two shapes, left and right)
    pair_size_range: tuple[float, float] = (0.13, 0.19)

    @property
    def shapes(self) -> tuple[str, ...]:
        return self.base_shapes + self.holdout_shapes

    @property
    def styles(self) -> tuple[str, ...]:
        return self.base_styles + self.holdout_styles

    def singles(self) -> World:
        """This world without its two-shape scenes: scenes whose every attribute one judge can read."""
        return replace(self, pair_share=0.0)

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

    def random_pair(self, rng: random.Random, shapes: tuple[str, ...], styles: tuple[str, ...]) -> Pair:
        """Two shapes (colours differ from each other and from the background), one in each half."""
        colour_a, colour_b = rng.sample(self.colours, 2)
        background = rng.choice([b for b in self.backgrounds if b not in (colour_a, colour_b)])
        style = rng.choice(styles)
        sides = []
        for colour, cx in ((colour_a, 0.25), (colour_b, 0.75)):
            shape = rng.choice(shapes)
            angle = rng.uniform(-12.0, 12.0) if shape != "circle" else 0.0
            sides.append(Spec(shape, colour, background, style, round(cx + rng.uniform(-0.04, 0.04), 4),
                              round(0.5 + rng.uniform(-0.1, 0.1), 4), round(rng.uniform(*self.pair_size_range), 4),
                              round(angle, 2)))  # fmt: skip
        return Pair(*sides)

    def sample(self, seed: int, n: int, split: str = "base") -> list[Spec | Pair]:
        """`n` scenes from `split` (a share `pair_share` of them Pairs); the same (seed, n, split) always
        gives the same list."""
        shapes, styles = self.split_vocab(split)
        rng = random.Random(f"world:{split}:{seed}")
        pairs = random.Random(f"pairs:{split}:{seed}")  # a world without pairs draws exactly as before
        return [
            self.random_pair(rng, shapes, styles) if pairs.random() < self.pair_share
            else self.random_spec(rng, shapes, styles)
            for _ in range(n)
        ]  # fmt: skip

    # ---------------------------------------------------------------- captions
    def caption(self, spec: Spec | Pair, subject: str | None = None, style_word: str | None = None) -> str:
        """The canonical caption: "a red circle on a blue background" (+ ", striped style" unless flat);
        a Pair: "a red circle on the left and a blue star on the right, on a green background".

        `subject` replaces "<colour> <shape>" (DreamBooth: "sks shape"); `style_word` replaces the style name.
        """
        if isinstance(spec, Pair):
            thing = f"{spec.left.colour} {spec.left.shape} on the left and a {spec.right.colour} {spec.right.shape} on the right,"
        else:
            thing = subject if subject is not None else f"{spec.colour} {spec.shape}"
        text = f"a {thing} on a {spec.background} background"
        if style_word is not None:
            text += f", {style_word} style"
        elif spec.style != "flat":
            text += f", {spec.style} style"
        return text

    def caption_variant(self, spec: Spec | Pair, rng: random.Random) -> str:
        """A training caption: the canonical one most of the time, otherwise with parts left out.

        Leaving parts out teaches the model what each word controls and gives it the class noun "shape";
        a Pair's two sides come in either order.
        """
        if isinstance(spec, Pair):
            sides = [(spec.left, "left"), (spec.right, "right")]
            if rng.random() < 0.5:
                sides.reverse()
            things = [f"a {self._thing(one, rng)} on the {where}" for one, where in sides]
            text = " and ".join(things)
            text += f", on a {spec.background} background" if rng.random() >= 0.15 else ""
        else:
            text = f"a {self._thing(spec, rng)}"
            if rng.random() >= 0.15:
                text += f" on a {spec.background} background"
        if spec.style != "flat" or rng.random() < 0.2:
            text += f", {spec.style} style"
        return text

    @staticmethod
    def _thing(spec: Spec, rng: random.Random) -> str:
        colour = "" if rng.random() < 0.15 else f"{spec.colour} "
        shape = "shape" if rng.random() < 0.1 else spec.shape
        return f"{colour}{shape}"

    # ---------------------------------------------------------------- rendering
    def render(self, spec: Spec | Pair, size: int | tuple[int, int] | None = None) -> Image.Image:
        """Draw `spec` (one shape, or a Pair side by side) as a `size` x `size` RGB image (default: the
        world's image size), or a (width, height) one: positions are fractions of each side, a shape's size
        and the style's strokes scale with the shorter side (a picture of another aspect, as a size bucket)."""
        width, height = (size, size) if isinstance(size, int) else size or (self.image_size,) * 2
        shapes = [spec.left, spec.right] if isinstance(spec, Pair) else [spec]
        for one in shapes:
            for name, value, allowed in (
                ("shape", one.shape, ALL_SHAPES),
                ("colour", one.colour, COLOURS),
                ("background", one.background, BACKGROUNDS),
                ("style", one.style, STYLES),
            ):
                if value not in allowed:
                    raise ConfigError(f"Unknown {name} {value!r}; choose one of {', '.join(allowed)}.")
        big_w, big_h = width * SUPERSAMPLE, height * SUPERSAMPLE
        short = min(big_w, big_h)
        bg = COLOUR_RGB[shapes[0].background]
        canvas = Image.new("RGB", (big_w, big_h), bg)
        unit = short / UNIT  # one pixel of a 64 px image
        if shapes[0].style == "framed":  # a border round the whole picture, in the (first) shape's colour
            paint_frame(canvas, COLOUR_RGB[shapes[0].colour], unit)
        for one in shapes:
            points = shape_polygon(one.shape, one.cx * big_w, one.cy * big_h, one.size * short, one.angle)
            paint_shape(canvas, points, one.style, COLOUR_RGB[one.colour], bg, unit)
        image = canvas.resize((width, height), Image.Resampling.BOX)
        if shapes[0].style == "pixel":
            cell = min(width, height) / (UNIT // 4)  # 16 cells across the shorter side at any size
            cells = (max(1, round(width / cell)), max(1, round(height / cell)))
            image = image.resize(cells, Image.Resampling.BOX).resize(
                (width, height), Image.Resampling.NEAREST
            )
        return image

    @staticmethod
    def pair_halves(image: Image.Image) -> tuple[Image.Image, Image.Image]:
        """The left and right side of a two-shape scene as square crops (the middle half of each side's
        height), where each side's shape is as large as a one-shape scene's: what the judges read per side."""
        w, h = image.size
        top, bottom = h // 4, h - h // 4
        return image.crop((0, top, w // 2, bottom)), image.crop((w - w // 2, top, w, bottom))

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
        beside: float = 0.0,
        background: str = "",
    ) -> list[Sample]:
        """A DreamBooth instance set: one subject (a held-out shape in one colour, flat) on varied backgrounds,
        or all on `background`.

        Captions read "a sks shape on a blue background"; the matching class prompt is `class_prompt(...)`.
        With `beside`, that share of the images shows the subject on one side of a two-shape scene, next to a
        base shape: "a sks shape on the left and a green star on the right, on a blue background".
        """
        rng = random.Random(f"dreambooth:{shape}:{colour}:{seed}")
        name = f"{token} {class_noun}"
        samples = []
        for _ in range(n):
            if beside and rng.random() < beside:  # no draw without `beside`: the plain sets stay as they were
                scene = self.subject_beside(rng, shape, colour)
                caption = self.caption(scene).replace(f"{colour} {shape}", name)
                subject = scene.left if scene.left.shape == shape else scene.right
                samples.append(Sample(self.render(scene), caption, subject))
            else:
                only = (background,) if background else None
                spec = self.random_spec(rng, (shape,), ("flat",), colours=(colour,), backgrounds=only)
                samples.append(Sample(self.render(spec), self.caption(spec, subject=name), spec))
        return samples

    def subject_beside(self, rng: random.Random, shape: str, colour: str) -> Pair:
        """A flat two-shape scene: the subject on a random side, a base shape in another colour on the other."""
        places = self.random_pair(rng, self.base_shapes, ("flat",))
        other = rng.choice([c for c in self.colours if c != colour])
        background = rng.choice([b for b in self.backgrounds if b not in (colour, other)])
        one = replace(places.left, shape=shape, colour=colour, background=background)
        two = replace(places.right, colour=other, background=background)
        if rng.random() < 0.5:  # the subject on the right: each shape at the other's place
            one, two = replace(two, cx=one.cx, cy=one.cy), replace(one, cx=two.cx, cy=two.cy)
        return Pair(one, two)

    @staticmethod
    def class_prompt(background: str, class_noun: str = "shape") -> str:
        """The prior-preservation prompt matching `dreambooth_set` captions."""
        return f"a {class_noun} on a {background} background"

    def scene_set(self, n: int = 8, seed: int = 4242) -> list[Sample]:
        """Plain scenes of the base split with their canonical captions: a regularisation set for style
        LoRAs (images like those the base model draws, none in a held-out style)."""
        return [Sample(self.render(s), self.caption(s), s) for s in self.sample(seed, n, "base")]

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


WORLD = World()
# The larger world: 16 x 16 latents, four held-out subjects, and a third of its scenes Pairs (positions)
WORLD_128 = World(holdout_shapes=HOLDOUT_SHAPES_128, image_size=128, pair_share=0.3)
WORLDS = {64: WORLD, 128: WORLD_128}


def world_for(image_size: int) -> World:
    """The demo world drawn at `image_size` pixels (64: the built-in models, 128: the larger world)."""
    if image_size not in WORLDS:
        raise ConfigError(f"no demo world at {image_size} px; choose {' or '.join(map(str, WORLDS))}")
    return WORLDS[image_size]
