"""What makes one training method different from another, as five plain functions, and the registry.

A method module (trainers/dreambooth.py, style.py, b_lora.py, orthogonal.py) defines METHOD = Method(...).
Everything else (models, loss, optimizer, checkpoints, saving) is the shared loop in trainers/loop.py.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from studio.core.errors import ConfigError
from studio.core.families import Family
from studio.core.lora_files import LoraSet
from studio.core.targets import ModuleTarget, TargetSpec, parse_block_map
from trainers.config import METHODS, TrainConfig
from trainers.data import Dataset, scan_dataset


@dataclass
class DataPart:
    """A dataset and the weight of its loss (class images of prior preservation use prior_loss_weight)."""

    dataset: Dataset
    loss_weight: float = 1.0
    name: str = "instance"


@dataclass
class DataContext:
    """What a method may use to build its data: the base pipeline (before any LoRA), events, process info,
    and the images of data_dir, scanned once when the run started (None without data_dir)."""

    pipe: object
    family: Family
    events: object
    accelerator: object
    instance: Dataset | None = None


@dataclass(frozen=True)
class Method:
    name: str
    check: Callable[[TrainConfig, Family], None]
    data: Callable[[TrainConfig, DataContext], list[DataPart]]
    target_spec: Callable[[TrainConfig, Family], TargetSpec] = field(default=None)  # type: ignore[assignment]
    prepare_lora: Callable[[TrainConfig, dict, dict[str, ModuleTarget]], dict[str, str]] | None = None
    save_extra: Callable[[TrainConfig, LoraSet, Path, dict[str, str]], list[Path]] | None = None


def get_method(name: str) -> Method:
    if name not in METHODS:
        raise ConfigError(f"unknown training method {name!r}; use one of: {', '.join(METHODS)}")
    return importlib.import_module(f"trainers.{name}").METHOD


def spec_from_config(cfg: TrainConfig, family: Family) -> TargetSpec:
    """The block-wise targeting options of a config, for studio.core.targets.plan_targets."""
    return TargetSpec(
        rank=cfg.rank,
        alpha=cfg.alpha or None,
        conv_rank=cfg.effective_conv_rank,
        conv_alpha=cfg.conv_alpha or None,
        text_encoder=cfg.train_text_encoder,
        blocks=[b.strip().upper() for b in cfg.blocks if b.strip()],
        layers=[name.strip() for name in cfg.layers if name.strip()],
        block_rank={k: int(v) for k, v in parse_block_map(cfg.block_rank, family, "block_rank").items()},
        block_alpha=parse_block_map(cfg.block_alpha, family, "block_alpha"),
        block_lr=parse_block_map(cfg.block_lr, family, "block_lr"),
        block_dims=cfg.block_dims,
        block_alphas=cfg.block_alphas,
        conv_block_dims=cfg.conv_block_dims,
        conv_block_alphas=cfg.conv_block_alphas,
        down_lr_weight=cfg.down_lr_weight or None,
        mid_lr_weight=cfg.mid_lr_weight or None,
        up_lr_weight=cfg.up_lr_weight or None,
        block_lr_zero_threshold=cfg.block_lr_zero_threshold,
    )


def require_data_dir(cfg: TrainConfig) -> None:
    if not cfg.data_dir:
        raise ConfigError(f"method {cfg.method} needs data_dir: a folder of training images (--data-dir)")


def instance_dataset(cfg: TrainConfig) -> Dataset:
    """The main images of a run (data_dir), captions from files where present, else cfg.prompt."""
    return scan_dataset(
        cfg.data_dir,
        prompt=cfg.prompt,
        use_captions=cfg.use_captions,
        caption_extension=cfg.caption_extension,
        repeats=cfg.repeats,
        strict=cfg.strict_images,
    )


def instance_part(cfg: TrainConfig, ctx: DataContext) -> DataPart:
    """The main images as a data part of the run (the dataset scanned at the start)."""
    return DataPart(ctx.instance if ctx.instance is not None else instance_dataset(cfg), 1.0, "instance")
