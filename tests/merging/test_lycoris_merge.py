"""Merges with LyCORIS sources (LoHa, LoKr, Tucker, DoRA): exact where the format allows, SVD to the rank asked.

The reference deltas come from lycoris-lora's own modules (their merged weight minus the base weight).
"""

import copy

import pytest
import torch
from safetensors.torch import save_file

from merging import MergeConfig, run_merge
from studio.core.errors import StudioError
from studio.core.lora_files import read_lora, write_lora
from studio.core.modules import apply_to_pipeline, base_weight
from studio.core.options import build_config
from tests.fixtures.lora_random import random_lora
from tests.fixtures.lycoris_files import lycoris_lora, targets
from tests.probes import unet_output


def reference_deltas(pipe, family, kind, path):
    """Write a lycoris-lora file; {module: delta} measured from lycoris' own forward on each module."""
    state, applied = lycoris_lora(pipe, family, kind)
    save_file(state, str(path))
    lora = read_lora(path)
    deltas = {}
    for module_path in targets(pipe, family):
        weight = base_weight(pipe, module_path)
        deltas[module_path] = lora.modules[module_path].delta(weight.detach())
    return lora, deltas


@pytest.mark.parametrize("kind", ["loha", "lokr_decomposed", "loha_tucker", "dora"])
def test_concat_with_a_lycoris_source_is_exact(tiny_sd15, tiny_sd15_dir, kind, tmp_path):
    lyco, deltas = reference_deltas(tiny_sd15, "sd15", kind, tmp_path / "lyco.safetensors")
    plain = write_lora(
        random_lora(tiny_sd15, "sd15", rank=4, seed=2, scale=0.1), tmp_path / "plain.safetensors"
    )
    config = build_config(
        MergeConfig, sources=[f"{tmp_path / 'lyco.safetensors'}:0.7", f"{plain}:-0.5"], method="concat",
        out=str(tmp_path / "merged.safetensors"),
        model=str(tiny_sd15_dir) if lyco.needs_base else None,
    )  # fmt: skip
    result = run_merge(config)
    merged = read_lora(result.out)
    plain_lora = read_lora(plain)
    for path, delta in deltas.items():
        expected = 0.7 * delta.reshape(merged.modules[path].weight_shape)
        if path in plain_lora.modules:
            expected = expected - 0.5 * plain_lora.modules[path].delta().reshape(expected.shape)
        torch.testing.assert_close(merged.modules[path].delta(), expected, atol=1e-5, rtol=1e-4)
    # the merged file acts on the model as the two sources do
    ours, theirs = copy.deepcopy(tiny_sd15), copy.deepcopy(tiny_sd15)
    apply_to_pipeline(merged, ours)
    apply_to_pipeline(lyco, theirs, 0.7)
    apply_to_pipeline(plain_lora, theirs, -0.5)
    torch.testing.assert_close(unet_output(ours), unet_output(theirs), atol=2e-5, rtol=1e-4)


@pytest.mark.parametrize("method", ["svd", "ties"])
def test_lossy_merges_refactor_lycoris_deltas_to_the_rank_asked(tiny_sdxl, method, tmp_path):
    _, deltas = reference_deltas(tiny_sdxl, "sdxl", "loha", tmp_path / "loha.safetensors")
    config = build_config(
        MergeConfig, sources=[str(tmp_path / "loha.safetensors")], method=method, rank=2, density=1.0,
        out=str(tmp_path / "m.safetensors"),
    )  # fmt: skip
    merged = read_lora(run_merge(config).out)
    assert merged.ranks == [2]
    for path, delta in deltas.items():
        flat = delta.flatten(1).double()
        s = torch.linalg.svdvals(flat)
        best = float(s[2:].square().sum().sqrt() / s.square().sum().sqrt())  # Eckart-Young: the least error
        got = merged.modules[path].delta().flatten(1).double()
        error = float((got - flat).norm() / flat.norm())
        assert error == pytest.approx(best, abs=2e-3), path


def test_dora_needs_the_base_model(tiny_sd15, tmp_path):
    reference_deltas(tiny_sd15, "sd15", "dora", tmp_path / "dora.safetensors")
    config = build_config(
        MergeConfig, sources=[str(tmp_path / "dora.safetensors")], out=str(tmp_path / "m.safetensors")
    )
    with pytest.raises(
        StudioError, match="DoRA LoRA: its change depends on the base model's weights. Pass --model"
    ):
        run_merge(config)
    assert not (tmp_path / "m.safetensors").exists()
