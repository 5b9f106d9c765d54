"""Orthogonal adaptation (Po et al. 2023): each concept trains only lora_B; lora_A is frozen to its own slice
of a shared seeded orthogonal basis, so concepts trained with the same seed merge by a plain sum.

Train concept 0 with ortho_slice = 0, concept 1 with ortho_slice = 1 ... all with the same ortho_seed,
rank and ortho_num_concepts. The file's metadata records studio_ortho_seed, studio_ortho_slice and
studio_ortho_rank so a merge can check that the LoRAs really are mutually orthogonal.

    lora-studio train --preset train_orthogonal_sd15 --data-dir dog/ --prompt "a photo of sks dog" \\
        --set ortho_slice=0
"""

from __future__ import annotations

import torch

from studio.core.errors import ConfigError
from studio.core.families import Family
from studio.core.orthogonal_basis import (
    ORTHO_RANK_KEY,
    ORTHO_SEED_KEY,
    ORTHO_SLICE_KEY,
    basis_slice,
    check_capacity,
)
from studio.core.targets import ModuleTarget
from trainers.config import TrainConfig
from trainers.methods import DataContext, DataPart, Method, instance_part, require_data_dir, spec_from_config
from trainers.network import ADAPTER


def check(cfg: TrainConfig, family: Family) -> None:
    require_data_dir(cfg)
    if cfg.block_rank or cfg.block_dims or cfg.conv_block_dims:
        raise ConfigError(
            "orthogonal adaptation needs one rank for every module (the basis is cut in slices of that rank); "
            "remove block_rank / block_dims / conv_block_dims"
        )
    if cfg.network_type not in ("lora", "locon"):
        raise ConfigError(
            "orthogonal adaptation freezes LoRA's down factors to an orthogonal basis: use network_type lora "
            f"(or locon), not {cfg.network_type}"
        )
    if cfg.effective_conv_rank and cfg.effective_conv_rank != cfg.rank:
        raise ConfigError("orthogonal adaptation: conv_rank must be 0 or equal to rank")


def data(cfg: TrainConfig, ctx: DataContext) -> list[DataPart]:
    return [instance_part(cfg, ctx)]


def input_width(layer: torch.nn.Module) -> int:
    """Width of the vectors the down-projection sees: in_features, or in_channels x kernel area for convs."""
    weight = layer.lora_A[ADAPTER].weight
    return int(weight[0].numel())


@torch.no_grad()
def freeze_down_projections(
    cfg: TrainConfig, layers: dict[str, torch.nn.Module], plan: dict[str, ModuleTarget]
) -> dict[str, str]:
    """Set every lora_A to its basis slice and freeze it; returns the metadata to store in the file."""
    check_capacity({p: input_width(layer) for p, layer in layers.items()}, cfg.rank, cfg.ortho_num_concepts,
                   cfg.ortho_slice)  # fmt: skip
    for layer in layers.values():
        weight = layer.lora_A[ADAPTER].weight
        down = basis_slice(input_width(layer), cfg.rank, cfg.ortho_slice, cfg.ortho_seed)
        weight.copy_(down.reshape(weight.shape).to(weight.dtype))
        weight.requires_grad_(False)
    return {
        ORTHO_SEED_KEY: str(cfg.ortho_seed),
        ORTHO_SLICE_KEY: str(cfg.ortho_slice),
        ORTHO_RANK_KEY: str(cfg.rank),
        "studio_ortho_num_concepts": str(cfg.ortho_num_concepts),
    }


METHOD = Method(
    "orthogonal", check=check, data=data, target_spec=spec_from_config, prepare_lora=freeze_down_projections
)
