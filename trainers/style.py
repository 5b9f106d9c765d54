"""Style LoRA: a folder of images with one caption file each (name.txt), kohya-style caption handling.

Captions missing a file fall back to `prompt` (a template such as "an illustration in sks style"); caption
dropout, tag shuffling with the first `keep_tokens` tags kept in place, and `repeats` work as in kohya.
With reg_data_dir, captioned images without the style (kohya's regularisation folder) train alongside with
prior_loss_weight, so the LoRA learns the style word rather than the style images' content.

    lora-studio train --preset train_style_sd15 --data-dir art/ --prompt "an illustration in sks style"
"""

from __future__ import annotations

from studio.core.errors import ConfigError
from studio.core.families import Family
from trainers.config import TrainConfig
from trainers.data import scan_dataset
from trainers.methods import DataContext, DataPart, Method, instance_part, require_data_dir, spec_from_config


def check(cfg: TrainConfig, family: Family) -> None:
    require_data_dir(cfg)
    if cfg.keep_tokens and not cfg.shuffle_caption:
        raise ConfigError("keep_tokens only applies with shuffle_caption = true; set one or clear the other")


def data(cfg: TrainConfig, ctx: DataContext) -> list[DataPart]:
    part = instance_part(cfg, ctx)
    if part.dataset.missing_captions:
        ctx.events.emit(
            "log",
            message=f"{len(part.dataset.missing_captions)} of {len(part.dataset)} images have no caption file "
            f"and use the prompt {cfg.prompt!r} (e.g. {part.dataset.missing_captions[0].name})",
        )
    if not cfg.reg_data_dir:
        return [part]
    reg = scan_dataset(cfg.reg_data_dir, prompt="", use_captions=True, what="reg_data_dir")
    ctx.events.emit(
        "log",
        message=f"regularisation set: {len(reg)} images from {cfg.reg_data_dir}, weight {cfg.prior_loss_weight:g}",
    )
    return [part, DataPart(reg, cfg.prior_loss_weight, "regularisation")]


METHOD = Method("style", check=check, data=data, target_spec=spec_from_config)
