"""Tiny SD1.5-like and SDXL-like pipelines with random weights, for tests and benchmarks.

They are built locally from configs with the real diffusers/transformers classes and keep the real block
structure (same down/up block types, two layers per block, attention where the real models have it), so
block ids, kohya names and LoRA targets mean the same thing as on the full models. Channels are tiny:
a 2-step 64x64 generation takes a fraction of a second on a CPU. The tokenizers are the real CLIP ones.

>>> pipe = tiny_sd15_pipeline(seed=0)  # doctest: +SKIP
>>> pipe("a photo of a dog", num_inference_steps=2, height=64, width=64).images[0].size  # doctest: +SKIP
(64, 64)
"""

from __future__ import annotations

from contextlib import nullcontext
from pathlib import Path
from typing import Any

import torch
from accelerate import init_empty_weights
from diffusers import (
    AutoencoderKL,
    DDIMScheduler,
    EulerDiscreteScheduler,
    StableDiffusionPipeline,
    StableDiffusionXLPipeline,
    UNet2DConditionModel,
)
from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

from studio.errors import StudioError
from studio.tokenizers import SDXL_PAD_2, clip_tokenizer

IMAGE_SIZE = 64  # pixels; the VAE has 4 levels like the real one, so latents are 8x8

# SD1.5's noise schedule (both families use it).
SD_BETAS = {
    "beta_start": 0.00085,
    "beta_end": 0.012,
    "beta_schedule": "scaled_linear",
    "num_train_timesteps": 1000,
}

TINY_VAE = {
    "in_channels": 3, "out_channels": 3, "latent_channels": 4, "layers_per_block": 2,
    "block_out_channels": (8, 16, 32, 32), "norm_num_groups": 8, "sample_size": IMAGE_SIZE,
    "down_block_types": ("DownEncoderBlock2D",) * 4, "up_block_types": ("UpDecoderBlock2D",) * 4,
}  # fmt: skip

TINY_TEXT = {
    "vocab_size": 49408, "max_position_embeddings": 77, "hidden_size": 32, "intermediate_size": 64,
    "num_attention_heads": 4, "num_hidden_layers": 2, "projection_dim": 32, "hidden_act": "quick_gelu",
    # the real SD configs' token ids (pooling picks the end-of-text token by argmax, as in SD)
    "bos_token_id": 0, "eos_token_id": 2, "pad_token_id": 1,
}  # fmt: skip
# SDXL's second text encoder (OpenCLIP-G) must be wider than the first: diffusers' single-file loader tells
# the two apart by the width of their position embeddings. Its projection is not square, so a transposed
# text_projection cannot go unnoticed.
TINY_TEXT_2 = TINY_TEXT | {
    "hidden_size": 48,
    "intermediate_size": 96,
    "projection_dim": 40,
    "hidden_act": "gelu",
}

