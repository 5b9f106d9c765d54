"""LoRA files in every common format, read into one in-memory form and written back.

One representation whatever the source (studio.core.lora_set): a LoraSet maps canonical module paths to
LoraModule(down, up, alpha). The key layouts are studio.core.lora_formats; the checks every file passes,
studio.core.lora_checks.

Read: kohya / A1111 / ComfyUI keys (lora_unet_, lora_te_, lora_te1_, lora_te2_; SD1.5 diffusers paths and
SDXL original paths; with or without .alpha), diffusers / PEFT keys (lora_A / lora_B, optional
lora_adapter_metadata for alphas), the old diffusers keys (.lora.down, .lora_linear_layer.down,
.processor.to_q_lora.down), and B-LoRA files (which are PEFT files touching up_blocks.0.attentions.0/1).
Write: kohya format by default (loads in A1111, ComfyUI and diffusers), PEFT format on request.
"""

from __future__ import annotations

from pathlib import Path
from typing import Literal

import torch

from studio.core.errors import BadFileError, FamilyMismatchError, KeyMismatchError, StudioError
from studio.core.families import FAMILY_NAMES, Family
from studio.core.io import atomic_save_safetensors, is_pickle, load_pickle_tensors, read_safetensors
from studio.core.lora_checks import check_modules
from studio.core.lora_formats import kohya_metadata, read_modules, to_kohya_state_dict, to_peft_state_dict
from studio.core.lora_set import B_LORA_CONTENT, B_LORA_STYLE, LoraFormat, LoraModule, LoraSet

__all__ = [
    "B_LORA_CONTENT", "B_LORA_STYLE", "LoraFormat", "LoraModule", "LoraSet", "check_against_model",
    "detect_lora_family", "fit_to_model", "lora_from_state_dict", "read_lora", "write_lora",
]  # fmt: skip


# --------------------------------------------------------------------------------------------------
# reading


def read_lora(path: str | Path, *, allow_pickle: bool = False) -> LoraSet:
    """Read a LoRA file of any supported format.

    >>> lora = read_lora("my_style.safetensors")  # doctest: +SKIP
    >>> lora.family, lora.source_format, lora.ranks  # doctest: +SKIP
    ('sdxl', 'kohya', [16])
    """
    path = Path(path)
    if allow_pickle and is_pickle(path):
        state = load_pickle_tensors(path)
        state = state.get("state_dict", state) if isinstance(state, dict) else state
        if not isinstance(state, dict):
            raise BadFileError(f"{path}: this pickle file does not hold a dict of tensors.")
        state = {k: v for k, v in state.items() if isinstance(k, str) and isinstance(v, torch.Tensor)}
        metadata: dict[str, str] = {}
    else:
        state, metadata = read_safetensors(path)
    try:
        lora = lora_from_state_dict(state, metadata)
    except StudioError as exc:
        raise type(exc)(f"{path}: {exc}") from None
    lora.path = path
    return lora


def lora_from_state_dict(state: dict[str, torch.Tensor], metadata: dict[str, str] | None = None) -> LoraSet:
    """Build a checked LoraSet from the tensors of a LoRA file (format detected from the keys)."""
    metadata = dict(metadata or {})
    if not state:
        raise BadFileError("the file holds no tensors.")
    modules, fmt = read_modules(state, metadata)
    check_modules(modules)
    family = detect_lora_family(modules, metadata)
    return LoraSet(modules, family, metadata, fmt)


def detect_lora_family(
    modules: dict[str, LoraModule], metadata: dict[str, str] | None = None
) -> Family | None:
    """sd15 / sdxl from metadata, then key structure, then cross-attention widths; None if it cannot tell."""
    metadata = metadata or {}
    version = (
        metadata.get("ss_base_model_version", "") + " " + metadata.get("modelspec.architecture", "")
    ).lower()
    if "xl" in version:
        return "sdxl"
    if "v1" in version or "sd_v1" in version:
        return "sd15"
    paths = list(modules)
    if any(p.startswith("text_encoder_2.") for p in paths):
        return "sdxl"
    unet = [p[len("unet.") :] for p in paths if p.startswith("unet.")]
    # Structure: SDXL has attention in up_blocks.0 and none in down_blocks.0; SD1.5 the reverse,
    # and SD1.5 has a 4th down/up block.
    if any(
        p.startswith(("up_blocks.0.attentions", "down_blocks.2.attentions.0.transformer_blocks.1"))
        for p in unet
    ):
        return "sdxl"
    if any(p.startswith(("down_blocks.0.attentions", "down_blocks.3", "up_blocks.3")) for p in unet):
        return "sd15"
    for path, m in modules.items():  # real widths of cross-attention keys
        if path.endswith("attn2.to_k") and m.down.dim() == 2:
            return {768: "sd15", 2048: "sdxl"}.get(int(m.down.shape[1]))
    return None


