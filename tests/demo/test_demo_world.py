"""The demo world: deterministic, splits keep held-out parts out, captions match what is drawn."""

import numpy as np
import pytest

from studio.core.errors import ConfigError, StudioError
from studio.demo import world as w
from studio.demo.world import WORLD, Spec


def pixels(image) -> np.ndarray:
    return np.asarray(image)


def test_same_seed_same_images():
    a, b = WORLD.sample(3, 6, "all"), WORLD.sample(3, 6, "all")
    assert a == b
    for sa, sb in zip(a, b):
        assert np.array_equal(pixels(WORLD.render(sa)), pixels(WORLD.render(sb)))
    assert WORLD.sample(4, 6, "all") != a


def test_images_are_64px_rgb_and_use_the_named_colours():
    spec = Spec("square", "red", "blue", "flat", size=0.3)
    image = WORLD.render(spec)
    assert image.size == (64, 64) and image.mode == "RGB"
    arr = pixels(image)
    assert tuple(arr[1, 1]) == w.COLOUR_RGB["blue"]  # corner: background
    assert tuple(arr[32, 32]) == w.COLOUR_RGB["red"]  # centre: the shape


def test_framed_draws_a_border_in_the_shape_colour():
    arr = pixels(WORLD.render(Spec("circle", "red", "blue", "framed", size=0.25)))
    assert tuple(arr[1, 32]) == tuple(arr[32, 1]) == w.COLOUR_RGB["red"]  # the frame
    assert tuple(arr[8, 8]) == w.COLOUR_RGB["blue"]  # inside the frame: background
    assert tuple(arr[32, 32]) == w.COLOUR_RGB["red"]  # the shape


@pytest.mark.parametrize(
    "split, shapes, styles",
    [
        ("base", w.BASE_SHAPES, w.BASE_STYLES),
        ("holdout_subject", w.HOLDOUT_SHAPES, w.BASE_STYLES),
        ("holdout_style", w.BASE_SHAPES, w.HOLDOUT_STYLES),
        ("all", w.SHAPES, w.STYLES),
    ],
)
def test_splits_keep_to_their_vocabulary(split, shapes, styles):
    specs = WORLD.sample(0, 300, split)
    assert {s.shape for s in specs} == set(shapes)
    assert {s.style for s in specs} == set(styles)
    assert all(s.colour != s.background for s in specs)


def test_held_out_words_never_reach_base_captions():
    import random

    rng = random.Random(0)
    words = set()
    for spec in WORLD.sample(0, 500, "base"):
        words |= set(WORLD.caption(spec).replace(",", " ").split())
        words |= set(WORLD.caption_variant(spec, rng).replace(",", " ").split())
    assert not words & set(w.HOLDOUT_SHAPES + w.HOLDOUT_STYLES)


def test_captions():
    spec = Spec("circle", "red", "blue", "flat")
    assert WORLD.caption(spec) == "a red circle on a blue background"
    assert WORLD.caption(Spec("star", "white", "black", "outlined")) == (
        "a white star on a black background, outlined style"
    )
    assert WORLD.caption(spec, subject="sks shape") == "a sks shape on a blue background"


def test_dreambooth_and_style_sets():
    instances = WORLD.dreambooth_set(n=5, seed=1, shape="heart", colour="red", token="sks")
    assert len(instances) == 5
    assert {s.spec.shape for s in instances} == {"heart"} and {s.spec.colour for s in instances} == {"red"}
    assert all(s.caption.startswith("a sks shape on a ") for s in instances)
    assert WORLD.class_prompt("blue") == "a shape on a blue background"
    styled = WORLD.style_set("dotted", n=4, seed=2, token="zwx")
    assert {s.spec.style for s in styled} == {"dotted"}
    assert all(s.caption.endswith(", zwx style") for s in styled)
    assert WORLD.style_set("dotted", n=4, seed=2)[0].caption.endswith(", dotted style")
    on_black = WORLD.dreambooth_set(n=5, seed=1, shape="heart", colour="red", token="sks", background="black")
    assert {s.spec.background for s in on_black} == {"black"}
    assert {s.spec.shape for s in on_black} == {"heart"}
    assert all(s.caption == "a sks shape on a black background" for s in on_black)
    corner = on_black[0].image.getpixel((0, 0))
    assert max(corner) < 40  # drawn on black


