"""Single-file checkpoints in the original (LDM / SGM) layout that A1111, ComfyUI and diffusers read.

A diffusers pipeline's UNet, VAE and text encoder(s) are renamed key by key (studio.core.keys) into one state
dict and written atomically as one .safetensors file.

    >>> save_single_file(pipe, "my_model.safetensors", "sdxl", dtype="fp16")  # doctest: +SKIP
"""

from __future__ import annotations

from collections.abc import Mapping
from itertools import chain
from pathlib import Path
from typing import Any

import torch
from accelerate import init_empty_weights
from diffusers import AutoencoderKL, UNet2DConditionModel
from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

from studio.core.devices import DTYPES
from studio.core.errors import FamilyMismatchError, StudioError
from studio.core.families import FAMILY_NAMES, Family
from studio.core.io import atomic_save_safetensors
from studio.core.keys import (
    ARCHITECTURES,
    OPEN_CLIP,
    OPEN_CLIP_LAYER,
    TEXT_PREFIXES,
    UNET_PREFIX,
    VAE_PREFIX,
    unet_diffusers_to_ldm,
    vae_key_to_ldm,
)


def _clip_to_ldm(state: Mapping[str, torch.Tensor], prefix: str) -> dict[str, torch.Tensor]:
    """CLIP-L keeps the transformers names under `prefix` + "text_model." (which transformers >= 5.6
    dropped from CLIPTextModel's own paths, so add it back when missing)."""
    return {prefix + (k if k.startswith("text_model.") else "text_model." + k): v for k, v in state.items()}


def _open_clip_to_ldm(state: Mapping[str, torch.Tensor], prefix: str) -> dict[str, torch.Tensor]:
    """OpenCLIP-G in open_clip's layout: fused q/k/v (`in_proj`), text_projection stored transposed."""
    sd = {k.removeprefix("text_model."): v for k, v in state.items()}
    out = {prefix + "text_projection": sd.pop("text_projection.weight").T.contiguous()}
    out |= {prefix + ldm: sd.pop(name) for name, ldm in OPEN_CLIP.items()}
    layers = sorted({int(k.split(".")[2]) for k in sd if k.startswith("encoder.layers.")})
    for i in layers:
        src, dst = f"encoder.layers.{i}.", f"{prefix}transformer.resblocks.{i}."
        for kind in ("weight", "bias"):
            qkv = [sd.pop(f"{src}self_attn.{p}_proj.{kind}") for p in "qkv"]
            out[f"{dst}attn.in_proj_{kind}"] = torch.cat(qkv, dim=0)
            for name, ldm in OPEN_CLIP_LAYER.items():
                out[f"{dst}{ldm}.{kind}"] = sd.pop(f"{src}{name}.{kind}")
    if sd:
        raise StudioError(f"text_encoder_2 has tensors with no place in the checkpoint: {sorted(sd)[:3]}")
    return out


def to_ldm_state_dict(components: Mapping[str, Any], family: Family) -> dict[str, torch.Tensor]:
    """The original single-file layout of a pipeline's UNet, VAE and text encoder(s) (`pipe.components`)."""
    missing = [n for n in ("unet", "vae", *TEXT_PREFIXES[family]) if components.get(n) is None]
    if missing:
        raise FamilyMismatchError(
            f"this pipeline has no {', '.join(missing)}; is it really {FAMILY_NAMES[family]}?"
        )
    states = {name: components[name].state_dict() for name in ("unet", "vae", *TEXT_PREFIXES[family])}
    if any(".lora_" in k or ".base_layer." in k for k in chain.from_iterable(states.values())):
        raise StudioError(
            "the pipeline has LoRA layers loaded; fuse them into the weights and unload them "
            "(pipe.fuse_lora(); pipe.unload_lora_weights()) before saving a checkpoint."
        )
    try:
        out = {UNET_PREFIX + unet_diffusers_to_ldm(k, family): v for k, v in states["unet"].items()}
    except ValueError as exc:
        raise FamilyMismatchError(
            f"the UNet does not have the {FAMILY_NAMES[family]} layout ({exc})."
        ) from None
    num_up = len(components["vae"].config.up_block_types)
    for k, v in states["vae"].items():
        ldm = vae_key_to_ldm(k, num_up)
        # the original mid-block attention uses 1x1 convolutions where diffusers uses linear layers
        out[VAE_PREFIX + ldm] = v[:, :, None, None] if ".mid.attn_1." in ldm and v.ndim == 2 else v
    out |= _clip_to_ldm(states["text_encoder"], TEXT_PREFIXES[family]["text_encoder"])
    if family == "sdxl":
        out |= _open_clip_to_ldm(states["text_encoder_2"], TEXT_PREFIXES["sdxl"]["text_encoder_2"])
    return out


def pipe_family(pipe) -> Family:
    """The family of a loaded pipeline: SDXL pipelines have a second text encoder."""
    return "sdxl" if getattr(pipe, "text_encoder_2", None) is not None else "sd15"


def save_single_file(
    pipe,
    path: str | Path,
    family: Family,
    dtype: str | torch.dtype | None = None,
    overwrite: bool = False,
) -> Path:
    """Write the pipeline as one .safetensors checkpoint in the original layout (A1111/ComfyUI/diffusers).

    `dtype` (fp32/fp16/bf16) casts the floating tensors; by default they keep their dtype.

    >>> save_single_file(pipe, "my_model.safetensors", "sdxl", dtype="fp16")  # doctest: +SKIP
    """
    path = Path(path)
    if path.suffix.lower() != ".safetensors":
        raise StudioError(f"{path}: checkpoints are written as .safetensors; change the file name.")
    if path.exists() and not overwrite:
        raise StudioError(f"{path} already exists; choose another name or pass --overwrite.")
    if pipe_family(pipe) != family:
        raise FamilyMismatchError(
            f"{path}: the pipeline is {FAMILY_NAMES[pipe_family(pipe)]}, not {FAMILY_NAMES[family]}."
        )
    tensors = to_ldm_state_dict(pipe.components, family)
    if dtype is not None:
        cast = DTYPES.get(str(dtype).lower()) if not isinstance(dtype, torch.dtype) else dtype
        if cast is None:
            raise StudioError(f"unknown dtype {dtype!r}; use fp32, fp16 or bf16.")
        tensors = {k: v.to(cast) if v.is_floating_point() else v for k, v in tensors.items()}
    metadata = {
        "modelspec.sai_model_spec": "1.0.0",
        "modelspec.architecture": ARCHITECTURES[family],
        "modelspec.title": path.stem,
    }
    return atomic_save_safetensors(tensors, path, metadata=metadata, overwrite=overwrite)


def empty_components(config_dir: str | Path, family: Family) -> dict[str, torch.nn.Module]:
    """UNet, VAE and text encoder(s) built from a diffusers config folder on the meta device (no memory)."""
    folder = str(config_dir)
    with init_empty_weights():
        parts: dict[str, torch.nn.Module] = {
            "unet": UNet2DConditionModel.from_config(
                UNet2DConditionModel.load_config(folder, subfolder="unet")
            ),
            "vae": AutoencoderKL.from_config(AutoencoderKL.load_config(folder, subfolder="vae")),
            "text_encoder": CLIPTextModel(CLIPTextConfig.from_pretrained(folder, subfolder="text_encoder")),
        }
        if family == "sdxl":
            config = CLIPTextConfig.from_pretrained(folder, subfolder="text_encoder_2")
            parts["text_encoder_2"] = CLIPTextModelWithProjection(config)
    return parts