# --------------------------------------------------------------------------------------------------
# checking against a model


def check_against_model(lora: LoraSet, family: Family, module_shapes: dict[str, tuple[int, ...]]) -> None:
    """Refuse a LoRA made for another family or whose modules/shapes do not match the model.

    module_shapes maps canonical module paths of the model to their weight shapes (see model_module_shapes).
    """
    label = lora.label()
    if lora.family is not None and lora.family != family:
        raise FamilyMismatchError(
            f"{label} is a {FAMILY_NAMES[lora.family]} LoRA but the model is {FAMILY_NAMES[family]}. "
            f"Pick a {FAMILY_NAMES[family]} LoRA or a {FAMILY_NAMES[lora.family]} base model."
        )
    missing = [p for p in lora.modules if p not in module_shapes]
    if len(missing) == len(lora.modules):
        raise KeyMismatchError(
            f"{label}: none of its {len(missing)} modules exist in this {FAMILY_NAMES[family]} model "
            f"(e.g. {missing[0]}). It was made for a different model."
        )
    if missing:
        raise KeyMismatchError(
            f"{label}: {len(missing)} of its modules do not exist in this model (e.g. {missing[0]})."
        )
    for path, m in lora.modules.items():
        if not _fits(m, module_shapes[path]):
            got = (m.up.shape[0], *m.down.shape[1:])
            raise KeyMismatchError(
                f"{label}: module {path} has shape {tuple(got)} but the model's is {module_shapes[path]}. "
                "The LoRA was made for a model with different layer sizes."
            )


def _fits(m: LoraModule, expected: tuple[int, ...]) -> bool:
    """A LoRA module fits a weight when out/in widths and kernel match (Linear == 1x1 conv)."""
    if m.up.shape[0] != expected[0] or m.down.shape[1] != expected[1]:
        return False
    return (tuple(expected[2:]) or (1, 1)) == (tuple(m.down.shape[2:]) or (1, 1))


def fit_to_model(lora: LoraSet, module_shapes: dict[str, tuple[int, ...]]) -> LoraSet:
    """Reshape factors to the kind of module they adapt (2-D for Linear, 4-D for Conv2d).

    Files disagree on 1x1 convs (kohya stores SD1.5's proj_in as 4-D, converters sometimes 2-D);
    peft needs the factors shaped like its own lora_A / lora_B layers.
    """
    check_against_model(lora, lora.family or _family_from_shapes(module_shapes), module_shapes)
    out = {}
    for path, m in lora.modules.items():
        conv = len(module_shapes[path]) == 4
        if conv and m.down.dim() == 2:
            m = LoraModule(m.down[:, :, None, None], m.up[:, :, None, None], m.alpha)
        elif not conv and m.down.dim() == 4:
            m = LoraModule(m.down.flatten(1), m.up.flatten(1), m.alpha)
        out[path] = m
    return LoraSet(out, lora.family, dict(lora.metadata), lora.source_format, lora.path)


def _family_from_shapes(module_shapes: dict[str, tuple[int, ...]]) -> Family:
    return "sdxl" if any(p.startswith("text_encoder_2.") for p in module_shapes) else "sd15"


# --------------------------------------------------------------------------------------------------
# writing


def write_lora(
    lora: LoraSet,
    path: str | Path,
    *,
    fmt: Literal["kohya", "peft"] = "kohya",
    family: Family | None = None,
    metadata: dict[str, str] | None = None,
    overwrite: bool = False,
    dtype: torch.dtype | None = None,
) -> Path:
    """Write a LoRA atomically: kohya format (default) or diffusers/PEFT format.

    >>> write_lora(lora, "out/my_lora.safetensors")  # doctest: +SKIP
    """
    family = family or lora.family
    if family is None:
        raise StudioError("cannot tell whether this LoRA is for SD1.5 or SDXL; pass family='sd15' or 'sdxl'.")
    if fmt == "kohya":
        state = to_kohya_state_dict(lora, family)
    elif fmt == "peft":
        state = to_peft_state_dict(lora)
    else:
        raise StudioError(f"unknown LoRA output format {fmt!r}; use 'kohya' or 'peft'.")
    if dtype is not None:
        state = {k: v.to(dtype) if v.is_floating_point() and v.dim() > 0 else v for k, v in state.items()}
    meta = kohya_metadata(
        LoraSet(lora.modules, family, lora.metadata, lora.source_format, Path(path)), family, metadata
    )
    meta["studio_format"] = fmt
    return atomic_save_safetensors(state, path, meta, overwrite=overwrite)
