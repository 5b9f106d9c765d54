"""The one in-memory form of a LoRA, whatever file it came from.

A LoraSet maps canonical module paths ("unet.down_blocks.0.attentions.0.proj_in",
"text_encoder.text_model.encoder.layers.0.self_attn.q_proj") to modules of three kinds:
- LoraModule(down, up, alpha): LoRA and LoCon, delta = (alpha / rank) * up @ down; with `mid` a LoCon with
  a Tucker core, with `dora_scale` a DoRA (the delta then depends on the base weight);
- LycorisModule("loha" | "lokr", factors, alpha): LyCORIS' Hadamard and Kronecker products.

Every module answers `delta(base)`: the weight change it makes, shaped like the adapted weight. The algebra
of Tucker, LoHa, LoKr and DoRA is lycoris-lora's own (`lycoris.functional`), the reference these files are
written for; only plain up @ down is computed here.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import torch

from studio.core.families import Family
from studio.core.lora_keys import (
    KIND_NAMES,
    ModulePaths,
    Shape,
    module_rank,
    variant,
    weight_shape,
)

LoraFormat = Literal["kohya", "peft", "diffusers_old"]


def _scale(alpha: float | None, rank: int | None) -> float:
    return 1.0 if alpha is None or rank is None else float(alpha) / max(rank, 1)


def dora_delta(base: torch.Tensor, raw: torch.Tensor, dora_scale: torch.Tensor) -> torch.Tensor:
    """DoRA's weight change: W = base + raw, rescaled to the stored magnitudes, minus base.

    The norm runs per input column for dora_scale of shape (1, in, ...) (kohya's and A1111's convention) and
    per output row for (out, 1, ...) or PEFT's (out,) magnitude vector. A weight s applies s * this delta,
    as A1111 and ComfyUI do.
    """
    from lycoris.functional.general import weight_decompose

    base = base.to(torch.float32).reshape(raw.shape)
    on_out = dora_scale.dim() == 1 or dora_scale.shape[0] > 1
    ones = [1] * (raw.dim() - 2)
    shape = (raw.shape[0], 1, *ones) if on_out else (1, raw.shape[1], *ones)
    magnitude = dora_scale.to(torch.float32).reshape(shape)
    return weight_decompose(base + raw, magnitude, 1, on_out) - base


@dataclass
class LoraModule:
    """One adapted module: delta = (alpha / rank) * up @ down.

    down: (rank, in) for Linear, (rank, in, kh, kw) for Conv2d.  up: (out, rank) or (out, rank, 1, 1).
    alpha None means "no alpha stored", which tools read as alpha = rank (scale 1).
    mid: a LoCon's Tucker core (rank, rank, kh, kw), down then (rank, in, 1, 1).
    dora_scale: DoRA's magnitudes (see `dora_delta`).
    """

    down: torch.Tensor
    up: torch.Tensor
    alpha: float | None = None
    mid: torch.Tensor | None = None
    dora_scale: torch.Tensor | None = None
    kind = "lora"

    @property
    def rank(self) -> int:
        return int(self.down.shape[0])

    @property
    def scale(self) -> float:
        return _scale(self.alpha, self.rank)

    @property
    def is_conv(self) -> bool:
        return self.down.dim() == 4

    @property
    def needs_base(self) -> bool:
        """True for DoRA, whose delta depends on the base weight."""
        return self.dora_scale is not None

    @property
    def is_lowrank(self) -> bool:
        """True when the delta is exactly up @ down (after `lowrank`): plain LoRA, LoCon and Tucker."""
        return self.dora_scale is None

    def factors(self) -> dict[str, torch.Tensor]:
        roles = {"down": self.down, "up": self.up, "mid": self.mid, "dora_scale": self.dora_scale}
        return {r: t for r, t in roles.items() if t is not None}

    @property
    def weight_shape(self) -> Shape:
        return weight_shape("lora", {r: tuple(t.shape) for r, t in self.factors().items()})

    @property
    def variant(self) -> str:
        return variant("lora", self.factors(), {r: tuple(t.shape) for r, t in self.factors().items()})

    def lowrank(self) -> LoraModule:
        """The same delta as plain factors: a Tucker core folded into down, exactly (rank unchanged)."""
        if self.mid is None:
            return self
        down = torch.einsum("ijhw,jc->ichw", self.mid.float(), self.down.float().flatten(1))
        return LoraModule(down.to(self.down.dtype), self.up, self.alpha, None, self.dora_scale)

    def raw_delta(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """scale * up @ down, shaped like the adapted weight (no DoRA rescaling)."""
        m = self.lowrank()
        delta = (m.up.to(dtype).flatten(1) @ m.down.to(dtype).flatten(1)) * self.scale
        return delta.reshape(self.up.shape[0], *m.down.shape[1:]) if m.is_conv else delta

    def delta(self, base: torch.Tensor | None = None, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """The weight change this module adds, shaped like the target module's weight (DoRA needs `base`)."""
        raw = self.raw_delta(torch.float32 if self.needs_base else dtype)
        if not self.needs_base:
            return raw
        if base is None:
            raise ValueError("a DoRA module's delta needs the base weight")
        return dora_delta(base, raw, self.dora_scale).to(dtype)


