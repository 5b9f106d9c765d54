"""What a LoRA file holds, read and checked without torch: what `lora-studio inspect` shows.

The header gives every key, dtype and shape, which is enough for the structural checks of
studio.core.lora_checks; the values (finite, within float16's range) and the alphas are read with numpy
straight from the file's bytes. The same checks and messages as `read_lora`, at a fraction of the start-up
cost (no torch, diffusers or peft import).

    >>> summary = summarize_lora("style.safetensors")  # doctest: +SKIP
    >>> summary.family, summary.kinds, summary.ranks  # doctest: +SKIP
    ('sdxl', ['LoHa'], [8])
"""

from __future__ import annotations

import math
import mmap
from dataclasses import dataclass, field
from pathlib import Path

from studio.core.adapter_config import (
    WEIGHTS_NAME,
    AdapterConfig,
    folder_config,
    is_adapter_folder,
    metadata_configs,
)
from studio.core.errors import BadFileError, StudioError
from studio.core.io import read_header
from studio.core.lora_checks import ModuleLayout, check_layout, check_values, scalar_alpha
from studio.core.lora_keys import (
    BUNDLE_PREFIX,
    KIND_NAMES,
    ModulePaths,
    bundled_words,
    detect_lora_family,
    group_keys,
)


@dataclass
class ModuleSummary:
    layout: ModuleLayout
    alpha: float | None  # None: not stored (tools read alpha = rank)

    @property
    def shown_alpha(self) -> float:
        return self.alpha if self.alpha is not None else float(self.layout.rank or 1)


@dataclass
class LoraSummary(ModulePaths):
    """A checked description of one LoRA file (see the module docstring)."""

    path: Path
    format: str
    modules: dict[str, ModuleSummary]
    metadata: dict[str, str] = field(default_factory=dict)
    dtypes: list[str] = field(default_factory=list)
    parameters: int = 0
    family: str | None = None
    embeddings: dict[str, int] = field(default_factory=dict)  # bundled token embeddings: {word: vectors}

    @property
    def ranks(self) -> list[int]:
        return sorted({m.layout.rank for m in self.modules.values() if m.layout.rank is not None})

    @property
    def alphas(self) -> list[float]:
        return sorted({m.shown_alpha for m in self.modules.values()})

    @property
    def kinds(self) -> list[str]:
        return sorted({KIND_NAMES[m.layout.variant] for m in self.modules.values()})


def summarize_lora(path: str | Path) -> LoraSummary:
    """Read and check a .safetensors LoRA (or a PEFT folder) from its header and bytes; see the module doc."""
    path = Path(path)
    config: AdapterConfig | None = None
    weights = path
    if is_adapter_folder(path):
        config, weights = folder_config(path), path / WEIGHTS_NAME
        if not weights.is_file():
            raise BadFileError(
                f"{path}: a PEFT adapter folder needs {WEIGHTS_NAME} beside adapter_config.json."
            )
    index, metadata = read_header(weights)
    try:
        summary = _summarize(weights, index, metadata, config)
    except StudioError as exc:
        raise type(exc)(f"{path}: {exc}") from None
    summary.path = path
    summary.family = detect_lora_family(
        {p: m.layout.weight_shape for p, m in summary.modules.items()}, metadata
    )
    return summary


