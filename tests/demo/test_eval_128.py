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
    who = [w for w, *_ in SUBJECT_SETS]
    assert "two subjects shown beside others, trained at two sizes" in who
    assert "two subjects trained at two sizes, twice the steps" in who
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


def test_b_lora_rows_on_the_128px_sdxl_model(tmp_path):
    args = [
        "eval",
        "--family",
        "sdxl",
        "--world",
        "128",
        "--rows",
        "b_lora",
        "--images",
        "2",
        "--lora-steps",
        "4",
    ]
    assert main([*args, "--out", str(tmp_path)]) == 0
    data = json.loads((tmp_path / "eval.json").read_text())
    assert data["plan"]["model"] is None and "--family sdxl --world 128" in data["command"]
    rows = {r["case"]: r["metrics"] for r in data["rows"]}
    assert set(rows) == {"content only (sks)", "style only (zwx)", "content sks + style zwx"}
    for metrics in rows.values():
        assert set(metrics) == {"subject", "style", "both"}
        assert metrics["both"] <= min(metrics["subject"], metrics["style"])
    halves = {p.name for p in (tmp_path / "work" / "loras").glob("b_lora_*_*.safetensors")}
    assert halves == {"b_lora_content_content.safetensors", "b_lora_style_style.safetensors"} | {
        "b_lora_content_style.safetensors", "b_lora_style_content.safetensors"}  # fmt: skip


def test_b_lora_recipe_on_another_pair_of_blocks(tmp_path):
    """bench/b_lora_probe.py's pairs: both blocks trained, each half loaded without the other's block."""
    from studio.app.evaluate import EvalPlan, Evaluator
    from studio.core.lora_files import read_lora

    ev = Evaluator(EvalPlan(out=tmp_path, family="sdxl", image_size=128, images=2, lora_steps=3))
    layers = ["to_q", "to_k", "to_v", "to_out.0"]
    content, style = ev.b_lora_pair("_pair", method="dreambooth", blocks=["OUT02", "OUT03"], layers=layers)
    modules = read_lora(content).modules
    assert modules and all(
        ".up_blocks.0.attentions.2." in m or ".up_blocks.1.attentions.0." in m for m in modules
    )
    blocks = {"content": {"OUT03": 0.0}, "style": {"OUT02": 0.0}}
    rows = ev.b_lora_rows(content, style, stacked=True, blocks=blocks)
    assert [r.case for r in rows] == ["content only (sks)", "style only (zwx)", "content sks + style zwx"]
    assert all(len(r.images) == 2 and r.images[0].size == (128, 128) for r in rows)
