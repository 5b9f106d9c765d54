"""The shipped judges read the world's real renders: every shape, colour, background and style, and in the
128 px world its two extra held-out subjects and each side of a two-shape scene."""

from __future__ import annotations

import pytest

from studio.core.errors import ConfigError, StudioError
from studio.demo.classifiers import load_judges
from studio.demo.world import WORLD, WORLD_128, Pair


@pytest.mark.parametrize("world", [WORLD, WORLD_128], ids=["64px", "128px"])
def test_judges_read_real_renders_of_every_split(world):
    judges = load_judges(image_size=world.image_size)
    specs = [s for s in world.sample(123, 160, "all") if not isinstance(s, Pair)]
    verdict = judges.judge([world.render(s) for s in specs])
    for attribute in ("shape", "colour", "background", "style"):
        hits = [v == getattr(s, attribute) for v, s in zip(verdict[attribute].labels, specs)]
        assert sum(hits) / len(hits) > 0.95, attribute
    assert set(verdict["shape"].classes) == set(world.shapes)


def test_judges_of_the_larger_world_read_each_side_of_a_two_shape_scene():
    judges = load_judges(image_size=128)
    pairs = [s for s in WORLD_128.sample(321, 300, "all") if isinstance(s, Pair)][:64]
    halves = [WORLD_128.pair_halves(WORLD_128.render(p)) for p in pairs]
    for side, crops in (("left", [h[0] for h in halves]), ("right", [h[1] for h in halves])):
        shapes = judges.judge(crops)["shape"].labels
        hits = [v == getattr(p, side).shape for v, p in zip(shapes, pairs)]
        assert sum(hits) / len(hits) > 0.9, side


def test_judges_of_an_unknown_world_or_a_missing_folder_fail_clearly(tmp_path):
    with pytest.raises(ConfigError, match="choose 64 or 128"):
        load_judges(image_size=96)
    with pytest.raises(StudioError, match="--world 128"):
        load_judges(tmp_path, image_size=128)
