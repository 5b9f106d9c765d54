"""The larger world's evaluation runs end to end on its shipped model: two subjects asked left and right,
judged on each side, with and without regions (a few images and training steps: the wiring, not the numbers;
the recorded table is bench/results/eval_sd15_128.md)."""

from __future__ import annotations

import json

import pytest

from studio.app.cli import main
from studio.app.eval_many import SUBJECT_SETS


@pytest.mark.slow
def test_regional_rows_of_the_128px_world(tmp_path):
    args = ["eval", "--world", "128", "--rows", "regional", "--images", "2", "--lora-steps", "4"]
    assert main([*args, "--out", str(tmp_path)]) == 0
    data = json.loads((tmp_path / "eval.json").read_text())
    assert data["plan"]["image_size"] == 128 and "--world 128" in data["command"]
    rows = {r["case"]: r["metrics"] for r in data["rows"]}
    layouts = ("mask", "area", "mask, square boxes", "area, square boxes")
    who = [w for w, _, _ in SUBJECT_SETS]
    assert "two subjects shown beside others, trained at two sizes" in who
    assert set(rows) == {
        *(f"{w}, no regions (both LoRAs)" for w in who),
        *(f"{w}, a region and LoRA per side ({layout})" for w in who for layout in layouts),
        *(f"base model, two-shape prompts, a region per side ({layout})" for layout in layouts),
    }
    for case, metrics in rows.items():
        sides = {"left", "right", "both"}
        assert set(metrics) == (sides if case.startswith("base") else sides | {"background"})
        assert all(v in (0.0, 0.5, 1.0) for v in metrics.values())  # two images a line
        assert metrics["both"] <= min(metrics["left"], metrics["right"])
    assert "the 128 px world" in (tmp_path / "eval.md").read_text()