@dataclass
class LycorisModule:
    """A LyCORIS LoHa or LoKr module: `factors` maps the file's role names (hada_w1_a, lokr_w1, ...) to tensors."""

    kind: Literal["loha", "lokr"]
    factors_: dict[str, torch.Tensor]
    alpha: float | None = None
    dora_scale: torch.Tensor | None = None
    path: str = field(default="", repr=False)  # for the kernel of conv factors stored flattened

    @property
    def rank(self) -> int | None:
        return module_rank(self.kind, self._shapes())

    @property
    def scale(self) -> float:
        return _scale(self.alpha, self.rank)

    @property
    def weight_shape(self) -> Shape:
        return weight_shape(self.kind, self._shapes(), self.path)

    @property
    def is_conv(self) -> bool:
        return len(self.weight_shape) == 4

    @property
    def needs_base(self) -> bool:
        return self.dora_scale is not None

    is_lowrank = False

    @property
    def variant(self) -> str:
        return f"{self.kind}_dora" if self.dora_scale is not None else self.kind

    def factors(self) -> dict[str, torch.Tensor]:
        extra = {"dora_scale": self.dora_scale} if self.dora_scale is not None else {}
        return dict(self.factors_) | extra

    def _shapes(self) -> dict[str, Shape]:
        return {r: tuple(t.shape) for r, t in self.factors_.items()}

    def raw_delta(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        f = {r: t.to(torch.float32) for r, t in self.factors_.items()}
        if self.kind == "loha":
            from lycoris.functional import loha

            args = (
                f["hada_w1_b"],
                f["hada_w1_a"],
                f["hada_w2_b"],
                f["hada_w2_a"],
                f.get("hada_t1"),
                f.get("hada_t2"),
            )
            delta = loha.diff_weight(
                *args, gamma=torch.tensor(self.scale)
            )  # a tensor: it is saved for autograd
        else:
            from lycoris.functional.lokr import kron_weight

            w1, w2 = f.get("lokr_w1"), f.get("lokr_w2")
            w2b = f.get("lokr_w2_b")
            if w2 is None and "lokr_t2" not in f and w2b is not None and w2b.dim() == 2:
                inner = weight_shape(
                    "lokr",
                    {"lokr_w1": (1, 1), "lokr_w2_a": f["lokr_w2_a"].shape, "lokr_w2_b": w2b.shape},
                    self.path,
                )
                w2b = w2b.reshape(w2b.shape[0], *inner[1:])  # a conv's (r, d*kh*kw) as (r, d, kh, kw)
            delta = kron_weight(
                w1, f.get("lokr_w1_a"), f.get("lokr_w1_b"), w2, f.get("lokr_w2_a"), w2b, f.get("lokr_t2"),
                scale=self.scale,
            )  # fmt: skip
        return delta.reshape(self.weight_shape).to(dtype)

    def delta(self, base: torch.Tensor | None = None, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        raw = self.raw_delta()
        if not self.needs_base:
            return raw.to(dtype)
        if base is None:
            raise ValueError("a DoRA module's delta needs the base weight")
        return dora_delta(base, raw, self.dora_scale).to(dtype)


AnyModule = LoraModule | LycorisModule


@dataclass
class LoraSet(ModulePaths):
    """A LoRA as the studio holds it, whatever file it came from."""

    modules: dict[str, AnyModule]
    family: Family | None = None
    metadata: dict[str, str] = field(default_factory=dict)
    source_format: LoraFormat | None = None
    path: Path | None = None
    # token embeddings bundled with the modules: {word: {"clip_l": (n, width), ...}} (lora_embeddings)
    embeddings: dict[str, dict[str, torch.Tensor]] = field(default_factory=dict)

    @property
    def ranks(self) -> list[int]:
        return sorted({m.rank for m in self.modules.values() if m.rank is not None})

    @property
    def alphas(self) -> list[float]:
        return sorted({m.alpha if m.alpha is not None else float(m.rank or 1) for m in self.modules.values()})

    @property
    def kinds(self) -> list[str]:
        """What kinds of module the file holds, as users name them (LoRA, LoCon, LoHa, LoKr, DoRA, ...)."""
        return sorted({KIND_NAMES[m.variant] for m in self.modules.values()})

    @property
    def is_lowrank(self) -> bool:
        """True when every module is plain low-rank factors (an exact concat merge is possible)."""
        return all(m.is_lowrank for m in self.modules.values())

    @property
    def needs_base(self) -> bool:
        return any(m.needs_base for m in self.modules.values())

    def subset(self, prefixes: tuple[str, ...]) -> LoraSet:
        """A LoraSet with only the modules whose path starts with one of `prefixes` (e.g. B-LoRA halves)."""
        mods = {p: m for p, m in self.modules.items() if p.startswith(prefixes)}
        return LoraSet(mods, self.family, dict(self.metadata), self.source_format, self.path, self.embeddings)

    def label(self) -> str:
        return str(self.path) if self.path else "LoRA"


def n_parameters(modules: dict[str, AnyModule]) -> int:
    return sum(math.prod(t.shape) for m in modules.values() for t in m.factors().values())
