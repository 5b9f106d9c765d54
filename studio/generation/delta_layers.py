"""Adapters that peft's LoRA layers cannot hold beside each other: LyCORIS LoHa / LoKr and DoRA.

peft has LoHa and LoKr layers of its own, but one module cannot carry a LoRA and a LoHa adapter at once
(peft 0.21: nesting a LoRA layer around a LoKr Conv2d fails, in its mixed-adapter model too), and its
DoRA normalises per output row where kohya / A1111 files normalise per input column. A stack of LoRA,
LoHa and DoRA files on one model is what users load, so these kinds run here: a forward hook on the base
module adds each active adapter's output, `scale * op(x, delta)`, with the delta from the module's own
`delta()` (lycoris-lora's algebra). The controls follow peft's layers, so the adapter pool drives both
alike: `scaling`, the active set, `merge` / `unmerge`, and one adapter per sample for batched composite.

    >>> layer = DeltaLayer(unet.get_submodule("mid_block.attentions.0.proj_in"))  # doctest: +SKIP
    >>> layer.add("lora3", loha_module); layer.set_scale("lora3", 0.8); layer.set_active(["lora3"])  # doctest: +SKIP
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F

from studio.core.lora_set import AnyModule


class DeltaLayer:
    """The LoHa / LoKr / DoRA adapters of one Linear or Conv2d module (see the module docstring)."""

    def __init__(self, module: torch.nn.Module) -> None:
        self.module = module
        self.adapters: dict[str, AnyModule] = {}
        self.scaling: dict[str, float] = {}
        self.active_adapters: list[str] = []
        self.sample_names: list[str] | None = None  # per-sample adapters of the next forward passes
        self._merged: dict[str, torch.Tensor] = {}  # adapter -> what merge added to the weight
        self._handle = module.register_forward_hook(self._forward_hook)

    # --------------------------------------------------------------------------------------------- peft-like
    def add(self, name: str, module: AnyModule) -> None:
        self.adapters[name] = module
        self.scaling[name] = 1.0

    def remove(self, name: str) -> None:
        self.adapters.pop(name, None)
        self.scaling.pop(name, None)
        self.active_adapters = [n for n in self.active_adapters if n != name]

    def close(self) -> None:
        """Take the hook off the module (after unmerge), leaving the module as it was."""
        self._handle.remove()

    def holds(self, name: str) -> bool:
        return name in self.adapters

    def set_scale(self, name: str, scale: float) -> None:
        if name in self.adapters:
            self.scaling[name] = float(scale)

    def set_active(self, names: Sequence[str]) -> None:
        self.active_adapters = [n for n in names if n in self.adapters]

    @property
    def merged(self) -> bool:
        return bool(self._merged)

    @torch.no_grad()
    def merge(self, adapter_names: Sequence[str]) -> None:
        """Add scale * delta of each adapter into the weight (every delta against the unmerged weight)."""
        weight = self.module.weight
        added = {
            n: self.scaling[n] * self._delta(n)
            for n in adapter_names
            if n in self.adapters and n not in self._merged
        }
        for name, delta in added.items():
            weight.add_(delta.to(weight.dtype))
            self._merged[name] = delta

    @torch.no_grad()
    def unmerge(self) -> None:
        weight = self.module.weight
        for delta in self._merged.values():
            weight.sub_(delta.to(weight.dtype))
        self._merged.clear()

    # --------------------------------------------------------------------------------------------- forward
    def _delta(self, name: str) -> torch.Tensor:
        weight = self.module.weight
        base = weight - sum(self._merged.values()) if self._merged else weight
        return self.adapters[name].delta(base.detach()).reshape(weight.shape).to(weight.device)

    def _op(self, x: torch.Tensor, delta: torch.Tensor) -> torch.Tensor:
        m = self.module
        if isinstance(m, torch.nn.Conv2d):
            return F.conv2d(x, delta.to(x.dtype), None, m.stride, m.padding, m.dilation, m.groups)
        return F.linear(x, delta.to(x.dtype))

    def _forward_hook(self, module, args, out):
        x = args[0]
        if self.sample_names is not None:  # like peft's adapter_names: the active set does not matter
            return self._per_sample(x, out)
        running = [
            n for n in self.active_adapters if n not in self._merged and self.scaling.get(n, 0.0) != 0.0
        ]
        for name in running:
            out = out + self.scaling[name] * self._op(x, self._delta(name))
        return out

    def _per_sample(self, x: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
        out = out.clone()
        for name in set(self.sample_names) & set(self.adapters):
            rows = torch.tensor([i for i, n in enumerate(self.sample_names) if n == name], device=x.device)
            out[rows] += self.scaling[name] * self._op(x[rows], self._delta(name))
        return out
