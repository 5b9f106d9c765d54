"""Merging LoRAs trained with orthogonal adaptation: a plain weighted sum, after checking the premise.

Orthogonal adaptation freezes each concept's down-projection to its own slice of a shared, seeded orthogonal
basis, so that concept j's delta barely touches the inputs concept i reads (crosstalk ||dW_j X_i|| ~ 0)
and the sum of the LoRAs keeps every concept. That only holds if the files really come from disjoint
slices of one basis, so both sources of evidence are checked:
- metadata written by the trainer (studio_ortho_seed, studio_ortho_slice, studio_ortho_rank):
  same seed, non-overlapping row ranges;
- the factors themselves: for every module two sources share, the normalised overlap
  ||A_i A_j^T||_F / (||A_i||_F ||A_j||_F) (0 for orthogonal rows, about 1/sqrt(width) for random ones).
A failed check is a warning with the measured numbers, not a refusal: the sum is still the exact sum.

    >>> factors, info = orthogonal_merge(sources, tolerance=0.005)  # doctest: +SKIP
    >>> info["warnings"]  # doctest: +SKIP
    []
"""

from __future__ import annotations

import itertools

import torch

from merging.linear import concat_merge
from merging.sources import Factors, MergeSource
from studio.core.orthogonal_basis import ORTHO_RANK_KEY, ORTHO_SEED_KEY, ORTHO_SLICE_KEY


def orthogonal_merge(sources: list[MergeSource], tolerance: float = 0.005) -> tuple[dict[str, Factors], dict]:
    """Exact weighted sum (concatenated factors) plus the orthogonality check; see the module docstring."""
    factors = concat_merge(sources)
    info = check_orthogonality(sources, tolerance)
    return factors, info


def check_orthogonality(sources: list[MergeSource], tolerance: float) -> dict:
    """{"pairs": [{a, b, max_overlap, mean_overlap, worst_module, shared_modules}], "warnings": [...]}."""
    warnings = _metadata_warnings(sources)
    pairs = []
    for a, b in itertools.combinations(sources, 2):
        overlaps = {
            path: down_overlap(a.own_factors(path).down, b.own_factors(path).down)
            for path in a.factors()
            if path in b.factors()
        }
        if not overlaps:
            warnings.append(f"{a.label} and {b.label} adapt no module in common: nothing to check.")
            continue
        worst = max(overlaps, key=overlaps.get)
        pair = {
            "a": a.label,
            "b": b.label,
            "shared_modules": len(overlaps),
            "max_overlap": overlaps[worst],
            "mean_overlap": sum(overlaps.values()) / len(overlaps),
            "worst_module": worst,
        }
        pairs.append(pair)
        if pair["max_overlap"] > tolerance:
            warnings.append(
                f"{a.label} and {b.label} are not orthogonal: their down-projections overlap by up to "
                f"{pair['max_overlap']:.3g} (mean {pair['mean_overlap']:.3g}, tolerance {tolerance:g}) at "
                f"{worst}. The sum is exact, but each will disturb the other as in a plain merge; "
                "train both with orthogonal adaptation, the same basis seed and different slices."
            )
    return {"pairs": pairs, "warnings": warnings}


def down_overlap(down_a: torch.Tensor, down_b: torch.Tensor) -> float:
    """||A_a A_b^T||_F / (||A_a||_F ||A_b||_F): 0 when all rows of one are orthogonal to all of the other."""
    a = down_a.flatten(1).to(torch.float64)
    b = down_b.flatten(1).to(torch.float64)
    denom = float(a.norm() * b.norm())
    return float((a @ b.T).norm()) / denom if denom > 0 else 0.0


def _metadata_warnings(sources: list[MergeSource]) -> list[str]:
    warnings = []
    claims = {}
    for s in sources:
        meta = s.lora.metadata
        if ORTHO_SEED_KEY not in meta or ORTHO_SLICE_KEY not in meta:
            warnings.append(
                f"{s.label} has no orthogonal-adaptation metadata ({ORTHO_SEED_KEY}, {ORTHO_SLICE_KEY}); "
                "checking its factors only."
            )
            continue
        try:
            seed, index = int(meta[ORTHO_SEED_KEY]), int(meta[ORTHO_SLICE_KEY])
            rank = int(meta.get(ORTHO_RANK_KEY) or max(s.lora.ranks))
        except ValueError:
            warnings.append(
                f"{s.label}: unreadable orthogonal-adaptation metadata; checking its factors only."
            )
            continue
        claims[s.label] = (seed, range(index * rank, (index + 1) * rank))
    for (la, (seed_a, rows_a)), (lb, (seed_b, rows_b)) in itertools.combinations(claims.items(), 2):
        if seed_a != seed_b:
            warnings.append(
                f"{la} and {lb} use different orthogonal bases (seeds {seed_a} and {seed_b}): their "
                "down-projections are not orthogonal to each other. Train every concept with the same seed."
            )
        elif set(rows_a) & set(rows_b):
            warnings.append(
                f"{la} and {lb} use overlapping slices of the same basis "
                f"(rows {rows_a.start}-{rows_a.stop - 1} "
                f"and {rows_b.start}-{rows_b.stop - 1}): give each concept its own slice index."
            )
    return warnings