def _summarize(
    path: Path, index: dict, metadata: dict[str, str], config: AdapterConfig | None
) -> LoraSummary:
    if not index:
        raise BadFileError("the file holds no tensors.")
    groups = group_keys(index)
    dtypes = {k: v["dtype"] for k, v in index.items()}
    shapes = {k: tuple(v["shape"]) for k, v in index.items()}
    layouts = check_layout(groups, dtypes, shapes)
    configs = metadata_configs(metadata) if groups.format == "peft" else {}
    values = _Values(path, index)
    modules = {}
    try:
        for p, roles in groups.modules.items():
            for role, key in roles.items():
                if role != "alpha":
                    check_values(p, role, *values.finite_and_largest(key))
            if "alpha" in roles:
                alpha = scalar_alpha(values.scalar(roles["alpha"]), p)
            else:
                cfg = config or configs.get(p.partition(".")[0])
                alpha = cfg.alpha(p, layouts[p].rank) if cfg else None
            modules[p] = ModuleSummary(layouts[p], alpha)
        for key in index:
            if key.startswith(BUNDLE_PREFIX):  # bundled token embeddings: finite, like every tensor
                check_values(key, "embedding", *values.finite_and_largest(key))
    finally:
        values.close()
    used = {k for roles in groups.modules.values() for k in roles.values()}
    return LoraSummary(
        path,
        groups.format,
        modules,
        metadata,
        sorted({dtypes[k] for roles in groups.modules.values() for r, k in roles.items() if r != "alpha"}),
        sum(math.prod(shapes[k]) for k in used),
        embeddings=bundled_words(shapes),
    )


# dtype -> (unsigned view, mask dropping the sign, the bits of 65504 (float16's largest) in that dtype)
_LIMIT_BITS = {
    "F16": ("<u2", 0x7FFF, 0x7BFF), "BF16": ("<u2", 0x7FFF, 0x477F),
    "F32": ("<u4", 0x7FFFFFFF, 0x477FE000), "F64": ("<u8", 0x7FFFFFFFFFFFFFFF, 0x40EFFC0000000000),
}  # fmt: skip


class _Values:
    """Tensor values straight from a safetensors file (offsets already checked by read_header)."""

    def __init__(self, path: Path, index: dict) -> None:
        import numpy as np

        self.np, self.index = np, index
        self.file = open(path, "rb")
        self.map = mmap.mmap(self.file.fileno(), 0, access=mmap.ACCESS_READ) if path.stat().st_size else None
        (header_len,) = np.frombuffer(self.map[:8], "<u8") if self.map else (0,)
        self.start = 8 + int(header_len)

    def _array(self, key: str):
        info = self.index[key]
        begin, end = info["data_offsets"]
        raw = self.np.frombuffer(self.map, dtype="u1", count=end - begin, offset=self.start + begin)
        dtype = info["dtype"]
        if dtype == "BF16":  # numpy has no bfloat16: widen the bits to float32
            return (raw.view("<u2").astype("<u4") << 16).view("<f4")
        return raw.view({"F16": "<f2", "F32": "<f4", "F64": "<f8", "I64": "<i8", "I32": "<i4",
                         "I16": "<i2", "I8": "i1", "U8": "u1"}.get(dtype, "u1"))  # fmt: skip

    def finite_and_largest(self, key: str) -> tuple[bool, float, bool]:
        """(all finite, largest |value|, any NaN). Most files pass at integer speed: |x| <= 65504 and finite
        is one comparison of the bits without sign against the bits of 65504; the floats are looked at only
        when that fails, for the message."""
        dtype = self.index[key]["dtype"]
        if dtype in _LIMIT_BITS:
            begin, end = self.index[key]["data_offsets"]
            view, mask, limit = _LIMIT_BITS[dtype]
            count = (end - begin) // self.np.dtype(view).itemsize
            bits = self.np.frombuffer(self.map, dtype=view, count=count, offset=self.start + begin)
            if bits.size == 0 or int(self.np.bitwise_and(bits, mask).max()) <= limit:
                return True, 0.0, False
        values = self._array(key)
        if values.size == 0:
            return True, 0.0, False
        with self.np.errstate(all="ignore"):
            finite = bool(self.np.isfinite(values).all())
            return finite, float(self.np.abs(values).max()), bool(self.np.isnan(values).any())

    def scalar(self, key: str) -> float:
        values = self._array(key)
        return float(values.reshape(-1)[0]) if values.size == 1 else math.nan

    def close(self) -> None:
        if self.map is not None:
            self.map.close()
        self.file.close()