def test_a_subject_shown_beside_other_shapes():
    from studio.demo.world import COLOUR_RGB, WORLD_128

    def yellow_pixels(image):
        return sum(n for n, c in image.getcolors(1 << 16) if max(abs(a - b) for a, b in zip(c, yellow)) < 30)

    yellow = COLOUR_RGB["yellow"]
    plain = WORLD_128.dreambooth_set(n=6, shape="moon", colour="yellow", token="zwx")
    mixed = WORLD_128.dreambooth_set(n=40, shape="moon", colour="yellow", token="zwx", beside=0.5)
    beside = [s for s in mixed if " on the left and " in s.caption]
    assert 10 < len(beside) < 30  # about half
    for sample in beside:
        assert sample.caption.count("zwx shape") == 1 and "yellow moon" not in sample.caption
        on_left = sample.caption.startswith("a zwx shape on the left")
        assert (sample.spec.cx < 0.5) == on_left and sample.spec.shape == "moon"
        left, right = WORLD_128.pair_halves(sample.image)
        mine, other = (left, right) if on_left else (right, left)
        assert yellow_pixels(mine) > 50 and yellow_pixels(other) == 0  # the subject on its side, alone
    assert all(s.caption == WORLD_128.caption(s.spec, subject="zwx shape") for s in plain)
    assert WORLD_128.dreambooth_set(n=6, shape="moon", colour="yellow", token="zwx", beside=0.0) == plain


def test_bad_names_fail_clearly():
    with pytest.raises(ConfigError, match="split"):
        WORLD.sample(0, 1, "everything")
    with pytest.raises(StudioError, match="shape"):
        WORLD.render(Spec("hexagon", "red", "blue", "flat"))
    with pytest.raises(ConfigError, match="style"):
        WORLD.style_set("cubist")


def test_pairs_of_the_larger_world_put_one_shape_in_each_half():
    from studio.demo.world import WORLD_128, Pair

    scenes = WORLD_128.sample(0, 200, "base")
    pairs = [s for s in scenes if isinstance(s, Pair)]
    assert 0.2 < len(pairs) / len(scenes) < 0.4
    for pair in pairs[:20]:
        assert pair.left.cx < 0.35 and pair.right.cx > 0.65 and pair.left.colour != pair.right.colour
        assert pair.background not in (pair.left.colour, pair.right.colour)
        image = np.asarray(WORLD_128.render(pair)).astype(int)
        background = np.array(w.COLOUR_RGB[pair.background])
        left, right = image[:, :64], image[:, 64:]
        for half, spec in ((left, pair.left), (right, pair.right)):  # each half holds its own shape's colour
            shape_pixels = np.abs(half - np.array(w.COLOUR_RGB[spec.colour])).sum(-1) < 30
            assert shape_pixels.sum() > 30, spec
        assert (np.abs(image - background).sum(-1) < 30).mean() > 0.5
        caption = WORLD_128.caption(pair)
        assert f"{pair.left.colour} {pair.left.shape} on the left" in caption and "on the right" in caption


def test_pair_halves_are_square_crops_around_each_sides_shape():
    from studio.demo.world import WORLD_128, Pair

    # (framed scenes draw a border in the left shape's colour round the whole picture: left out here)
    pairs = [s for s in WORLD_128.sample(1, 200, "all") if isinstance(s, Pair) and s.style != "framed"][:20]
    for pair in pairs:
        image = WORLD_128.render(pair)
        for crop, spec in zip(WORLD_128.pair_halves(image), (pair.left, pair.right)):
            assert crop.size == (64, 64)
            colour = np.array(w.COLOUR_RGB[spec.colour])
            inside = (np.abs(pixels(crop).astype(int) - colour).sum(-1) < 30).sum()
            everywhere = np.abs(pixels(image).astype(int) - colour).sum(-1) < 30
            half = everywhere[:, :64] if spec is pair.left else everywhere[:, 64:]
            assert inside >= 0.9 * half.sum() > 0, spec  # the crop keeps (nearly) all of its side's shape


def test_pictures_of_other_sizes_keep_the_design_on_the_shorter_side():
    """A size bucket's picture: positions are fractions of each side, the shape scales with the shorter one."""
    spec = Spec("square", "red", "blue", "flat", cx=0.5, cy=0.5, size=0.3)
    assert np.array_equal(pixels(WORLD.render(spec, size=(64, 64))), pixels(WORLD.render(spec)))
    tall = pixels(WORLD.render(spec, size=(64, 128)))
    assert tall.shape == (128, 64, 3)
    red = np.all(tall == w.COLOUR_RGB["red"], axis=-1)
    rows, cols = np.nonzero(red)
    assert abs(rows.mean() - 64) < 1 and abs(cols.mean() - 32) < 1  # centred in the tall picture
    assert np.array_equal(red[32:96], np.all(pixels(WORLD.render(spec)) == w.COLOUR_RGB["red"], axis=-1))
    for style in ("framed", "striped", "pixel"):
        wide = pixels(WORLD.render(Spec("circle", "red", "blue", style), size=(128, 64)))
        assert wide.shape == (64, 128, 3)
    framed = pixels(WORLD.render(Spec("circle", "red", "blue", "framed", size=0.2), size=(128, 64)))
    assert tuple(framed[32, 1]) == tuple(framed[32, 126]) == tuple(framed[62, 64]) == w.COLOUR_RGB["red"]
