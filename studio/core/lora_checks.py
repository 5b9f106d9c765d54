"""Every LoRA is checked here, once, as it is read: what a file claims must hold before anything uses it.

Checked: at least one module; every module a part of a Stable Diffusion UNet or text encoder; factors
of a floating dtype (float16 / bfloat16 / float32 / float64) that fit together (up's rank = down's rank,
rank > 0, 2-D or 4-D, 1x1 up factors for convs); finite values within float16's range (the module
named); alphas one finite number.
inspect, merge, generate, the page and training all read through `studio.core.lora_files.read_lora`, so
they give the same one-line errors. (Shapes against a base model: `lora_files.check_against_model`.)
"""

from __future__ import annotations

import math

import torch

from studio.core.errors import BadFileError, KeyMismatchError
from studio.core.keys import is_known_module
from studio.core.lora_set import LoraModule

FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)
MAX_FACTOR = 65504.0  # the largest float16: factors beyond it cannot even be saved in the usual dtype


def scalar_alpha(value, path: str) -> float | None:
    """A module's alpha as one finite number; kohya reads alpha 0 as "no alpha" (scale 1), so does this."""
    if (
        not isinstance(value, torch.Tensor)
        or value.numel() != 1
        or value.is_complex()
        or value.dtype == torch.bool
    ):
        shape = tuple(value.shape) if isinstance(value, torch.Tensor) else type(value).__name__
        raise BadFileError(f"module {path}: its alpha must be one number, got {shape}.")
    alpha = float(value.reshape(()).to(torch.float64))
    if not math.isfinite(alpha):
        raise BadFileError(f"module {path}: its alpha is {alpha}; the file is damaged.")
    return None if alpha == 0 else alpha


def metadata_number(value, what: str) -> float:
    """A number stored in a file's metadata (JSON), or a BadFileError naming the field."""
    try:
        number = float(value) if not isinstance(value, bool) else math.nan
    except (TypeError, ValueError, OverflowError):
        number = math.nan
    if not math.isfinite(number):
        raise BadFileError(f"{what} in the file's metadata is {value!r}, not a finite number.")
    return number


def check_modules(modules: dict[str, LoraModule]) -> None:
    """Refuse modules that no tool could use (see the module docstring)."""
    if not modules:
        raise BadFileError(
            "the file holds no LoRA modules (no pairs of down/up factors); it is empty or damaged."
        )
    unknown = [path for path in modules if not is_known_module(path)]
    if unknown:
        raise KeyMismatchError(
            f"module {unknown[0]} is not part of a Stable Diffusion 1.5 / SDXL UNet or text encoder "
            f"({len(unknown)} of {len(modules)} modules are not); this LoRA is for another kind of model."
        )
    for path, m in modules.items():
        _check_factors(path, m)


def _check_factors(path: str, m: LoraModule) -> None:
    for name, tensor in (("down", m.down), ("up", m.up)):
        if tensor.dtype not in FLOAT_DTYPES:
            raise BadFileError(
                f"module {path}: its {name} factor is {str(tensor.dtype).removeprefix('torch.')}; LoRA factors "
                "are float16, bfloat16 or float32. The file is damaged or not a LoRA."
            )
    if m.down.dim() not in (2, 4) or m.up.dim() != m.down.dim() or m.up.shape[1] != m.down.shape[0]:
        raise KeyMismatchError(
            f"module {path}: LoRA factors do not fit together (down {tuple(m.down.shape)}, up {tuple(m.up.shape)})."
        )
    if m.down.shape[0] == 0 or 0 in m.down.shape or 0 in m.up.shape:
        raise BadFileError(f"module {path}: its factors are empty (rank 0, shape {tuple(m.down.shape)}).")
    if m.is_conv and tuple(m.up.shape[2:]) != (1, 1):
        raise KeyMismatchError(f"module {path}: conv LoRA up factor must be 1x1, got {tuple(m.up.shape)}.")
    for name, tensor in (("down", m.down), ("up", m.up)):
        if not bool(torch.isfinite(tensor).all()):
            bad = "NaN" if bool(torch.isnan(tensor).any()) else "infinite"
            raise BadFileError(f"module {path}: its {name} factor holds {bad} values; the file is damaged.")
        if float(tensor.abs().max()) > MAX_FACTOR:
            raise BadFileError(
                f"module {path}: its {name} factor holds values up to {float(tensor.abs().max()):.3g}, beyond "
                f"float16's range ({MAX_FACTOR:g}); no trained LoRA comes near that, the file is damaged."
            )
