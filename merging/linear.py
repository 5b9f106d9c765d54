"""Weighted sum of LoRAs, exact: concatenated factors, or re-factorised to a chosen rank by SVD.

The merged delta of a module is sum_i w_i * (alpha_i / r_i) * B_i A_i. Concatenating along the rank axis,
up = [w_1 s_1 B_1 | w_2 s_2 B_2 | ...], down = [A_1; A_2; ...] with alpha = total rank, is that sum exactly.
(Summing the ups and the downs separately, as several popular tools do, adds cross terms B_i A_j.)

The SVD form is the best rank-k approximation of that exact sum (Eckart-Young), computed from the factors
through two thin QR decompositions, so the dense matrix is never formed and the discarded energy is known
exactly: error = sqrt(sum of the dropped singular values^2) / ||delta||.

    >>> factors = concat_merge(sources)  # doctest: +SKIP
    >>> f = factors["unet.mid_block.attentions.0.proj_in"]  # doctest: +SKIP
    >>> truncated, error = truncate_factors(f, rank=8)  # doctest: +SKIP
"""

from __future__ import annotations

import torch

from merging.sources import Factors, MergeSource, balanced_factors, require_nonempty, union_paths


def concat_merge(sources: list[MergeSource]) -> dict[str, Factors]:
    """Exact weighted sum as concatenated factors (rank of each module = sum of the sources' ranks there).

    Modules present in only some sources are fine: the others contribute nothing there.
    """
    out = {}
    for path in union_paths(sources):
        parts = [s.factors()[path] for s in sources if path in s.factors()]
        out[path] = Factors(torch.cat([p.up for p in parts], 1), torch.cat([p.down for p in parts], 0))
    require_nonempty(out, sources)
    return out


def svd_merge(sources: list[MergeSource], rank: int) -> tuple[dict[str, Factors], dict[str, float]]:
    """Exact weighted sum re-factorised to at most `rank` per module; returns (factors, relative error)."""
    out, errors = {}, {}
    for path, f in concat_merge(sources).items():
        out[path], errors[path] = truncate_factors(f, rank)
    return out, errors


def truncate_factors(f: Factors, rank: int) -> tuple[Factors, float]:
    """Best rank-`rank` approximation of f.up @ f.down and its relative Frobenius error.

    up = Qb Rb and down^T = Qa Ra (thin QR), so up @ down = Qb (Rb Ra^T) Qa^T: the SVD of the small
    (r x r) core gives the SVD of the whole product. Done in float64 so that, at full rank, the result
    equals the input to float32 precision.
    """
    up, down = f.up.to(torch.float64), f.down.to(torch.float64)
    qb, rb = torch.linalg.qr(up)
    qa, ra = torch.linalg.qr(down.T)
    u, s, vh = torch.linalg.svd(rb @ ra.T)
    k = min(rank, int(s.numel()))
    total = float(s.square().sum())
    error = (float(s[k:].square().sum()) / total) ** 0.5 if total > 0 else 0.0
    new = balanced_factors(qb @ u[:, :k], s[:k], vh[:k] @ qa.T)
    return Factors(new.up.to(f.up.dtype), new.down.to(f.down.dtype)), error


# The randomized SVD's power iterations and extra columns: on TIES / DARE results at SDXL shapes, 2 or 4
# iterations and 10 extra columns move the error by under 0.3 % of itself, at 1.3-2x the time
# (bench/results/merge_levers.md).
POWER_ITERATIONS = 1
OVERSAMPLE = 4


def truncate_dense(
    delta: torch.Tensor, rank: int, solver: str = "auto", seed: int = 0, niter: int | None = None
) -> tuple[Factors, float]:
    """Rank-`rank` factors of a dense (out, in) matrix and the relative error actually left.

    solver: "full" = torch.linalg.svd (the optimum), "randomized" = a randomized range finder with a few
    power iterations (much faster when rank << size), "auto" = randomized only when that is the case.
    The error comes from the singular values (||D||^2 - sum of the kept s^2, exact for both solvers because
    the factors are the projection onto an orthonormal basis); when that difference is too small for float
    precision (errors under 1 %) it is measured on the matrix instead.
    """
    delta = delta.to(torch.float32)
    k = min(rank, *delta.shape)
    small = min(delta.shape)
    randomized = solver == "randomized" or (
        solver == "auto" and small >= 256 and 4 * (k + OVERSAMPLE) <= small
    )
    if randomized:
        niter = POWER_ITERATIONS if niter is None else niter
        u, s, vh = _randomized_svd(delta, min(k + OVERSAMPLE, small), niter, seed)
    else:
        u, s, vh = torch.linalg.svd(delta, full_matrices=False)
    factors = balanced_factors(u[:, :k], s[:k], vh[:k])
    return factors, truncation_error(delta, factors, s[:k], float(delta.norm()) ** 2)


def truncation_error(delta: torch.Tensor, factors: Factors, kept: torch.Tensor, total: float) -> float:
    """Relative error of factors made from the singular values `kept` of `delta` (total = ||delta||^2):
    from the singular values, or measured on the matrix when it is too small for float precision."""
    if total == 0:
        return 0.0
    left = total - float(kept.double().square().sum())
    if left > 1e-4 * total:  # an error above 1 %: float32 sums give it to well under 1 % of itself
        return (left / total) ** 0.5
    return float((delta - factors.delta()).norm()) / total**0.5


def _randomized_svd(a: torch.Tensor, q: int, niter: int, seed: int):
    """Halko-Martinsson-Tropp with power iterations, as torch.svd_lowrank, but drawing from a generator:
    torch.svd_lowrank takes no generator, and seeding the global one is not safe across threads."""
    g = torch.Generator(device="cpu").manual_seed(seed)
    omega = torch.randn(a.shape[1], q, generator=g).to(a.device)
    basis = torch.linalg.qr(a @ omega).Q
    for _ in range(niter):
        basis = torch.linalg.qr(a @ torch.linalg.qr(a.T @ basis).Q).Q
    u, s, vh = torch.linalg.svd(basis.T @ a, full_matrices=False)
    return basis @ u, s, vh


def default_rank(sources: list[MergeSource]) -> int:
    """Rank used when none is given: the largest rank among the sources (16 when none has one: LoKr
    files of full matrices)."""
    return max((r for s in sources for r in s.lora.ranks), default=16)
