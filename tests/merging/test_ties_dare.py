"""TIES / DARE / magnitude merges: the arithmetic on hand-made deltas, seeds, ranks, real files."""

import pytest
import torch

from merging import MergeConfig, run_merge
from merging.sources import MergeSource
from merging.ties_dare import dense_merge
from studio.core.lora_files import LoraModule, LoraSet, read_lora, write_lora
from studio.core.options import build_config
from tests.fixtures.lora_random import random_lora

PATH = "unet.mid_block.attentions.0.proj_out"


def _source(delta, weight=1.0, label="x", alpha=None):
    """A source whose only module has exactly this delta (identity down-projection)."""
    delta = torch.tensor(delta, dtype=torch.float32)
    n = delta.shape[1]
    scale = 1.0 if alpha is None else alpha / n
    module = LoraModule(torch.eye(n), delta / scale, alpha)
    return MergeSource(LoraSet({PATH: module}, "sd15"), weight, None, label)


def _merged(sources, method, **kw):
    factors, info = dense_merge(sources, method, rank=2, **kw)
    return factors[PATH].delta(), info[PATH]


def test_ties_by_hand():
    a = _source([[3.0, -1.0], [0.5, 2.0]], alpha=1.0)  # alpha/rank folded in before trimming
    b = _source([[-1.5, -2.0], [1.0, 0.1]])
    # trim to 2 of 4 entries: a -> [[3, 0], [0, 2]], b -> [[-1.5, -2], [0, 0]]; elected signs [[+, -], [+, +]]
    got, info = _merged([a, b], "ties", density=0.5)
    torch.testing.assert_close(got, torch.tensor([[3.0, -2.0], [0.0, 2.0]]), atol=1e-5, rtol=0)
    assert info["svd"] < 1e-6 and info["pruning"] > 0.1
    a.weight = 2.0  # weights apply after trimming and sign election, as in peft
    got, _ = _merged([a, b], "ties", density=0.5)
    torch.testing.assert_close(got, torch.tensor([[6.0, -2.0], [0.0, 4.0]]), atol=1e-5, rtol=0)


@pytest.mark.parametrize("method", ["ties", "magnitude"])
def test_same_numbers_as_peft(method):
    from peft.utils import merge_utils

    g = torch.Generator().manual_seed(0)
    deltas = [torch.randn(12, 10, generator=g) for _ in range(3)]
    weights = torch.tensor([0.7, 1.2, -0.4])
    sources = [_source(d.tolist(), float(w), str(i)) for i, (d, w) in enumerate(zip(deltas, weights))]
    factors, _ = dense_merge(sources, method, rank=10, density=0.3, sign_method="frequency")
    if method == "ties":
        expected = merge_utils.ties(deltas, weights, 0.3, "frequency")
    else:
        expected = merge_utils.magnitude_prune(deltas, weights, 0.3)
    torch.testing.assert_close(factors[PATH].delta(), expected, atol=1e-5, rtol=1e-5)


def test_ties_sign_methods():
    sources = [_source([[3.0]], label="a"), _source([[-1.0]], label="b"), _source([[-1.0]], label="c")]
    total, _ = _merged(sources, "ties", density=1.0, sign_method="total")  # 3 - 1 - 1 > 0
    frequency, _ = _merged(sources, "ties", density=1.0, sign_method="frequency")  # two of three negative
    assert float(total) == pytest.approx(3.0) and float(frequency) == pytest.approx(-1.0)


def test_density_one_is_the_exact_sum_and_dare_is_seeded():
    a = _source([[3.0, -1.0], [0.5, 2.0]], weight=0.7)
    b = _source([[-1.5, -2.0], [1.0, 0.1]], weight=0.5)
    exact = 0.7 * torch.tensor([[3.0, -1.0], [0.5, 2.0]]) + 0.5 * torch.tensor([[-1.5, -2.0], [1.0, 0.1]])
    for method in ("magnitude", "dare"):
        got, info = _merged([a, b], method, density=1.0)
        torch.testing.assert_close(got, exact, atol=1e-5, rtol=0)
        assert info["pruning"] < 1e-6
    big = [
        _source(torch.randn(16, 16, generator=torch.Generator().manual_seed(i)).tolist()) for i in range(2)
    ]
    one, _ = dense_merge(big, "dare", rank=16, density=0.5, seed=1)
    again, _ = dense_merge(big, "dare", rank=16, density=0.5, seed=1)
    other, _ = dense_merge(big, "dare", rank=16, density=0.5, seed=2)
    torch.testing.assert_close(one[PATH].delta(), again[PATH].delta())
    assert not torch.allclose(one[PATH].delta(), other[PATH].delta())


