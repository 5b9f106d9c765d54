"""Base models: detect SD1.5 / SDXL, load them offline, and write single-file checkpoints.

A base model is either a diffusers folder (model_index.json, unet/, vae/, ...) or one single-file
checkpoint in the original ("ldm"/"sgm") key layout that A1111, Forge and ComfyUI use
(model.diffusion_model.*, first_stage_model.*, cond_stage_model.* / conditioner.embedders.*).
Single files are loaded with diffusers' `from_single_file`, fed with the configs we ship in
studio/configs/<family> so that nothing is fetched from the Hugging Face hub.

>>> model = load_base("sd_xl_base_1.0.safetensors")  # doctest: +SKIP
>>> model.family, model.kind  # doctest: +SKIP
('sdxl', 'single_file')
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import re
import shutil
import tempfile
import warnings
import zipfile
from collections.abc import Iterable, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass
from functools import cache
from itertools import chain
from pathlib import Path
from typing import Any, Literal

import torch
from accelerate import init_empty_weights
from diffusers import (
    AutoencoderKL,
    DiffusionPipeline,
    StableDiffusionPipeline,
    StableDiffusionXLPipeline,
    UNet2DConditionModel,
)
from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

from studio.errors import BadFileError, FamilyMismatchError, StudioError
from studio.safetensors_io import PICKLE_SUFFIXES, atomic_save_safetensors, read_header
from studio.tokenizers import EOS, SDXL_PAD_2, cache_root, write_tokenizer_files

Family = Literal["sd15", "sdxl"]
FAMILY_NAMES = {"sd15": "Stable Diffusion 1.5", "sdxl": "SDXL"}
CONFIGS = Path(__file__).resolve().parent / "configs"
PIPELINES: dict[str, type[DiffusionPipeline]] = {
    "sd15": StableDiffusionPipeline,
    "sdxl": StableDiffusionXLPipeline,
}
SUPPORTED = (
    "LoRA Studio supports Stable Diffusion 1.5 and SDXL base models: a diffusers folder, or a single-file "
    ".safetensors checkpoint as used by A1111/ComfyUI."
)
UNET, VAE = "model.diffusion_model.", "first_stage_model."
TEXT_PREFIXES = {
    "sd15": {"text_encoder": "cond_stage_model.transformer."},
    "sdxl": {
        "text_encoder": "conditioner.embedders.0.transformer.",
        "text_encoder_2": "conditioner.embedders.1.model.",
    },
}
ARCHITECTURES = {"sd15": "stable-diffusion-v1", "sdxl": "stable-diffusion-xl-v1-base"}


@dataclass
class LoadedModel:
    """A loaded base model.

    model_hash is a cheap fingerprint, not a full-file hash: sha256 over the size and three 1 MiB samples
    (start, middle, end) of the checkpoint file, or for a diffusers folder of unet/config.json plus the same
    samples of each UNet weights file. It tells models apart in metadata and caches in milliseconds, even
    for 7 GB files; it is not the AutoV2/sha256 hash that model sites show.
    """

    pipe: DiffusionPipeline
    family: Family
    path: Path
    kind: Literal["diffusers", "single_file"]
    model_hash: str
    device: torch.device
    dtype: torch.dtype


# --------------------------------------------------------------------------------------------------
# family detection


def _unsupported(where: str, what: str) -> StudioError:
    return StudioError(f"{where}: this looks like {what}, which is not supported. {SUPPORTED}")


def _shape(info: Any) -> tuple[int, ...] | None:
    if hasattr(info, "shape"):
        return tuple(info.shape)
    if isinstance(info, Mapping) and "shape" in info:
        return tuple(info["shape"])
    return None


def _family_of_keys(source: Mapping[str, Any] | Iterable[str], where: str) -> Family:
    """Family of a checkpoint from its keys (and shapes, when `source` maps keys to tensors/header entries)."""
    entries = dict(source) if isinstance(source, Mapping) else dict.fromkeys(source)
    keys = list(entries)

    def has(prefix: str) -> bool:
        return any(k.startswith(prefix) for k in keys)

    if any(k.startswith(("lora_unet", "lora_te")) or ".lora_down." in k or ".lora_A." in k for k in keys):
        raise StudioError(f"{where}: this is a LoRA file, not a base model. {SUPPORTED}")
    if has("conditioner.embedders.1.model."):
        family: Family = "sdxl"
    elif has("conditioner.embedders.0.model."):
        raise _unsupported(where, "an SDXL refiner (OpenCLIP-G is its only text encoder)")
    elif has("cond_stage_model.model."):
        raise _unsupported(where, "Stable Diffusion 2.x (OpenCLIP-H text encoder)")
    elif has("cond_stage_model.transformer.") or has(UNET):
        family = "sdxl" if has(UNET + "label_emb.") else "sd15"
    else:
        sample = ", ".join(sorted(keys)[:3]) or "no tensors at all"
        raise StudioError(
            f"{where}: not a Stable Diffusion checkpoint (found keys like {sample}). {SUPPORTED}"
        )

    in_shape = _shape(entries.get(UNET + "input_blocks.0.0.weight"))
    if in_shape and len(in_shape) == 4 and in_shape[1] != 4:
        raise _unsupported(
            where, f"an inpainting or instruct-pix2pix model (its UNet takes {in_shape[1]} channels)"
        )
    if family == "sdxl" and has(UNET + "input_blocks.11."):
        raise _unsupported(where, "an SDXL refiner (its UNet has four levels)")
    if family == "sd15":
        context = _shape(entries.get(UNET + "input_blocks.1.1.transformer_blocks.0.attn2.to_k.weight"))
        proj_in = _shape(entries.get(UNET + "input_blocks.1.1.proj_in.weight"))
        if (context and context[-1] == 1024) or (proj_in and len(proj_in) == 2):
            raise _unsupported(where, "Stable Diffusion 2.x (1024-wide cross-attention, linear projections)")
    return family


def _read_json(path: Path) -> dict:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise BadFileError(f"{path}: cannot read this config file ({exc}).") from None


def _family_of_folder(folder: Path) -> Family:
    """Family of a diffusers folder from model_index.json and unet/config.json."""
    if not (folder / "unet" / "config.json").is_file():
        raise BadFileError(f"{folder}: not a diffusers model folder (no unet/config.json). {SUPPORTED}")
    unet = _read_json(folder / "unet" / "config.json")
    index = _read_json(folder / "model_index.json") if (folder / "model_index.json").is_file() else {}
    if unet.get("_class_name", "UNet2DConditionModel") != "UNet2DConditionModel":
        raise _unsupported(str(folder), f"a {unet.get('_class_name')} model")
    if unet.get("in_channels", 4) != 4:
        raise _unsupported(
            str(folder), f"an inpainting/instruct model (UNet in_channels={unet['in_channels']})"
        )
    if unet.get("addition_embed_type") == "text_time" or unet.get("cross_attention_dim") == 2048:
        if unet.get("cross_attention_dim") == 1280 or (
            index and not (index.get("text_encoder") or [None])[0]
        ):
            raise _unsupported(str(folder), "an SDXL refiner (no CLIP-L text encoder)")
        return "sdxl"
    if unet.get("addition_embed_type") or unet.get("class_embed_type") or unet.get("num_class_embeds"):
        raise _unsupported(str(folder), "a UNet with extra conditioning (upscaler or similar)")
    if unet.get("cross_attention_dim") == 1024 or unet.get("use_linear_projection"):
        raise _unsupported(
            str(folder), "Stable Diffusion 2.x (1024-wide cross-attention, linear projections)"
        )
    return "sd15"


def detect_family(source: str | os.PathLike | Mapping[str, Any] | Iterable[str]) -> Family:
    """Return "sd15" or "sdxl" for a diffusers folder, a .safetensors file, or a checkpoint's keys.

    Keys may come with shapes (a state dict, or the index from `read_header`); shapes let SD2.x and
    inpainting models be told apart from SD1.5. Anything else raises a StudioError saying what was found.

    >>> detect_family(["conditioner.embedders.1.model.positional_embedding"])
    'sdxl'
    """
    if isinstance(source, str | os.PathLike):
        path = Path(source).expanduser()
        if path.is_dir():
            return _family_of_folder(path)
        index, _ = read_header(path)  # missing / pickle / truncated -> BadFileError naming the file
        return _family_of_keys(index, str(path))
    return _family_of_keys(source, "checkpoint")


def _check_forced(found: Family, forced: str | None, where: Path) -> None:
    if forced is not None and forced not in FAMILY_NAMES:
        raise StudioError(f"unknown model family {forced!r}; use one of {', '.join(FAMILY_NAMES)}.")
    if forced is not None and forced != found:
        raise FamilyMismatchError(
            f"{where}: you asked for {FAMILY_NAMES[forced]} but this is a {FAMILY_NAMES[found]} model. "
            "Pick the right family, or leave it out to detect it."
        )


# --------------------------------------------------------------------------------------------------
# device and dtype

DTYPES = {
    "fp32": torch.float32, "float32": torch.float32, "float": torch.float32,
    "fp16": torch.float16, "float16": torch.float16, "half": torch.float16,
    "bf16": torch.bfloat16, "bfloat16": torch.bfloat16,
}  # fmt: skip


def pick_device_dtype(
    device: str | torch.device | None = None, dtype: str | torch.dtype | None = None
) -> tuple[torch.device, torch.dtype]:
    """The device and dtype to run on: CUDA (bf16 where supported, else fp16), MPS (fp16), CPU (fp32).

    Explicit choices are checked: a device that is not there, bf16 on a GPU without it, or fp16 on the
    CPU (many CPU kernels lack fp16 and the rest are slow) raise a StudioError.
    """
    if device is None:
        if torch.cuda.is_available():
            device = "cuda"
        elif torch.backends.mps.is_available():
            device = "mps"
        else:
            device = "cpu"
    try:
        dev = torch.device(device)
    except (RuntimeError, TypeError):
        raise StudioError(f"unknown device {device!r}; use cpu, cuda, cuda:N or mps.") from None
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise StudioError("CUDA was requested but no CUDA GPU is available; use --device cpu.")
    if dev.type == "mps" and not torch.backends.mps.is_available():
        raise StudioError("MPS was requested but is not available on this machine; use --device cpu.")
    if dtype is None:
        if dev.type == "cuda":
            return dev, torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
        return dev, torch.float16 if dev.type == "mps" else torch.float32
    dt = dtype if isinstance(dtype, torch.dtype) else DTYPES.get(str(dtype).lower())
    if dt not in (torch.float32, torch.float16, torch.bfloat16):
        raise StudioError(f"unknown dtype {dtype!r}; use fp32, fp16 or bf16.")
    if dev.type == "cpu" and dt == torch.float16:
        raise StudioError(
            "fp16 on the CPU is very slow and some operations are unsupported; use fp32 (or bf16)."
        )
    if dev.type == "cuda" and dt == torch.bfloat16 and not torch.cuda.is_bf16_supported():
        raise StudioError("this GPU does not support bf16; use fp16 or fp32.")
    return dev, dt


# --------------------------------------------------------------------------------------------------
# UNet module paths: diffusers <-> original (ldm/sgm)

# Which diffusers blocks hold attention. Both families have layers_per_block = 2, so each level is three
# ldm input_blocks (two resnet(+attention) layers and a downsampler) and three output_blocks.
_UNET_LAYOUT = {
    "sd15": {"levels": 4, "down_attn": (0, 1, 2), "up_attn": (1, 2, 3)},
    "sdxl": {"levels": 3, "down_attn": (1, 2), "up_attn": (0, 1)},
}
# What each kind of block holds, and its name in the original layout (attention blocks and upsamplers
# keep their names; knowing them also rejects paths from the other family, e.g. SD1.5's
# output_blocks.2.1.conv read as SDXL).
_INNER = {
    "resnet": {
        "norm1": "in_layers.0", "conv1": "in_layers.2", "time_emb_proj": "emb_layers.1",
        "norm2": "out_layers.0", "dropout": "out_layers.2", "conv2": "out_layers.3",
        "conv_shortcut": "skip_connection",
    },
    "attention": {name: name for name in ("norm", "proj_in", "transformer_blocks", "proj_out")},
    "downsampler": {"conv": "op"},
    "upsampler": {"conv": "conv"},
    "leaf": {},
}  # fmt: skip
_TOP = {
    "conv_in": "input_blocks.0.0", "time_embedding": "time_embed", "time_embedding.linear_1": "time_embed.0",
    "time_embedding.act": "time_embed.1", "time_embedding.linear_2": "time_embed.2",
    "add_embedding": "label_emb.0", "add_embedding.linear_1": "label_emb.0.0",
    "add_embedding.act": "label_emb.0.1", "add_embedding.linear_2": "label_emb.0.2",
    "conv_norm_out": "out.0", "conv_act": "out.1", "conv_out": "out.2", "mid_block": "middle_block",
}  # fmt: skip


@cache
def _unet_table(family: Family) -> dict[str, tuple[str, str]]:
    """diffusers module prefix -> (ldm module prefix, kind), for every block-level module of `family`."""
    layout = _UNET_LAYOUT[family]
    table = {d: (ldm, "leaf") for d, ldm in _TOP.items()}
    table["mid_block.resnets.0"] = ("middle_block.0", "resnet")
    table["mid_block.attentions.0"] = ("middle_block.1", "attention")
    table["mid_block.resnets.1"] = ("middle_block.2", "resnet")
    for i in range(layout["levels"]):
        for j in range(2):
            table[f"down_blocks.{i}.resnets.{j}"] = (f"input_blocks.{3 * i + 1 + j}.0", "resnet")
            if i in layout["down_attn"]:
                table[f"down_blocks.{i}.attentions.{j}"] = (f"input_blocks.{3 * i + 1 + j}.1", "attention")
        for j in range(3):
            table[f"up_blocks.{i}.resnets.{j}"] = (f"output_blocks.{3 * i + j}.0", "resnet")
            if i in layout["up_attn"]:
                table[f"up_blocks.{i}.attentions.{j}"] = (f"output_blocks.{3 * i + j}.1", "attention")
        if i < layout["levels"] - 1:
            table[f"down_blocks.{i}.downsamplers.0"] = (f"input_blocks.{3 * i + 3}.0", "downsampler")
            # the upsampler follows the resnet, and the attention when the block has one
            slot = 2 if i in layout["up_attn"] else 1
            table[f"up_blocks.{i}.upsamplers.0"] = (f"output_blocks.{3 * i + 2}.{slot}", "upsampler")
    return table


@cache
def _unet_table_inverse(family: Family) -> dict[str, tuple[str, str]]:
    return {ldm: (d, kind) for d, (ldm, kind) in _unet_table(family).items()}


def _map_unet_path(path: str, table: dict[str, tuple[str, str]], to_ldm: bool, family: Family) -> str:
    parts = path.split(".")
    suffix = [parts.pop()] if parts and parts[-1] in ("weight", "bias") else []
    for n in range(len(parts), 0, -1):
        if (head := ".".join(parts[:n])) in table:
            mapped, kind = table[head]
            rest = parts[n:]
            break
    else:
        raise ValueError(f"{path!r} is not a {FAMILY_NAMES[family]} UNet module path")
    if rest:
        renames = _INNER[kind] if to_ldm else {v: k for k, v in _INNER[kind].items()}
        width = 2 if not to_ldm and ".".join(rest[:2]) in renames else 1
        inner = ".".join(rest[:width])
        if inner not in renames:
            raise ValueError(f"{path!r} has no counterpart in the other UNet layout")
        rest = [renames[inner], *rest[width:]]
    return ".".join([mapped, *rest, *suffix])


def unet_diffusers_to_ldm(path: str, family: Family = "sdxl") -> str:
    """Original (ldm/sgm) UNet module path for a diffusers one; a trailing .weight/.bias is kept.

    The default family is SDXL because kohya names SDXL LoRA modules by these paths (SD1.5 LoRAs use
    diffusers paths). Raises ValueError for modules with no counterpart (e.g. "down_blocks.0", a
    shared activation).

    >>> unet_diffusers_to_ldm("up_blocks.0.attentions.1.transformer_blocks.0.attn1.to_q")
    'output_blocks.1.1.transformer_blocks.0.attn1.to_q'
    >>> unet_diffusers_to_ldm("down_blocks.1.resnets.0.conv1.weight", "sd15")
    'input_blocks.4.0.in_layers.2.weight'
    """
    return _map_unet_path(path, _unet_table(family), True, family)


def unet_ldm_to_diffusers(path: str, family: Family = "sdxl") -> str:
    """diffusers UNet module path for an original (ldm/sgm) one; the inverse of `unet_diffusers_to_ldm`.

    >>> unet_ldm_to_diffusers("output_blocks.2.2.conv")
    'up_blocks.0.upsamplers.0.conv'
    """
    return _map_unet_path(path, _unet_table_inverse(family), False, family)


# --------------------------------------------------------------------------------------------------
# diffusers pipeline -> one original-layout state dict

_VAE_ATTN = {"group_norm": "norm", "to_q": "q", "to_k": "k", "to_v": "v", "to_out.0": "proj_out"}


def _vae_key_to_ldm(key: str, num_up: int) -> str:
    """Original VAE key for a diffusers AutoencoderKL key (the decoder's up blocks count backwards)."""
    rules = (
        (r"^(encoder|decoder)\.conv_norm_out\.", lambda m: f"{m[1]}.norm_out."),
        (r"^encoder\.down_blocks\.(\d+)\.resnets\.(\d+)\.", lambda m: f"encoder.down.{m[1]}.block.{m[2]}."),
        (r"^encoder\.down_blocks\.(\d+)\.downsamplers\.0\.", lambda m: f"encoder.down.{m[1]}.downsample."),
        (r"^decoder\.up_blocks\.(\d+)\.resnets\.(\d+)\.", lambda m: f"decoder.up.{num_up - 1 - int(m[1])}.block.{m[2]}."),
        (r"^decoder\.up_blocks\.(\d+)\.upsamplers\.0\.", lambda m: f"decoder.up.{num_up - 1 - int(m[1])}.upsample."),
        (r"^(encoder|decoder)\.mid_block\.resnets\.(\d+)\.", lambda m: f"{m[1]}.mid.block_{int(m[2]) + 1}."),
        (r"^(encoder|decoder)\.mid_block\.attentions\.0\.(group_norm|to_q|to_k|to_v|to_out\.0)\.",
         lambda m: f"{m[1]}.mid.attn_1.{_VAE_ATTN[m[2]]}."),
        (r"\.conv_shortcut\.", lambda m: ".nin_shortcut."),
    )  # fmt: skip
    for pattern, repl in rules:
        key = re.sub(pattern, repl, key)
    return key


def _clip_to_ldm(state: Mapping[str, torch.Tensor], prefix: str) -> dict[str, torch.Tensor]:
    """CLIP-L keeps the transformers names under `prefix` + "text_model." (which transformers >= 5.6
    dropped from CLIPTextModel's own paths, so add it back when missing)."""
    return {prefix + (k if k.startswith("text_model.") else "text_model." + k): v for k, v in state.items()}


_OPEN_CLIP = {
    "embeddings.token_embedding.weight": "token_embedding.weight",
    "embeddings.position_embedding.weight": "positional_embedding",
    "final_layer_norm.weight": "ln_final.weight", "final_layer_norm.bias": "ln_final.bias",
}  # fmt: skip
_OPEN_CLIP_LAYER = {
    "layer_norm1": "ln_1", "layer_norm2": "ln_2", "self_attn.out_proj": "attn.out_proj",
    "mlp.fc1": "mlp.c_fc", "mlp.fc2": "mlp.c_proj",
}  # fmt: skip


def _open_clip_to_ldm(state: Mapping[str, torch.Tensor], prefix: str) -> dict[str, torch.Tensor]:
    """OpenCLIP-G in open_clip's layout: fused q/k/v (`in_proj`), text_projection stored transposed."""
    sd = {k.removeprefix("text_model."): v for k, v in state.items()}
    out = {prefix + "text_projection": sd.pop("text_projection.weight").T.contiguous()}
    out |= {prefix + ldm: sd.pop(name) for name, ldm in _OPEN_CLIP.items()}
    layers = sorted({int(k.split(".")[2]) for k in sd if k.startswith("encoder.layers.")})
    for i in layers:
        src, dst = f"encoder.layers.{i}.", f"{prefix}transformer.resblocks.{i}."
        for kind in ("weight", "bias"):
            qkv = [sd.pop(f"{src}self_attn.{p}_proj.{kind}") for p in "qkv"]
            out[f"{dst}attn.in_proj_{kind}"] = torch.cat(qkv, dim=0)
            for name, ldm in _OPEN_CLIP_LAYER.items():
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
        out = {UNET + unet_diffusers_to_ldm(k, family): v for k, v in states["unet"].items()}
    except ValueError as exc:
        raise FamilyMismatchError(
            f"the UNet does not have the {FAMILY_NAMES[family]} layout ({exc})."
        ) from None
    num_up = len(components["vae"].config.up_block_types)
    for k, v in states["vae"].items():
        ldm = _vae_key_to_ldm(k, num_up)
        # the original mid-block attention uses 1x1 convolutions where diffusers uses linear layers
        out[VAE + ldm] = v[:, :, None, None] if ".mid.attn_1." in ldm and v.ndim == 2 else v
    out |= _clip_to_ldm(states["text_encoder"], TEXT_PREFIXES[family]["text_encoder"])
    if family == "sdxl":
        out |= _open_clip_to_ldm(states["text_encoder_2"], TEXT_PREFIXES["sdxl"]["text_encoder_2"])
    return out


def pipe_family(pipe: DiffusionPipeline) -> Family:
    """The family of a loaded pipeline: SDXL pipelines have a second text encoder."""
    return "sdxl" if getattr(pipe, "text_encoder_2", None) is not None else "sd15"


def save_single_file(
    pipe: DiffusionPipeline,
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


# --------------------------------------------------------------------------------------------------
# loading


def shipped_config_dir(family: Family) -> Path:
    """A complete diffusers config folder (no weights) for `family`: our shipped configs plus tokenizers.

    Built once in the cache (see studio.tokenizers.cache_root) by copying studio/configs/<family> and
    writing the tokenizer files; a temporary folder is used if the cache is not writable.
    """
    source = CONFIGS / family
    digest = hashlib.sha256()
    for f in sorted(source.rglob("*.json")):
        digest.update(f.relative_to(source).as_posix().encode() + f.read_bytes())
    final = cache_root() / "configs" / f"{family}-{digest.hexdigest()[:16]}"
    if (final / "model_index.json").is_file():
        return final
    try:
        final.parent.mkdir(parents=True, exist_ok=True)
        staging = Path(tempfile.mkdtemp(prefix=f".{final.name}.", dir=final.parent))
    except OSError:
        staging = final = Path(tempfile.mkdtemp(prefix=f"lora-studio-{family}-"))
    shutil.copytree(source, staging, dirs_exist_ok=True)
    write_tokenizer_files(staging / "tokenizer", EOS)
    if family == "sdxl":
        write_tokenizer_files(staging / "tokenizer_2", SDXL_PAD_2)
    if staging != final:
        try:
            os.replace(staging, final)
        except OSError:  # another process won the race with an identical folder (or left a broken one)
            if not (final / "model_index.json").is_file():
                return staging
            shutil.rmtree(staging, ignore_errors=True)
    return final


def _checkpoint_entries(path: Path, allow_pickle: bool) -> Mapping[str, Any]:
    """Keys (with shapes) of a checkpoint file, without loading safetensors data."""
    if path.suffix.lower() not in PICKLE_SUFFIXES:
        return read_header(path)[0]
    if not allow_pickle:
        raise BadFileError(
            f"{path}: this is a pickle checkpoint ({path.suffix}). Pickle files can run arbitrary code when "
            "loaded, so LoRA Studio loads only .safetensors by default. Convert it to .safetensors, or pass "
            "--allow-pickle if you trust where it came from."
        )
    try:  # weights_only refuses anything but tensors and plain containers; mmap keeps it cheap
        state = torch.load(path, map_location="cpu", weights_only=True, mmap=zipfile.is_zipfile(path))
    except Exception as exc:
        raise BadFileError(
            f"{path}: cannot read this pickle checkpoint ({type(exc).__name__}: {exc})."
        ) from None
    while isinstance(state, Mapping) and "state_dict" in state:
        state = state["state_dict"]
    if not isinstance(state, Mapping):
        raise BadFileError(f"{path}: this pickle file does not hold a state dict.")
    return state


def _check_complete(entries: Mapping[str, Any], family: Family, path: Path) -> None:
    needed = {"UNet": UNET, "VAE": VAE} | {name: p for name, p in TEXT_PREFIXES[family].items()}
    absent = [name for name, prefix in needed.items() if not any(k.startswith(prefix) for k in entries)]
    if absent:
        raise BadFileError(
            f"{path}: this checkpoint has no {' / '.join(absent)} weights. LoRA Studio needs a full "
            f"{FAMILY_NAMES[family]} checkpoint (UNet, VAE and text encoders in one file), or a diffusers folder."
        )


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


def _explain_mismatch(entries: Mapping[str, Any], family: Family, config_dir: Path) -> str | None:
    """Why a checkpoint does not fit its configuration: missing tensors or wrong shapes (None if it fits)."""
    try:
        expected = {
            k: tuple(v.shape)
            for k, v in to_ldm_state_dict(empty_components(config_dir, family), family).items()
        }
    except Exception:  # a broken config folder: nothing more precise to say
        return None
    for key, shape in expected.items():
        if key in entries and (found := _shape(entries[key])) is not None and found != shape:
            return (
                f"{key} has shape {list(found)} but the model configuration in {config_dir} expects "
                f"{list(shape)}. The file is a different architecture, or is damaged."
            )
    missing = [k for k in expected if k not in entries]
    if missing:
        return (
            f"{len(missing)} tensors are missing from the file (e.g. {missing[0]}). The file is incomplete "
            f"or is not a standard {FAMILY_NAMES[family]} checkpoint."
        )
    return None


def _has_meta(pipe: DiffusionPipeline) -> bool:
    """diffusers leaves weights a file lacks on the meta device instead of failing."""
    modules = [c for c in pipe.components.values() if isinstance(c, torch.nn.Module)]
    return any(t.is_meta for m in modules for t in chain(m.parameters(), m.buffers()))


class _DropEmptyFp32Warning(logging.Filter):
    """diffusers 0.42 warns on every model.to(dtype) that modules "should be kept in float32: []", even
    when that list is empty; the message is noise for SD models."""

    def filter(self, record: logging.LogRecord) -> bool:
        return "should be kept in float32: []" not in record.getMessage()


@contextmanager
def _quiet_dtype_warning() -> Iterator[None]:
    logger, drop = logging.getLogger("diffusers.models.modeling_utils"), _DropEmptyFp32Warning()
    logger.addFilter(drop)
    try:
        yield
    finally:
        logger.removeFilter(drop)


def _own_memory(pipe: DiffusionPipeline) -> None:
    """On the CPU, diffusers leaves weights as views into the memory-mapped file, at unaligned offsets;
    BLAS then takes other code paths whose rounding differs from the same weights in ordinary memory
    (and the file stays mapped). Copy such tensors into ordinary, aligned memory."""
    for component in pipe.components.values():
        if isinstance(component, torch.nn.Module):
            for tensor in chain(component.parameters(), component.buffers()):
                if tensor.device.type == "cpu" and tensor.data_ptr() % 64:
                    tensor.data = tensor.data.clone()


def _from_diffusers(
    family: Family, path: Path, dtype: torch.dtype, config_dir: Path | None
) -> DiffusionPipeline:
    extra: dict[str, Any] = (
        {"safety_checker": None, "feature_extractor": None, "requires_safety_checker": False}
        if family == "sd15"
        else {"add_watermarker": False}
    )
    cls = PIPELINES[family]
    with warnings.catch_warnings(), _quiet_dtype_warning():
        warnings.simplefilter("ignore", FutureWarning)
        if config_dir is None:
            return cls.from_pretrained(str(path), torch_dtype=dtype, local_files_only=True, **extra)
        return cls.from_single_file(
            str(path), config=str(config_dir), torch_dtype=dtype, local_files_only=True, **extra
        )


def model_hash(path: str | Path) -> str:
    """The cheap fingerprint described in `LoadedModel` (sha256 hex digest)."""
    path = Path(path)
    files = [path]
    if path.is_dir():
        unet = path / "unet"
        files = [unet / "config.json", *sorted(unet.glob("*.safetensors")), *sorted(unet.glob("*.bin"))]
    digest, chunk = hashlib.sha256(), 1 << 20
    for f in files:
        size = f.stat().st_size
        digest.update(f"{f.name}:{size}".encode())
        with open(f, "rb") as fh:
            for offset in sorted({0, max(0, size // 2 - chunk // 2), max(0, size - chunk)}):
                fh.seek(offset)
                digest.update(fh.read(chunk))
    return digest.hexdigest()


def load_base(
    path: str | Path,
    *,
    family: Family | None = None,
    device: str | torch.device | None = None,
    dtype: str | torch.dtype | None = None,
    allow_pickle: bool = False,
    config_dir: str | Path | None = None,
) -> LoadedModel:
    """Load an SD1.5 / SDXL base model from a diffusers folder or a single-file checkpoint, offline.

    family:       check the model is this family (detected either way).
    allow_pickle: also accept .ckpt/.pt/.bin files (they can run code when loaded; off by default).
    config_dir:   diffusers config folder for a single file (ignored for folders); defaults to the
                  SD1.5/SDXL configs shipped in studio/configs.

    >>> model = load_base("v1-5-pruned-emaonly.safetensors", device="cpu")  # doctest: +SKIP
    """
    path = Path(path).expanduser()
    if not path.exists():
        raise BadFileError(
            f"{path}: no such file or folder. Give a diffusers model folder or a .safetensors file."
        )
    dev, dt = pick_device_dtype(device, dtype)
    entries: Mapping[str, Any] = {}
    if path.is_dir():
        kind, found, config = "diffusers", _family_of_folder(path), None
        _check_forced(found, family, path)
    else:
        entries = _checkpoint_entries(path, allow_pickle)
        kind, found = "single_file", _family_of_keys(entries, str(path))
        _check_forced(found, family, path)
        _check_complete(entries, found, path)
        config = Path(config_dir) if config_dir is not None else shipped_config_dir(found)
        if config_dir is not None and _family_of_folder(config) != found:
            raise FamilyMismatchError(
                f"{config}: this config folder is not for a {FAMILY_NAMES[found]} model."
            )
    try:
        pipe = _from_diffusers(found, path, dt, config)
        if _has_meta(pipe):
            raise ValueError("some weights were not in the file")
    except StudioError:
        raise
    except Exception as exc:  # diffusers/transformers/torch errors: explain, and drop the deep traceback
        message = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        reason = _explain_mismatch(entries, found, config) if kind == "single_file" else None
        raise BadFileError(
            f"{path}: could not load this {FAMILY_NAMES[found]} model: {reason or message}"
        ) from None
    pipe.to(dev)
    _own_memory(pipe)
    return LoadedModel(
        pipe=pipe, family=found, path=path, kind=kind, model_hash=model_hash(path), device=dev, dtype=dt
    )
