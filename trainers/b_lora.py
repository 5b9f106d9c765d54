"""B-LoRA (Frenkel et al. 2024): content and style of ONE image, in two SDXL blocks.

LoRA goes only on to_q, to_k, to_v and to_out.0 of every attention (self and cross) in
up_blocks.0.attentions.0 (content, block OUT00) and up_blocks.0.attentions.1 (style, block OUT01).
The reference recipe is the preset train_b_lora_sdxl: rank 64, alpha = rank, lr 5e-5 constant, 1000 steps,
prompt "A [v]", resize only (no crop, no flip).

One kohya file holds both halves; each half loads alone by taking its block's modules (OUT00 or OUT01, e.g.
`LoraSet.subset((B_LORA_CONTENT,))`). With split = true the halves are also written as <name>_content and
<name>_style files that any tool loads as ordinary LoRAs.

    lora-studio train --preset train_b_lora_sdxl --model sdxl.safetensors --data-dir one_image/
"""

from __future__ import annotations

from pathlib import Path

from studio.core.errors import ConfigError, FamilyMismatchError
from studio.core.families import Family
from studio.core.lora_files import B_LORA_CONTENT, B_LORA_STYLE, LoraSet, write_lora
from trainers.config import TrainConfig
from trainers.methods import DataContext, DataPart, Method, instance_part, require_data_dir, spec_from_config

CONTENT_BLOCK, STYLE_BLOCK = "OUT00", "OUT01"
LAYERS = ["to_q", "to_k", "to_v", "to_out.0"]


def check(cfg: TrainConfig, family: Family) -> None:
    if family != "sdxl":
        raise FamilyMismatchError(
            "B-LoRA is defined on SDXL's up_blocks.0 (content OUT00, style OUT01); the base model is SD1.5. "
            "Use an SDXL base model, or the style / block-wise methods for SD1.5."
        )
    require_data_dir(cfg)
    if cfg.train_text_encoder or cfg.effective_conv_rank:
        raise ConfigError(
            "B-LoRA trains only UNet attention: set train_text_encoder = false and conv_rank = 0"
        )
    if cfg.network_type not in ("lora", "dora"):
        raise ConfigError(
            f"B-LoRA trains LoRA (or DoRA) layers; network_type {cfg.network_type!r} is not one"
        )
    extra = [b for b in cfg.blocks if b.upper() not in (CONTENT_BLOCK, STYLE_BLOCK)]
    if extra:
        raise ConfigError(f"B-LoRA uses blocks OUT00 and OUT01 only; remove {', '.join(extra)} from blocks")


def target_spec(cfg: TrainConfig, family: Family):
    spec = spec_from_config(cfg, family)
    spec.blocks = [b.upper() for b in cfg.blocks] or [CONTENT_BLOCK, STYLE_BLOCK]
    spec.layers = [name for name in cfg.layers] or LAYERS
    return spec


def data(cfg: TrainConfig, ctx: DataContext) -> list[DataPart]:
    part = instance_part(cfg, ctx)
    if len(part.dataset) > 1:
        ctx.events.emit(
            "log",
            message=f"B-LoRA separates content and style of one image; {part.dataset.folder} holds "
            f"{len(part.dataset)}, so both halves learn what the images share.",
        )
    return [part]


def save_halves(cfg: TrainConfig, lora: LoraSet, path: Path, metadata: dict[str, str]) -> list[Path]:
    """With split: write the content (OUT00) and style (OUT01) halves next to the full file."""
    if not cfg.split:
        return []
    out = []
    for half, prefix in (("content", B_LORA_CONTENT), ("style", B_LORA_STYLE)):
        part = lora.subset((prefix,))
        if not part.modules:
            continue
        meta = {**metadata, "studio_b_lora_part": half}
        target = path.with_name(f"{path.stem}_{half}{path.suffix}")
        out.append(write_lora(part, target, family="sdxl", metadata=meta, overwrite=cfg.overwrite))
    return out


METHOD = Method("b_lora", check=check, data=data, target_spec=target_spec, save_extra=save_halves)