@pytest.mark.parametrize("method", ["ties", "dare", "dare-ties", "magnitude"])
def test_real_files_give_the_asked_rank(method, tiny_sdxl, tmp_path):
    a = write_lora(random_lora(tiny_sdxl, "sdxl", rank=4, seed=1, conv=True), tmp_path / "a.safetensors")
    b = write_lora(random_lora(tiny_sdxl, "sdxl", rank=8, seed=2), tmp_path / "b.safetensors", fmt="peft")
    out = tmp_path / "m.safetensors"
    cfg = build_config(MergeConfig, sources=[f"{a}:0.6", f"{b}:0.9"], method=method, rank=3, out=str(out))
    result = run_merge(cfg)
    merged = read_lora(out)
    assert merged.ranks == [3] and merged.family == "sdxl"
    assert set(merged.modules) == set(read_lora(a).modules) | set(read_lora(b).modules)
    assert 0 < result.report.exactness < 1.5
    details = result.report.details
    assert details["rank"] == 3 and details["svd_error"]["max"] < 1 and details["pruning_error"]["mean"] > 0


def test_sampled_threshold_keeps_the_asked_share_of_a_large_delta():
    """Above THRESHOLD_SAMPLE entries the magnitude threshold comes from a sample of entries computed from
    the factors: the kept share stays within four standard deviations of a sample quantile of the asked
    density, and the result is peft's except at entries right at the threshold."""
    from peft.utils import merge_utils

    from merging.sources import Factors
    from merging.ties_dare import THRESHOLD_SAMPLE, _threshold, _trim

    g = torch.Generator().manual_seed(0)
    factors = Factors(
        torch.randn(4 * THRESHOLD_SAMPLE // 512, 8, generator=g), torch.randn(8, 512, generator=g)
    )
    big = factors.delta()
    threshold = _threshold(factors, 0.3, torch.Generator().manual_seed(1))
    ours = _trim(big.clone(), threshold, torch.empty_like(big))
    spread = 4 * (0.3 * 0.7 / THRESHOLD_SAMPLE) ** 0.5  # 0.7 % of the entries at 2**16
    assert abs((ours != 0).float().mean().item() - 0.3) < spread
    theirs = merge_utils.magnitude_based_pruning(big, 0.3)
    assert (ours != theirs).float().mean().item() < 2 * spread


def test_blocks_and_workers_do_not_change_the_result(monkeypatch):
    """A module is merged a block of rows at a time: any block size gives TIES the same factors as one
    block, and two workers over modules give any method (DARE's draws too) the same as one."""
    import merging.ties_dare as td

    g = torch.Generator().manual_seed(3)
    sources = []
    for i, w in enumerate((0.8, -0.5)):
        modules = {
            f"unet.down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_{k}": LoraModule(
                torch.randn(4, 64, generator=g), torch.randn(96, 4, generator=g), 4.0
            )
            for k in "qkv"
        }
        sources.append(MergeSource(LoraSet(modules, "sd15"), w, None, str(i)))
    for method, block in (("ties", 64 * 7), ("dare-ties", td.BLOCK)):  # 7 rows a block, the last one short
        whole, info = dense_merge(sources, method, rank=6, density=0.4, seed=5)
        monkeypatch.setattr(td, "BLOCK", block)
        blocks, info_blocks = dense_merge(sources, method, rank=6, density=0.4, seed=5, workers=2)
        monkeypatch.undo()
        for path in whole:
            torch.testing.assert_close(blocks[path].delta(), whole[path].delta(), atol=1e-5, rtol=1e-4)
            assert info_blocks[path]["pruning"] == pytest.approx(info[path]["pruning"], rel=1e-5)


@pytest.mark.parametrize("method", ["ties", "dare"])
def test_the_sources_span_gives_true_errors_and_a_near_optimal_rank(method):
    """With the sources' own up factors as the SVD's range basis (one product with the merged matrix), the
    reported errors are the measured ones, and the rank-16 result's error is within 10 % of the least
    possible (the SVD of the merged matrix; 5-7 % above it on SDXL-shaped pairs)."""
    import merging.ties_dare as td
    from merging.sources import Factors

    g = torch.Generator().manual_seed(7)
    parts = [Factors(torch.randn(320, r, generator=g), torch.randn(r, 256, generator=g)) for r in (8, 4)]
    weights = [0.8, 0.6]
    generator = torch.Generator().manual_seed(0)
    omega = td._sketch_matrix(parts, 16, generator)
    assert omega is not None
    merged, _, sketch, total = td._merge_module(parts, weights, method, 0.5, "total", generator, omega)
    merged = merged.clone()
    factors, svd_error, pruning = td._truncate_in_span(merged, parts, weights, sketch, total, 16)
    exact = sum(w * f.delta() for f, w in zip(parts, weights))
    assert pruning == pytest.approx(float((merged - exact).norm() / exact.norm()), rel=1e-4)
    assert svd_error == pytest.approx(float((merged - factors.delta()).norm() / merged.norm()), rel=1e-3)
    values = torch.linalg.svdvals(merged.double())
    best = float(values[16:].square().sum().sqrt() / values.square().sum().sqrt())
    assert best * (1 - 1e-6) <= svd_error <= 1.1 * best
