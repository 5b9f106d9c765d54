"""Orthogonal adaptation: frozen LoRA down-projections taken from a shared, seeded orthogonal basis.

Every concept trained with the same seed draws its down-projection (lora_A / lora_down) from the same
random orthogonal matrix of each input width, each concept from its own slice of rows. Rows from different
slices are orthogonal, so one concept's delta barely touches the inputs of another and the LoRAs can be summed.

    >>> down = basis_slice(width=320, rank=4, slice_index=2, seed=0)
    >>> down.shape
    torch.Size([4, 320])

Files record the seed, slice and rank in their metadata (ORTHO_SEED_KEY, ORTHO_SLICE_KEY, ORTHO_RANK_KEY) so a
merge can check that two LoRAs really use disjoint slices of the same basis.
"""

from __future__ import annotations

from collections.abc import Mapping
from functools import lru_cache

import torch

from studio.core.errors import ConfigError

ORTHO_SEED_KEY = "studio_ortho_seed"
ORTHO_SLICE_KEY = "studio_ortho_slice"
ORTHO_RANK_KEY = "studio_ortho_rank"


@lru_cache(maxsize=32)
def orthogonal_basis(width: int, seed: int) -> torch.Tensor:
    """A (width, width) matrix with orthonormal rows, the same for the same (width, seed) on any machine.

    Computed in float64 on the CPU from torch's seeded generator; QR signs are fixed so the result is unique.
    """
    g = torch.Generator(device="cpu").manual_seed((int(seed) * 1_000_003 + int(width)) % (2**63))
    gauss = torch.randn((width, width), generator=g, dtype=torch.float64)
    q, r = torch.linalg.qr(gauss)
    q = q * torch.sign(torch.diagonal(r)).where(torch.diagonal(r) != 0, torch.ones(()))
    return q.T.contiguous()


def max_concepts(width: int, rank: int) -> int:
    """How many concepts of this rank fit in a basis of this width."""
    return width // rank


def basis_slice(width: int, rank: int, slice_index: int, seed: int) -> torch.Tensor:
    """Rows [slice_index * rank, (slice_index + 1) * rank) of the basis, as float32 (rank, width)."""
    if slice_index < 0:
        raise ConfigError(f"orthogonal slice (concept index) must be 0 or more, got {slice_index}")
    if (slice_index + 1) * rank > width:
        raise ConfigError(
            f"orthogonal adaptation: concept index {slice_index} at rank {rank} needs "
            f"{(slice_index + 1) * rank} basis rows, but input width {width} has only {width} "
            f"(at most {max_concepts(width, rank)} concepts of rank {rank}). Lower the rank or the concept index."
        )
    start = slice_index * rank
    return orthogonal_basis(width, seed)[start : start + rank].to(torch.float32)


def check_capacity(widths: Mapping[str, int], rank: int, num_concepts: int, slice_index: int) -> None:
    """Refuse settings where some input width cannot hold num_concepts disjoint slices of this rank.

    widths maps module paths to their input width (in_features, or in_channels * kh * kw for convs).
    """
    if not 0 <= slice_index < num_concepts:
        raise ConfigError(
            f"orthogonal concept index {slice_index} is outside 0..{num_concepts - 1} "
            f"(ortho_num_concepts = {num_concepts})"
        )
    too_small: dict[int, list[str]] = {}
    for path, width in widths.items():
        if rank * num_concepts > width:
            too_small.setdefault(width, []).append(path)
    if too_small:
        parts = [
            f"width {w} ({len(p)} modules, e.g. {p[0]}) holds at most {max_concepts(w, rank)}"
            for w, p in sorted(too_small.items())
        ]
        raise ConfigError(
            f"orthogonal adaptation: rank {rank} x {num_concepts} concepts = {rank * num_concepts} basis rows, "
            f"more than some input widths have: {'; '.join(parts)}. Lower the rank or the number of concepts, "
            "or leave those modules out (blocks / layers)."
        )


def orthogonality_error(down_a: torch.Tensor, down_b: torch.Tensor) -> float:
    """Largest |<row of A, row of B>| between two down-projections (0 for disjoint slices of one basis)."""
    a = down_a.flatten(1).to(torch.float64)
    b = down_b.flatten(1).to(torch.float64)
    return float((a @ b.T).abs().max())
