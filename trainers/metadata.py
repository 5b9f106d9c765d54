"""Metadata written into a trained LoRA: kohya's ss_* training fields plus the studio's own.

A1111, ComfyUI, civitai and kohya's tools read these (ss_tag_frequency feeds the tag list users see).
"""

from __future__ import annotations

import json
from collections.abc import Mapping

from studio.core.options import config_to_dict
from studio.core.targets import ModuleTarget, summarize_plan
from trainers.config import TrainConfig
from trainers.data import tag_frequency
from trainers.methods import DataPart


def training_metadata(
    cfg: TrainConfig,
    *,
    parts: list[DataPart],
    plan: Mapping[str, ModuleTarget],
    step: int,
    started: float,
    finished: float,
    model_name: str,
    model_hash: str,
    extra: Mapping[str, str] | None = None,
) -> dict[str, str]:
    """ss_* fields (kohya's names and formats) and studio_* fields for a LoRA trained with `cfg`."""
    meta = {
        "ss_training_started_at": f"{started:.0f}",
        "ss_training_finished_at": f"{finished:.0f}",
        "ss_output_name": cfg.output_name,
        **_recipe_fields(cfg),
        **_data_fields(cfg, parts, step),
        "ss_sd_model_name": model_name,
        "ss_sd_model_hash": model_hash,
        "ss_new_sd_model_hash": model_hash,
        "studio_method": cfg.method,
        "studio_train_config": json.dumps(config_to_dict(cfg), default=str),
        "studio_blocks_plan": json.dumps(summarize_plan(plan)),
    }
    if cfg.method == "dreambooth":
        meta["studio_instance_prompt"] = cfg.prompt
        if cfg.prior_preservation:
            meta["studio_class_prompt"] = cfg.class_prompt
    meta.update(extra or {})
    return meta


def _recipe_fields(cfg: TrainConfig) -> dict[str, str]:
    """How it was trained: learning rates, optimizer and schedule, precision, noise and network options."""
    return {
        "ss_learning_rate": f"{cfg.learning_rate:g}",
        "ss_unet_lr": f"{cfg.learning_rate:g}",
        "ss_text_encoder_lr": f"{cfg.effective_text_encoder_lr:g}" if cfg.train_text_encoder else "0",
        "ss_max_train_steps": str(cfg.max_steps),
        "ss_train_batch_size": str(cfg.batch_size),
        "ss_gradient_accumulation_steps": str(cfg.gradient_accumulation_steps),
        "ss_optimizer": cfg.optimizer,
        "ss_lr_scheduler": cfg.lr_scheduler,
        "ss_lr_warmup_steps": str(cfg.lr_warmup_steps),
        "ss_mixed_precision": cfg.mixed_precision,
        "ss_gradient_checkpointing": str(cfg.gradient_checkpointing),
        "ss_min_snr_gamma": f"{cfg.min_snr_gamma:g}" if cfg.min_snr_gamma else "None",
        "ss_noise_offset": f"{cfg.noise_offset:g}" if cfg.noise_offset else "None",
        "ss_max_grad_norm": f"{cfg.max_grad_norm:g}",
        "ss_seed": str(cfg.seed),
        "ss_clip_skip": str(cfg.clip_skip),
        "ss_prior_loss_weight": f"{cfg.prior_loss_weight:g}",
        "ss_network_dropout": f"{cfg.lora_dropout:g}",
        "ss_network_train_unet_only": str(not cfg.train_text_encoder),
        "ss_network_args": json.dumps(_network_args(cfg)),
    }


def _data_fields(cfg: TrainConfig, parts: list[DataPart], step: int) -> dict[str, str]:
    """What it was trained on: images, repeats, buckets, epochs, caption handling and tag frequency."""
    instances = [p for p in parts if p.name == "instance"]
    classes = [p for p in parts if p.name != "instance"]  # kohya's "reg images": class or regularisation
    datasets = [p.dataset for p in parts]
    batches_per_epoch = sum(-(-len(d) * d.repeats // cfg.batch_size) for d in (p.dataset for p in instances))
    folders = {
        f"{d.repeats}_{d.folder.name}": {"n_repeats": d.repeats, "img_count": len(d.images)} for d in datasets
    }
    return {
        "ss_steps": str(step),
        "ss_epoch": str(max(1, -(-step * cfg.gradient_accumulation_steps // max(batches_per_epoch, 1)))),
        "ss_num_train_images": str(sum(len(p.dataset.images) * p.dataset.repeats for p in instances)),
        "ss_num_reg_images": str(sum(len(p.dataset.images) for p in classes)),
        "ss_resolution": f"({cfg.resolution}, {cfg.resolution})",
        "ss_enable_bucket": str(cfg.enable_buckets),
        "ss_bucket_info": json.dumps(_bucket_info(parts)),
        "ss_caption_dropout_rate": f"{cfg.caption_dropout_rate:g}",
        "ss_shuffle_caption": str(cfg.shuffle_caption),
        "ss_keep_tokens": str(cfg.keep_tokens),
        "ss_flip_aug": str(cfg.flip_aug),
        "ss_cache_latents": str(cfg.cache_latents),
        "ss_dataset_dirs": json.dumps(folders),
        "ss_tag_frequency": json.dumps(tag_frequency(datasets, cfg.caption_separator)),
    }


def _bucket_info(parts: list[DataPart]) -> dict:
    counts: dict[str, int] = {}
    for part in parts:
        for ex in part.dataset.examples:
            key = f"{ex.bucket[0]}x{ex.bucket[1]}"
            counts[key] = counts.get(key, 0) + part.dataset.repeats
    return {
        "buckets": {k: {"resolution": [int(v) for v in k.split("x")], "count": n} for k, n in counts.items()}
    }


def _network_args(cfg: TrainConfig) -> dict[str, object]:
    args: dict[str, object] = {}
    if cfg.network_type != "lora":  # as LyCORIS' kohya network records them
        args["algo"] = {"dora": "lora"}.get(cfg.network_type, cfg.network_type)
        if cfg.network_type == "dora":
            args["dora_wd"] = True
        if cfg.network_type == "lokr":
            args["factor"] = cfg.lokr_factor
    if cfg.effective_conv_rank:
        conv = cfg.effective_conv_rank
        args.update(conv_dim=conv, conv_alpha=cfg.conv_alpha or conv)
    for name in ("block_dims", "block_alphas", "conv_block_dims", "conv_block_alphas"):
        if getattr(cfg, name):
            args[name] = ",".join(f"{v:g}" for v in getattr(cfg, name))
    for name in ("down_lr_weight", "mid_lr_weight", "up_lr_weight", "block_rank", "block_alpha", "block_lr"):
        if getattr(cfg, name):
            args[name] = getattr(cfg, name)
    if cfg.blocks:
        args["blocks"] = ",".join(cfg.blocks)
    if cfg.layers:
        args["layers"] = ",".join(cfg.layers)
    if cfg.block_lr_zero_threshold:
        args["block_lr_zero_threshold"] = cfg.block_lr_zero_threshold
    return args
