"""Every LoRA is checked here, once, as it is read: what a file claims must hold before anything uses it.

Checked: at least one module; every module a part of a Stable Diffusion UNet or text encoder; factors of a
floating dtype (float16 / bfloat16 / float32 / float64) that fit together (studio.core.lora_keys.check_shapes:
ranks agree, rank > 0, kernels and Tucker cores match); finite values within float16's range (the module
named); alphas one finite number. The structure is checked from names, dtypes and shapes alone (pure Python,
so `inspect` can do it from a file's header); values by `check_values` on torch tensors or numpy arrays.
inspect, merge, generate, the page and training all read through `studio.core.lora_files.read_lora` (or, for
inspect, `studio.core.lora_summary`), so they give the same one-line errors. (Shapes against a base model:
`lora_files.check_against_model`.)
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass

from studio.core.errors import BadFileError, KeyMismatchError
from studio.core.keys import is_known_module
from studio.core.lora_keys import (
    KeyGroups,
    Shape,
    check_shapes,
    module_kind,
    module_rank,
    variant,
    weight_shape,
)

FLOAT_DTYPES = ("F16", "BF16", "F32", "F64")  # safetensors' names
DTYPE_WORDS = {"F16": "float16", "BF16": "bfloat16", "F32": "float32", "F64": "float64", "BOOL": "bool",
               "F8_E4M3": "float8_e4m3", "F8_E5M2": "float8_e5m2", "C64": "complex64"}  # fmt: skip
MAX_FACTOR = 65504.0  # the largest float16: factors beyond it cannot even be saved in the usual dtype


@dataclass(frozen=True)
class ModuleLayout:
    """What the names and shapes of one module's tensors say about it."""

    kind: str  # lora, loha, lokr
    variant: str  # lora, locon, tucker, dora, loha, lokr
    rank: int | None  # what alpha is divided by (None: a LoKr of full matrices, scale 1)
    weight_shape: Shape  # (out, in, *kernel) of the weight it changes


def dtype_name(dtype) -> str:
    """safetensors' name of a torch dtype ("torch.float16" -> "F16"); safetensors names pass through."""
    text = str(dtype).removeprefix("torch.")
    words = {v: k for k, v in DTYPE_WORDS.items()} | {"half": "F16", "float": "F32", "double": "F64"}
    return words.get(text, text)


def check_layout(
    groups: KeyGroups, dtypes: Mapping[str, str], shapes: Mapping[str, Shape]
) -> dict[str, ModuleLayout]:
    """Check a file's structure from its keys, dtypes and shapes; return each module's layout."""
    if not groups.modules:
        raise BadFileError(
            "the file holds no LoRA modules (no complete sets of factors); it is empty or damaged."
        )
    unknown = [path for path in groups.modules if not is_known_module(path)]
    if unknown:
        raise KeyMismatchError(
            f"module {unknown[0]} is not part of a Stable Diffusion 1.5 / SDXL UNet or text encoder "
            f"({len(unknown)} of {len(groups.modules)} modules are not); this LoRA is for another kind of model."
        )
    layouts = {}
    for path, roles in groups.modules.items():
        for role, key in roles.items():
            dtype = dtype_name(dtypes[key])
            if role != "alpha" and dtype not in FLOAT_DTYPES:
                raise BadFileError(
                    f"module {path}: its {role} factor is {DTYPE_WORDS.get(dtype, dtype)}; LoRA factors are "
                    "float16, bfloat16 or float32. The file is damaged or not a LoRA."
                )
            if role == "alpha" and (math.prod(shapes[key]) != 1 or dtype in ("BOOL", "C64")):
                raise BadFileError(f"module {path}: its alpha must be one number, got {tuple(shapes[key])}.")
        kind = module_kind(roles)
        factor_shapes = {r: tuple(shapes[k]) for r, k in roles.items() if r != "alpha"}
        check_shapes(path, kind, factor_shapes)
        layouts[path] = ModuleLayout(
            kind,
            variant(kind, roles, factor_shapes),
            module_rank(kind, factor_shapes),
            weight_shape(kind, factor_shapes, path),
        )
    return layouts


def check_values(path: str, role: str, finite: bool, largest: float, has_nan: bool = True) -> None:
    """Refuse NaN / infinite factors and values no trained LoRA reaches (`largest` = max |value|)."""
    if not finite:
        bad = "NaN" if has_nan else "infinite"
        raise BadFileError(f"module {path}: its {role} factor holds {bad} values; the file is damaged.")
    if largest > MAX_FACTOR:
        raise BadFileError(
            f"module {path}: its {role} factor holds values up to {largest:.3g}, beyond float16's range "
            f"({MAX_FACTOR:g}); no trained LoRA comes near that, the file is damaged."
        )


def check_tensor_values(path: str, role: str, tensor) -> None:
    """`check_values` for a torch tensor."""
    if tensor.numel() == 0:
        return
    finite = bool(tensor.isfinite().all())
    check_values(path, role, finite, float(tensor.abs().max()), not finite and bool(tensor.isnan().any()))


def scalar_alpha(value: float, path: str) -> float | None:
    """A module's alpha as one finite number; kohya reads alpha 0 as "no alpha" (scale 1), so does this."""
    alpha = float(value)
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
