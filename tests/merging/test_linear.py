"""Weighted-sum merges: concat is the exact sum of deltas, SVD converges to it as the rank grows."""

import pytest
import torch
from merge_helpers import outputs_with

from merging import MergeConfig, run_merge
from merging.linear import concat_merge, svd_merge, truncate_factors
from merging.sources import Factors, load_sources
from studio.core.blocks import block_of, parse_block_weights
from studio.core.lora_files import read_lora, write_lora
from studio.core.lora_ref import parse_lora_ref
from studio.core.options import build_config
from tests.fixtures.lora_random import random_lora
from tests.probes import unet_output


@pytest.fixture(params=["sd15", "sdxl"])
def family_pipe(request, fresh_sd15, fresh_sdxl):
    return request.param, (fresh_sd15 if request.param == "sd15" else fresh_sdxl)


def _files(pipe, family, tmp_path):
    """Mixed ranks, alphas and formats; a LoCon (3x3 conv) part in the first."""
    a = random_lora(pipe, family, rank=4, alpha=2.0, seed=1, conv=True, scale=0.2)
    b = random_lora(pipe, family, rank=8, alpha=16.0, seed=2, scale=0.2)
    pa = write_lora(a, tmp_path / "a.safetensors")
    pb = write_lora(b, tmp_path / "b.safetensors", fmt="peft")
    return read_lora(pa), read_lora(pb), pa, pb


def test_concat_is_the_weighted_sum_in_model_outputs(family_pipe, tmp_path):
    family, pipe = family_pipe
    a, b, pa, pb = _files(pipe, family, tmp_path)
    out = tmp_path / "m.safetensors"
    result = run_merge(build_config(MergeConfig, sources=[f"{pa}:0.7", f"{pb}:-0.4"], out=str(out)))

    merged = read_lora(result.out)
    assert set(merged.modules) == set(a.modules) | set(b.modules)
    shared = next(p for p in a.modules if p in b.modules)
    assert merged.modules[shared].rank == 12 and merged.modules[shared].alpha == 12
    assert result.report.exactness < 1e-5 and result.report.ranks == [4, 12]  # 3x3 convs: a only

    expected_unet, expected_text = outputs_with(pipe, [(a, 0.7, None), (b, -0.4, None)])
    got_unet, got_text = outputs_with(pipe, [(merged, 1.0, None)])
    base_unet = unet_output(pipe)
    assert (expected_unet - base_unet).abs().max() > 1e-2, "the merge must change the output"
    torch.testing.assert_close(got_unet, expected_unet, atol=2e-5, rtol=1e-5)
    torch.testing.assert_close(got_text, expected_text, atol=2e-5, rtol=1e-5)
    # diffusers reads the file to the same model
    pipe.load_lora_weights(str(result.out), adapter_name="merged")
    torch.testing.assert_close(unet_output(pipe), expected_unet, atol=1e-4, rtol=1e-4)


def test_naive_sum_of_factors_would_be_wrong(tiny_sd15, tmp_path):
    """The pitfall the concat form avoids: (B1 + B2)(A1 + A2) adds cross terms B1 A2 + B2 A1."""
    a = random_lora(tiny_sd15, "sd15", rank=4, seed=1, text_encoder=False)
    b = random_lora(tiny_sd15, "sd15", rank=4, seed=2, text_encoder=False)
    pa, pb = write_lora(a, tmp_path / "a.safetensors"), write_lora(b, tmp_path / "b.safetensors")
    sources, _ = load_sources([parse_lora_ref(str(pa)), parse_lora_ref(str(pb))])
    path = next(iter(a.modules))
    exact = a.modules[path].delta() + b.modules[path].delta()
    ma, mb = a.modules[path], b.modules[path]
    naive = (ma.up + mb.up).flatten(1) @ (ma.down + mb.down).flatten(1)
    ours = concat_merge(sources)[path].delta()
    torch.testing.assert_close(ours, exact.flatten(1), atol=1e-7, rtol=1e-5)
    assert (naive.flatten(1) - exact.flatten(1)).norm() > 0.5 * exact.norm()


def test_svd_error_shrinks_to_zero_at_the_combined_rank(tiny_sdxl, tmp_path):
    a = random_lora(tiny_sdxl, "sdxl", rank=3, alpha=1.5, seed=1, conv=True)
    b = random_lora(tiny_sdxl, "sdxl", rank=5, seed=2)
    pa, pb = write_lora(a, tmp_path / "a.safetensors"), write_lora(b, tmp_path / "b.safetensors")
    sources, _ = load_sources([parse_lora_ref(f"{pa}:0.8"), parse_lora_ref(f"{pb}:0.6")])
    exact = concat_merge(sources)
    means = []
    for rank in (1, 2, 4, 6, 8):
        factors, errors = svd_merge(sources, rank)
        assert all(f.rank <= rank for f in factors.values())
        measured = {p: _rel(factors[p].delta(), exact[p].delta()) for p in exact}
        for p in exact:  # the reported error is the true error
            assert measured[p] == pytest.approx(errors[p], abs=1e-5)
        means.append(sum(measured.values()) / len(measured))
    assert all(x > y for x, y in zip(means, means[1:])), means
    assert means[0] > 0.3 and means[-1] < 1e-5


def test_truncation_is_the_optimal_low_rank_approximation():
    g = torch.Generator().manual_seed(0)
    f = Factors(torch.randn(40, 6, generator=g), torch.randn(6, 30, generator=g))
    dense = f.delta()
    s = torch.linalg.svdvals(dense.double())
    for rank in (1, 3, 6):
        t, error = truncate_factors(f, rank)
        optimum = float(s[rank:].square().sum().sqrt() / s.square().sum().sqrt())
        assert error == pytest.approx(optimum, abs=1e-6)
        assert _rel(t.delta(), dense) == pytest.approx(optimum, abs=1e-5)


def test_block_weights_and_partial_coverage(fresh_sd15, tmp_path):
    pipe = fresh_sd15
    a = random_lora(pipe, "sd15", rank=4, seed=1, scale=0.2)  # unet + text encoder
    b = random_lora(pipe, "sd15", rank=2, seed=2, scale=0.2, text_encoder=False)  # unet only
    pa, pb = write_lora(a, tmp_path / "a.safetensors"), write_lora(b, tmp_path / "b.safetensors")
    out = tmp_path / "m.safetensors"
    cfg = build_config(MergeConfig, sources=[f"{pa}:0.5:OUTALL", str(pb)], method="concat", out=str(out))
    merged = run_merge(cfg).lora
    blocks = parse_block_weights("OUTALL", "sd15")
    for path, m in merged.modules.items():
        in_b = path in b.modules
        a_kept = blocks.get(block_of(path), 1.0) != 0 and path in a.modules
        assert m.rank == (4 if a_kept else 0) + (2 if in_b else 0), path
    expected, _ = outputs_with(pipe, [(a, 0.5, blocks), (b, 1.0, None)])
    got, _ = outputs_with(pipe, [(merged, 1.0, None)])
    torch.testing.assert_close(got, expected, atol=2e-5, rtol=1e-5)


def _rel(x, y):
    return float((x - y).norm() / y.norm())
