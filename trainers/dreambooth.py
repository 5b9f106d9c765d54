"""DreamBooth LoRA (SD1.5 and SDXL): a few images of one subject and an instance prompt with a rare token.

With prior_preservation, class images (the user's folder, filled up to num_class_images by generating with
the base model before any LoRA is added) are trained alongside with their own loss, weighted by
prior_loss_weight, so the class word keeps its meaning.

    lora-studio train --preset train_dreambooth_sd15 --data-dir dog/ --prompt "a photo of sks dog" \\
        --prior-preservation --class-prompt "a photo of a dog" --num-class-images 100
"""

from __future__ import annotations

from pathlib import Path

from studio.core.errors import ConfigError
from studio.core.families import Family
from trainers.config import TrainConfig
from trainers.data import scan_dataset
from trainers.methods import DataContext, DataPart, Method, instance_part, require_data_dir, spec_from_config
from trainers.samples import generate_class_images


def check(cfg: TrainConfig, family: Family) -> None:
    require_data_dir(cfg)
    if not cfg.prompt:
        raise ConfigError(
            "DreamBooth needs an instance prompt with a rare token, e.g. --prompt 'a photo of sks dog'"
        )
    if cfg.prior_preservation:
        if not cfg.class_prompt:
            raise ConfigError("prior preservation needs class_prompt, e.g. --class-prompt 'a photo of a dog'")
        if cfg.num_class_images < 1:
            raise ConfigError("prior preservation needs num_class_images of 1 or more")


def class_folder(cfg: TrainConfig) -> Path:
    return Path(cfg.class_data_dir) if cfg.class_data_dir else Path(cfg.output_dir) / "class_images"


def data(cfg: TrainConfig, ctx: DataContext) -> list[DataPart]:
    parts = [instance_part(cfg, ctx)]
    if not cfg.prior_preservation:
        return parts
    folder = class_folder(cfg)
    accelerator = ctx.accelerator
    if accelerator.is_main_process:
        made = generate_class_images(
            ctx.pipe, cfg.class_prompt, folder, cfg.num_class_images, seed=cfg.seed,
            steps=cfg.class_generation_steps, size=cfg.resolution, progress=cfg.progress_bar,
        )  # fmt: skip
        if made:
            ctx.events.emit("log", message=f"generated {len(made)} class images in {folder}")
    accelerator.wait_for_everyone()
    classes = scan_dataset(folder, prompt=cfg.class_prompt, use_captions=False, what="class_data_dir")
    return parts + [DataPart(classes, cfg.prior_loss_weight, "class")]


METHOD = Method("dreambooth", check=check, data=data, target_spec=spec_from_config)
