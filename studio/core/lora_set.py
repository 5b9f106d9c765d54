"""The one in-memory form of a LoRA, whatever file it came from.

A LoraSet maps canonical module paths ("unet.down_blocks.0.attentions.0.proj_in",
"text_encoder.text_model.encoder.layers.0.self_attn.q_proj") to LoraModule(down, up, alpha); the module's
delta is (alpha / rank) * up @ down.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import torch

from studio.core.blocks import BLOCK_IDS, block_of
from studio.core.families import Family

LoraFormat = Literal["kohya", "peft", "diffusers_old"]
B_LORA_CONTENT = "unet.up_blocks.0.attentions.0."
B_LORA_STYLE = "unet.up_blocks.0.attentions.1."


@dataclass
class LoraModule:
    """One adapted module: delta = (alpha / rank) * up @ down.

    down: (rank, in) for Linear, (rank, in, kh, kw) for Conv2d.  up: (out, rank) or (out, rank, 1, 1).
    alpha None means "no alpha stored", which tools read as alpha = rank (scale 1).
    """

    down: torch.Tensor
    up: torch.Tensor
    alpha: float | None = None

    @property
    def rank(self) -> int:
        return int(self.down.shape[0])

    @property
    def scale(self) -> float:
        return 1.0 if self.alpha is None else float(self.alpha) / max(self.rank, 1)

    @property
    def is_conv(self) -> bool:
        return self.down.dim() == 4

    def delta(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """The weight change this module adds, shaped like the target module's weight."""
        up = self.up.to(dtype).flatten(1)
        down = self.down.to(dtype).flatten(1)
        delta = (up @ down) * self.scale
        if self.is_conv:
            return delta.reshape(self.up.shape[0], *self.down.shape[1:])
        return delta


@dataclass
class LoraSet:
    """A LoRA as the studio holds it, whatever file it came from."""

    modules: dict[str, LoraModule]
    family: Family | None = None
    metadata: dict[str, str] = field(default_factory=dict)
    source_format: LoraFormat | None = None
    path: Path | None = None

    @property
    def ranks(self) -> list[int]:
        return sorted({m.rank for m in self.modules.values()})

    @property
    def alphas(self) -> list[float]:
        return sorted({m.alpha if m.alpha is not None else float(m.rank) for m in self.modules.values()})

    @property
    def blocks(self) -> list[str]:
        touched = {block_of(p) for p in self.modules}
        return [b for b in BLOCK_IDS if b in touched]

    @property
    def components(self) -> list[str]:
        return sorted({p.split(".", 1)[0] for p in self.modules})

    @property
    def is_b_lora(self) -> bool:
        """True when every UNet module sits in B-LoRA's content or style block (SDXL up_blocks.0.attentions.0/1)."""
        unet = [p for p in self.modules if p.startswith("unet.")]
        return bool(unet) and all(p.startswith((B_LORA_CONTENT, B_LORA_STYLE)) for p in unet)

    def subset(self, prefixes: tuple[str, ...]) -> LoraSet:
        """A LoraSet with only the modules whose path starts with one of `prefixes` (e.g. B-LoRA halves)."""
        mods = {p: m for p, m in self.modules.items() if p.startswith(prefixes)}
        return LoraSet(mods, self.family, dict(self.metadata), self.source_format, self.path)

    def label(self) -> str:
        return str(self.path) if self.path else "LoRA"