TINY_SD15_UNET = {
    "sample_size": IMAGE_SIZE // 8, "in_channels": 4, "out_channels": 4, "layers_per_block": 2,
    "block_out_channels": (32, 32, 64, 64), "norm_num_groups": 8, "attention_head_dim": 8,
    "down_block_types": ("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",),
    "up_block_types": ("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3,
    "cross_attention_dim": TINY_TEXT["hidden_size"], "use_linear_projection": False,
}  # fmt: skip

TINY_SDXL_UNET = {
    "sample_size": IMAGE_SIZE // 8, "in_channels": 4, "out_channels": 4, "layers_per_block": 2,
    "block_out_channels": (32, 64, 64), "norm_num_groups": 8, "attention_head_dim": (2, 4, 4),
    "down_block_types": ("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
    "up_block_types": ("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
    "transformer_layers_per_block": (1, 1, 2), "use_linear_projection": True,
    # both text encoders' hidden states, concatenated
    "cross_attention_dim": TINY_TEXT["hidden_size"] + TINY_TEXT_2["hidden_size"],
    "addition_embed_type": "text_time", "addition_time_embed_dim": 8,
    # 6 size/crop numbers of 8 dims each, plus the pooled projection of text_encoder_2
    "projection_class_embeddings_input_dim": 6 * 8 + TINY_TEXT_2["projection_dim"],
}  # fmt: skip


def _sd15_components() -> dict[str, Any]:
    return {
        "unet": UNet2DConditionModel(**TINY_SD15_UNET),
        "vae": AutoencoderKL(**TINY_VAE, scaling_factor=0.18215),
        "text_encoder": CLIPTextModel(CLIPTextConfig(**TINY_TEXT)),
        "tokenizer": clip_tokenizer(),
        "scheduler": DDIMScheduler(**SD_BETAS, clip_sample=False, set_alpha_to_one=False, steps_offset=1),
        "safety_checker": None,
        "feature_extractor": None,
        "requires_safety_checker": False,
    }


def _sdxl_components() -> dict[str, Any]:
    return {
        "unet": UNet2DConditionModel(**TINY_SDXL_UNET),
        "vae": AutoencoderKL(**TINY_VAE, scaling_factor=0.13025),
        "text_encoder": CLIPTextModel(CLIPTextConfig(**TINY_TEXT)),
        "text_encoder_2": CLIPTextModelWithProjection(CLIPTextConfig(**TINY_TEXT_2)),
        "tokenizer": clip_tokenizer(),
        "tokenizer_2": clip_tokenizer(pad_token=SDXL_PAD_2),
        "scheduler": EulerDiscreteScheduler(**SD_BETAS, steps_offset=1, timestep_spacing="leading"),
        "add_watermarker": False,
    }


def _build(
    family: str, seed: int, empty: bool = False
) -> StableDiffusionPipeline | StableDiffusionXLPipeline:
    """Build the tiny pipeline; the global RNG is left as it was."""
    with torch.random.fork_rng(devices=[]), init_empty_weights() if empty else nullcontext():
        torch.manual_seed(seed)
        if family == "sd15":
            pipe = StableDiffusionPipeline(**_sd15_components())
        elif family == "sdxl":
            pipe = StableDiffusionXLPipeline(**_sdxl_components())
        else:
            raise StudioError(f"unknown model family {family!r}; use sd15 or sdxl.")
    pipe.set_progress_bar_config(disable=True)
    return pipe


def tiny_sd15_pipeline(seed: int = 0) -> StableDiffusionPipeline:
    """SD1.5-shaped pipeline: 4 levels (attention in the first three), conv proj_in, one CLIP text encoder."""
    return _build("sd15", seed)


def tiny_sdxl_pipeline(seed: int = 0) -> StableDiffusionXLPipeline:
    """SDXL-shaped pipeline: 3 levels (attention in the last two), linear proj_in, two text encoders."""
    return _build("sdxl", seed)


def save_tiny(pipe: StableDiffusionPipeline | StableDiffusionXLPipeline, folder: str | Path) -> Path:
    """Save a pipeline as a diffusers folder (safetensors weights)."""
    folder = Path(folder)
    pipe.save_pretrained(folder, safe_serialization=True)
    return folder


def tiny_config_dir(family: str, folder: str | Path) -> Path:
    """Write the tiny `family` model's diffusers configs and tokenizers (no weights) into `folder`.

    This is what `load_base(file, config_dir=...)` needs to load a tiny single-file checkpoint.
    """
    folder = Path(folder)
    pipe = _build(family, seed=0, empty=True)  # meta-device weights: nothing is initialised
    pipe.save_config(folder)
    for name, component in pipe.components.items():
        if component is None:
            continue
        if hasattr(component, "save_config"):  # diffusers models and schedulers
            component.save_config(folder / name)
        elif hasattr(component, "config"):  # transformers models
            component.config.save_pretrained(folder / name)
        else:  # tokenizers
            component.save_pretrained(folder / name)
    return folder
