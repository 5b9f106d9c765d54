"""LoRA files in every common format, read into one in-memory form and written back.

One representation whatever the source (studio.core.lora_set): a LoraSet maps canonical module paths to
modules (LoRA / LoCon / Tucker / DoRA factors, or LyCORIS LoHa / LoKr). The key layouts are
studio.core.lora_formats; the checks every file passes, studio.core.lora_checks.

Read: kohya / A1111 / ComfyUI / LyCORIS keys (lora_unet_, lora_te_, lora_te1_, lora_te2_; diffusers or
original UNet paths for either family; with or without .alpha; LoCon, Tucker, DoRA, LoHa, LoKr), diffusers /
PEFT keys (lora_A / lora_B, lora_magnitude_vector, PEFT's LoHa / LoKr names; alphas from .alpha keys,
diffusers' lora_adapter_metadata or a PEFT folder's adapter_config.json), PEFT save_pretrained folders, the
old diffusers keys (.lora.down, .lora_linear_layer.down, .processor.to_q_lora.down), and B-LoRA files.
Write: kohya format by default (loads in A1111, ComfyUI and diffusers), PEFT format on request.
"""

from __future__ import annotations

from pathlib import Path
from typing import Literal

import torch

from studio.core.adapter_config import WEIGHTS_NAME, folder_config, is_adapter_folder
from studio.core.errors import BadFileError, FamilyMismatchError, KeyMismatchError, StudioError
from studio.core.families import FAMILY_NAMES, Family
from studio.core.io import atomic_save_safetensors, is_pickle, load_pickle_tensors, read_safetensors
from studio.core.lora_embeddings import bundled_state, split_bundled
from studio.core.lora_formats import kohya_metadata, read_modules, to_kohya_state_dict, to_peft_state_dict
from studio.core.lora_keys import B_LORA_CONTENT, B_LORA_STYLE, detect_lora_family
from studio.core.lora_set import (
    AnyModule,
    LoraFormat,
    LoraModule,
    LoraSet,
    LycorisModule,
)

__all__ = [
    "B_LORA_CONTENT", "B_LORA_STYLE", "AnyModule", "LoraFormat", "LoraModule", "LoraSet", "LycorisModule",
    "check_against_model", "detect_lora_family", "fit_to_model", "lora_from_state_dict", "read_lora",
    "write_lora",
]  # fmt: skip


# --------------------------------------------------------------------------------------------------
# reading


def read_lora(path: str | Path, *, allow_pickle: bool = False) -> LoraSet:
    """Read a LoRA file of any supported format, or a PEFT save_pretrained folder.

    >>> lora = read_lora("my_style.safetensors")  # doctest: +SKIP
    >>> lora.family, lora.source_format, lora.ranks  # doctest: +SKIP
    ('sdxl', 'kohya', [16])
    """
    path = Path(path)
    config = None
    if is_adapter_folder(path):
        config = folder_config(path)
        weights = path / WEIGHTS_NAME
        if not weights.is_file():
            raise BadFileError(
                f"{path}: a PEFT adapter folder needs {WEIGHTS_NAME} beside adapter_config.json."
            )
        state, metadata = read_safetensors(weights)
    elif allow_pickle and is_pickle(path):
        state = load_pickle_tensors(path)
        state = state.get("state_dict", state) if isinstance(state, dict) else state
        if not isinstance(state, dict):
            raise BadFileError(f"{path}: this pickle file does not hold a dict of tensors.")
        state = {k: v for k, v in state.items() if isinstance(k, str) and isinstance(v, torch.Tensor)}
        metadata: dict[str, str] = {}
    else:
        state, metadata = read_safetensors(path)
    try:
        lora = lora_from_state_dict(state, metadata, config=config)
    except StudioError as exc:
        raise type(exc)(f"{path}: {exc}") from None
    lora.path = path
    return lora


def lora_from_state_dict(
    state: dict[str, torch.Tensor], metadata: dict[str, str] | None = None, *, config=None
) -> LoraSet:
    """Build a checked LoraSet from the tensors of a LoRA file (format detected from the keys)."""
    metadata = dict(metadata or {})
    state, embeddings = split_bundled(state)
    if not state:
        if embeddings:
            raise BadFileError("the file holds only token embeddings; it is an embedding, not a LoRA.")
        raise BadFileError("the file holds no tensors.")
    modules, fmt = read_modules(state, metadata, config)
    family = detect_lora_family({p: m.weight_shape for p, m in modules.items()}, metadata)
    return LoraSet(modules, family, metadata, fmt, embeddings=embeddings)


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
        if not fits(m.weight_shape, module_shapes[path]):
            raise KeyMismatchError(
                f"{label}: module {path} has shape {tuple(m.weight_shape)} but the model's is "
                f"{module_shapes[path]}. The LoRA was made for a model with different layer sizes."
            )


def fits(shape: tuple[int, ...], expected: tuple[int, ...]) -> bool:
    """A module's weight shape fits a model weight when out / in widths and kernel match (Linear == 1x1
    conv; a conv stored flattened, (out, in * kh * kw), fits by its total input size)."""
    if shape[0] != expected[0]:
        return False
    if len(shape) == 2 and len(expected) == 4 and shape[1] == expected[1] * expected[2] * expected[3]:
        return True
    if shape[1] != expected[1]:
        return False
    return (tuple(expected[2:]) or (1, 1)) == (tuple(shape[2:]) or (1, 1))


def fit_to_model(lora: LoraSet, module_shapes: dict[str, tuple[int, ...]]) -> LoraSet:
    """Reshape factors to the kind of module they adapt (2-D for Linear, 4-D for Conv2d).

    Files disagree on 1x1 convs (kohya stores SD1.5's proj_in as 4-D, converters sometimes 2-D);
    peft needs the factors shaped like its own lora_A / lora_B layers. LoHa / LoKr modules are kept as they
    are: their deltas are reshaped to the weight where they are used.
    """
    check_against_model(lora, lora.family or _family_from_shapes(module_shapes), module_shapes)
    out: dict[str, AnyModule] = {}
    for path, m in lora.modules.items():
        if isinstance(m, LoraModule):
            conv = len(module_shapes[path]) == 4
            if conv and m.down.dim() == 2:
                m = LoraModule(m.down[:, :, None, None], m.up[:, :, None, None], m.alpha, m.mid, m.dora_scale)
            elif not conv and m.down.dim() == 4:
                m = LoraModule(m.down.flatten(1), m.up.flatten(1), m.alpha, m.mid, m.dora_scale)
        out[path] = m
    return LoraSet(out, lora.family, dict(lora.metadata), lora.source_format, lora.path, lora.embeddings)


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
        state = to_kohya_state_dict(lora, family) | bundled_state(lora.embeddings, family)
    elif lora.embeddings:
        raise StudioError(
            "token embeddings are stored in kohya-format LoRA files only; write this one as kohya"
        )
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
