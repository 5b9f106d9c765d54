"""`lora-studio eval --fusion-variant`: gradient fusion measured again with other merge options, each a row
set of its own, and bad options refused before any training (the wiring, not the numbers)."""

from __future__ import annotations

import json

import pytest

from merging.output import REPORT_KEY
from studio.app.cli import main
from studio.app.commands.eval import parse_fusion_variant
from studio.app.eval_report import evaluate
from studio.app.evaluate import EvalPlan
from studio.core.io import read_header


def test_a_fusion_variant_adds_its_own_rows(tmp_path):
    variant = parse_fusion_variant("ridge=0.01, order=text-first")
    assert variant == {"fusion_ridge": 0.01, "fusion_order": "text-first"}
    plan = EvalPlan(out=tmp_path, rows=("orthogonal",), images=1, lora_steps=2, ortho_steps=2, ziplora_steps=1,
                    train_images=2, fusion_variants=(variant,))  # fmt: skip
    data = evaluate(plan, log=lambda line: None)
    cases = [r["case"] for r in data["rows"]]
    for shape in ("heart", "moon"):
        assert f"fusion: {shape} after merge" in cases
        assert f"fusion (ridge 0.01, text-first): {shape} after merge" in cases
    merged = tmp_path / "work" / "loras" / "subjects_fusion_ridge_0_01__text_first.safetensors"
    assert merged.is_file()
    _, metadata = read_header(merged)
    fusion = json.loads(metadata[REPORT_KEY])["details"]["fusion"]
    assert fusion["order"] == "text-first" and fusion["ridge"] == 0.01


@pytest.mark.parametrize(
    "text, message",
    [
        ("bogus=1", "unknown or no keys"),
        ("ridge", "KEY=VALUE"),
        ("order=sideways", "not one of joint, text-first"),
        ("text_rows=trigger,order=joint", "add fusion_order text-first"),
    ],
)
def test_a_bad_fusion_variant_is_refused_before_training(tmp_path, capsys, text, message):
    out = tmp_path / "out"
    assert main(["eval", "--rows", "orthogonal", "--fusion-variant", text, "--out", str(out)]) != 0
    assert message in capsys.readouterr().err
    assert not out.exists()
