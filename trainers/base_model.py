"""The base model of a run: loaded (or handed in), frozen, cast, put on the device, attention chosen.

>>> models = prepare_models(cfg, pipe, "sd15", accelerator)  # doctest: +SKIP
"""

from __future__ import annotations

import importlib.util
from dataclasses import dataclass

import torch
from diffusers import DDPMScheduler

from studio.core.errors import ConfigError
from studio.core.model_paths import resolve_model
from studio.core.models import load_base
from trainers.config import TrainConfig


@dataclass
class TrainModels:
    pipe: object
    family: str
    unet: torch.nn.Module
    vae: torch.nn.Module
    text_encoders: list
    tokenizers: list
    noise_scheduler: DDPMScheduler
    weight_dtype: torch.dtype
    attention: str
    name: str = ""
    model_hash: str = ""
    token_words: object | None = None  # trainers.token_words.TokenWords when cfg.token_words are learnt


def load_base_model(cfg: TrainConfig):
    """Load cfg.model (diffusers folder or single file) with studio.core.models; '' means the built-in demo model."""
    path, _ = resolve_model(cfg.model or None)
    # fp32 on the CPU: prepare_models moves and casts for the run's device and mixed precision
    return load_base(path, device="cpu", dtype=torch.float32, allow_pickle=cfg.allow_pickle)


def resolve_mixed_precision(cfg: TrainConfig, cuda: bool) -> str:
    if cfg.mixed_precision == "auto":
        return ("bf16" if torch.cuda.is_bf16_supported() else "fp16") if cuda else "no"
    if cfg.mixed_precision == "fp16" and not cuda:
        raise ConfigError("mixed_precision fp16 needs a CUDA GPU; use 'no' (or 'bf16') on the CPU")
    return cfg.mixed_precision


def prepare_models(cfg: TrainConfig, pipe, family: str, accelerator) -> TrainModels:
    """Freeze every base weight, cast frozen weights to the mixed-precision dtype, choose the attention kernel."""
    weight_dtype = {"fp16": torch.float16, "bf16": torch.bfloat16}.get(
        accelerator.mixed_precision, torch.float32
    )
    text_encoders = [m for m in (pipe.text_encoder, getattr(pipe, "text_encoder_2", None)) if m is not None]
    tokenizers = [t for t in (pipe.tokenizer, getattr(pipe, "tokenizer_2", None)) if t is not None]
    device = accelerator.device
    for module in (pipe.unet, pipe.vae, *text_encoders):
        module.requires_grad_(False)
    # SDXL's VAE overflows in fp16 (its config says force_upcast); keep it in fp32 then.
    vae_dtype = (
        torch.float32 if weight_dtype == torch.float16 and pipe.vae.config.force_upcast else weight_dtype
    )
    for module, dtype in (
        (pipe.unet, weight_dtype),
        (pipe.vae, vae_dtype),
        *((e, weight_dtype) for e in text_encoders),
    ):
        module.to(device)
        if module.dtype != dtype:
            module.to(dtype)
    attention = choose_attention(cfg, pipe.unet, device)
    if cfg.gradient_checkpointing:
        pipe.unet.enable_gradient_checkpointing()
        if cfg.train_text_encoder:
            for encoder in text_encoders:
                encoder.gradient_checkpointing_enable()
    noise_scheduler = DDPMScheduler.from_config(pipe.scheduler.config)
    return TrainModels(pipe, family, pipe.unet, pipe.vae, text_encoders, tokenizers, noise_scheduler,
                       weight_dtype, attention)  # fmt: skip


def choose_attention(cfg: TrainConfig, unet, device: torch.device) -> str:
    """xformers when asked (or auto on CUDA with xformers installed); otherwise PyTorch SDPA, diffusers' default."""
    has_xformers = importlib.util.find_spec("xformers") is not None
    on_cuda = device.type == "cuda"
    if cfg.attention == "xformers":
        if not has_xformers or not on_cuda:
            need = "pip install xformers" if not has_xformers else "a CUDA GPU"
            raise ConfigError(f"attention = 'xformers' needs {need}; use attention = 'sdpa' or 'auto'")
        unet.enable_xformers_memory_efficient_attention()
        return "xformers"
    if cfg.attention == "auto" and has_xformers and on_cuda:
        unet.enable_xformers_memory_efficient_attention()
        return "xformers"
    return "sdpa"
