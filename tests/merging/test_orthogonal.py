"""Orthogonal merge: a plain sum, checked from metadata and factors; no crosstalk when the premise holds."""

import torch

from merging import MergeConfig, run_merge
from studio.core.lora_files import LoraModule, LoraSet, write_lora
from studio.core.modules import model_module_shapes
from studio.core.options import build_config
from studio.core.orthogonal_basis import ORTHO_RANK_KEY, ORTHO_SEED_KEY, ORTHO_SLICE_KEY, basis_slice
from tests.fixtures.lora_random import default_targets

RANK = 2


def _ortho_lora(shapes, targets, slice_index, seed, g):
    modules = {}
    for path in targets:
        shape = shapes[path]
        down = basis_slice(int(torch.tensor(shape[1:]).prod()), RANK, slice_index, seed).reshape(
            RANK, *shape[1:]
        )
        up = torch.randn(shape[0], RANK, *([1, 1] if len(shape) == 4 else []), generator=g) * 0.1
        modules[path] = LoraModule(down, up, float(RANK))
    meta = {ORTHO_SEED_KEY: str(seed), ORTHO_SLICE_KEY: str(slice_index), ORTHO_RANK_KEY: str(RANK)}
    return LoraSet(modules, "sd15", meta)


def _merge(tmp_path, loras):
    paths = [write_lora(lora, tmp_path / f"c{i}.safetensors") for i, lora in enumerate(loras)]
    out = tmp_path / "merged.safetensors"
    cfg = build_config(MergeConfig, sources=[f"{p}:0.6" for p in paths], method="orthogonal", out=str(out))
    return run_merge(cfg).report


def test_orthogonal_loras_merge_without_crosstalk(tiny_sd15, tmp_path):
    shapes = model_module_shapes(tiny_sd15)
    targets = default_targets(shapes, text_encoder=False)
    g = torch.Generator().manual_seed(0)
    report = _merge(tmp_path, [_ortho_lora(shapes, targets, i, seed=7, g=g) for i in range(3)])
    assert report.warnings == []
    assert all(pair["max_overlap"] < 1e-6 for pair in report.details["orthogonality"])
    assert report.exactness < 1e-5
    for row in report.sources:  # each concept keeps its own output on the inputs it reads
        assert row.preservation < 1e-4 and max(row.interference.values()) < 1e-4


def test_non_orthogonal_loras_are_summed_with_a_measured_warning(tiny_sd15, tmp_path):
    shapes = model_module_shapes(tiny_sd15)
    targets = default_targets(shapes, text_encoder=False)
    g = torch.Generator().manual_seed(0)
    a = _ortho_lora(shapes, targets, 0, seed=1, g=g)
    b = _ortho_lora(shapes, targets, 1, seed=2, g=g)  # another basis: rows are not orthogonal to a's
    report = _merge(tmp_path, [a, b])
    text = " ".join(report.warnings)
    assert "different orthogonal bases (seeds 1 and 2)" in text
    assert "are not orthogonal: their down-projections overlap by up to" in text
    pair = report.details["orthogonality"][0]
    assert 0.05 < pair["max_overlap"] < 1 and report.exactness < 1e-5
    assert max(report.sources[0].interference.values()) > 0.01


def test_overlapping_slices_and_missing_metadata(tiny_sd15, tmp_path):
    shapes = model_module_shapes(tiny_sd15)
    targets = default_targets(shapes, text_encoder=False)[:4]
    g = torch.Generator().manual_seed(0)
    a, b = _ortho_lora(shapes, targets, 0, seed=3, g=g), _ortho_lora(shapes, targets, 0, seed=3, g=g)
    plain = LoraSet(dict(a.modules), "sd15", {})
    report = _merge(tmp_path, [a, b, plain])
    text = " ".join(report.warnings)
    assert "overlapping slices of the same basis (rows 0-1 and 0-1)" in text
    assert "c2.safetensors has no orthogonal-adaptation metadata" in text
