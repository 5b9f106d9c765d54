"""ZipLoRA layers: several LoRAs on one Linear/Conv2d, each reading its input through a per-column merger.

    output = base(x) + sum_i B_i (A_i diag(m_i)) x

The paper writes the merged weight as sum_i dW_i diag(m_i) with dW_i = B_i A_i; since
dW_i diag(m_i) = B_i (A_i diag(m_i)), the merger is applied to the small down-projection and the forward
stays low-rank: no dense (out x in) matrix is built per step, unlike implementations that materialise
m_1 * W_1 + m_2 * W_2 every forward. All adapters of a layer run as one down and one up product
(factors concatenated along the rank axis).

peft has no per-column merger (its LoRA layer scales a whole adapter by a float), so this is our own small
layer following peft's layer contract: it owns `base_layer`, per-adapter dicts (lora_A, lora_B, merger),
`update_layer`, `get_delta_weight`, `merge` / `unmerge`, and a forward with peft's cases (disabled, merged,
active adapters summed), plus a per-sample adapter mask so that K single-LoRA passes run as one batch.

    >>> model = ZipLoraModel(pipe, {"s0": factors_a, "s1": factors_b})  # doctest: +SKIP
    >>> with model.installed():  # doctest: +SKIP
    ...     model.set_mode("merged"); eps = pipe.unet(x, t, cond).sample
"""

from __future__ import annotations

import contextlib
import itertools
from collections.abc import Callable, Iterator, Mapping, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from merging.sources import Factors
from studio.core.errors import StudioError
from studio.core.families import COMPONENTS
from studio.core.modules import resolve_module


class ZipLoraLayer(nn.Module):
    """A Linear or Conv2d (groups=1) plus LoRA adapters with per-input-column mergers."""

    def __init__(self, base_layer: nn.Module):
        super().__init__()
        if not isinstance(base_layer, (nn.Linear, nn.Conv2d)) or getattr(base_layer, "groups", 1) != 1:
            raise TypeError(f"ZipLoraLayer wraps nn.Linear or nn.Conv2d (groups=1), got {type(base_layer)}")
        self.base_layer = base_layer
        self.is_conv = isinstance(base_layer, nn.Conv2d)
        self.in_features = base_layer.in_channels if self.is_conv else base_layer.in_features
        self.lora_A = nn.ParameterDict()  # name -> (r, in[, kh, kw]), frozen
        self.lora_B = nn.ParameterDict()  # name -> (out, r), frozen, every scale folded in
        self.merger = nn.ParameterDict()  # name -> (in,), trainable on layers two or more adapters share
        self.slices: dict[str, slice] = {}  # name -> its columns in the concatenated rank axis
        self.disabled = False
        self.merged = False
        self.use_mergers = True
        self.sample_mask: torch.Tensor | None = (
            None  # (batch or 1, total rank): which adapters act per sample
        )
        self._up_cat: torch.Tensor | None = None
        self._down_cat: torch.Tensor | None = None
        self._exact: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}  # name -> float32 (up, flat down)
        self._exact_cat: tuple[torch.Tensor, torch.Tensor] | None = None

    @property
    def adapter_names(self) -> list[str]:
        return list(self.lora_A)

    @property
    def total_rank(self) -> int:
        return sum(s.stop - s.start for s in self.slices.values())

    def update_layer(self, name: str, factors: Factors, trainable: bool) -> None:
        """Add adapter `name` from flattened factors (up (out, r), down (r, in * kh * kw))."""
        weight = self.base_layer.weight
        down = factors.down.to(weight.device, weight.dtype).reshape(factors.rank, *weight.shape[1:])
        up = factors.up.to(weight.device, weight.dtype)
        self.lora_A[name] = nn.Parameter(down, requires_grad=False)
        self.lora_B[name] = nn.Parameter(up, requires_grad=False)
        merger = torch.ones(self.in_features, device=weight.device, dtype=torch.float32)
        self.merger[name] = nn.Parameter(merger, requires_grad=trainable)
        start = self.total_rank
        self.slices[name] = slice(start, start + factors.rank)
        self._up_cat = torch.cat([self.lora_B[n] for n in self.adapter_names], 1)
        self._down_cat = torch.cat([self.lora_A[n] for n in self.adapter_names], 0)
        exact = (factors.up.to(weight.device, torch.float32), factors.down.to(weight.device, torch.float32))
        self._exact[name] = exact
        self._exact_cat = None

    def lora_A_cat(self) -> torch.Tensor:
        """All down-projections, concatenated, flattened: (total rank, in * kh * kw), mergers not applied."""
        return self._down_cat.flatten(1)

    def lora_B_cat(self) -> torch.Tensor:
        """All up-projections (scales folded in), concatenated: (out, total rank)."""
        return self._up_cat

    def exact_cat(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(up, flattened down) of every adapter, concatenated, in float32 as given: the layer's own copies are
        in the base weight's dtype (bf16 with a bf16 model), too coarse for a closed-form solve."""
        if self._exact_cat is None:
            names = self.adapter_names
            self._exact_cat = (
                torch.cat([self._exact[n][0] for n in names], 1),
                torch.cat([self._exact[n][1] for n in names], 0),
            )
        return self._exact_cat

    def _scaled_down(self, name: str) -> torch.Tensor:
        """A_i diag(m_i): the merger scales input columns (input channels of a conv)."""
        down = self.lora_A[name]
        m = self.merger[name].to(down.dtype)
        return down * (m[None, :, None, None] if self.is_conv else m[None, :])

    def down_weight(self) -> torch.Tensor:
        """Concatenated down-projections, with the mergers applied when use_mergers."""
        if not self.use_mergers or len(self.slices) == 1:  # a lone adapter's merger stays at 1
            return self._down_cat
        return torch.cat([self._scaled_down(n) for n in self.adapter_names], 0)

    def get_delta_weight(self, name: str) -> torch.Tensor:
        """B_i A_i diag(m_i), shaped like the base weight."""
        down = self._scaled_down(name)
        delta = self.lora_B[name] @ down.flatten(1)
        return delta.reshape(self.base_layer.weight.shape)

    def merged_factors(self) -> Factors:
        """The merged delta as ordinary LoRA factors: up = [B_i], down = [A_i diag(m_i)] (flattened)."""
        with torch.no_grad():
            down = torch.cat([self._scaled_down(n) for n in self.adapter_names], 0)
            return Factors(self._up_cat.float().clone(), down.flatten(1).float().clone())

    @torch.no_grad()
    def merge(self) -> None:
        if not self.merged:
            for name in self.adapter_names:
                self.base_layer.weight += self.get_delta_weight(name)
            self.merged = True

    @torch.no_grad()
    def unmerge(self) -> None:
        if self.merged:
            for name in self.adapter_names:
                self.base_layer.weight -= self.get_delta_weight(name)
            self.merged = False

    def forward(self, x: torch.Tensor, *args, **kwargs) -> torch.Tensor:
        result = self.base_layer(x, *args, **kwargs)
        if self.disabled or self.merged or not self.slices:
            return result
        down = self.down_weight()
        if self.is_conv:
            conv = self.base_layer
            z = F.conv2d(x, down, None, conv.stride, conv.padding, conv.dilation)
        else:
            z = F.linear(x, down)
        if self.sample_mask is not None:
            z = z * self._broadcast(self.sample_mask.to(z.dtype), z)
        if self.is_conv:
            return result + F.conv2d(z, self._up_cat[:, :, None, None])
        return result + F.linear(z, self._up_cat)

    def input_rows(self, x: torch.Tensor) -> torch.Tensor:
        """The layer input as (batch, rows, in * kh * kw): tokens of a Linear, unfolded patches of a conv."""
        if self.is_conv:
            conv = self.base_layer
            return F.unfold(x, conv.kernel_size, conv.dilation, conv.padding, conv.stride).transpose(1, 2)
        return x.reshape(x.shape[0], -1, x.shape[-1])

    def _broadcast(self, mask: torch.Tensor, z: torch.Tensor) -> torch.Tensor:
        if mask.shape[0] not in (1, z.shape[0]):
            raise ValueError(f"sample mask for {mask.shape[0]} samples, batch has {z.shape[0]}")
        if self.is_conv:  # (B, R, H, W)
            return mask[:, :, None, None]
        return mask.reshape(mask.shape[0], *([1] * (z.dim() - 2)), mask.shape[1])


class ZipLoraModel:
    """Puts ZipLoraLayers into a pipeline's UNet / text encoders and switches what they compute.

    adapters: {name: {canonical path: Factors}}; a module's merger trains only where two or more adapters
    act on it (elsewhere it stays at 1: that LoRA alone). Modes:
    - "merged": every adapter through its merger (the ZipLoRA model);
    - "sum":    every adapter, mergers ignored (the plain sum);
    - "base":   no adapter;
    - "sources": sample b gets adapter sources[b] alone, mergers ignored (each LoRA's own prediction).
    """

    def __init__(self, pipe, adapters: Mapping[str, Mapping[str, Factors]]):
        self.pipe = pipe
        self.names = list(adapters)
        paths: dict[str, None] = {}
        for factors in adapters.values():
            paths.update(dict.fromkeys(factors))
        self.layers: dict[str, ZipLoraLayer] = {}
        for path in paths:
            owners = [n for n in self.names if path in adapters[n]]
            layer = ZipLoraLayer(self._module(path))
            for name in owners:
                layer.update_layer(name, adapters[name][path], trainable=len(owners) > 1)
            self.layers[path] = layer
        self._mask_cache: dict[tuple, dict[str, torch.Tensor]] = {}

    def _module(self, path: str) -> nn.Module:
        module = resolve_module(self.pipe, path)
        if not isinstance(module, (nn.Linear, nn.Conv2d)):
            raise StudioError(
                f"{path} is a {type(module).__name__}, not a plain Linear/Conv2d: ZipLoRA needs the base "
                "model without LoRA adapters loaded (unload them first, or give the model with --model)."
            )
        return module

    def _set_module(self, path: str, module: nn.Module) -> None:
        parent_path, _, child = path.rpartition(".")
        parent = (
            resolve_module(self.pipe, parent_path) if "." in parent_path else getattr(self.pipe, parent_path)
        )
        setattr(parent, child, module)

    @contextlib.contextmanager
    def installed(self) -> Iterator[ZipLoraModel]:
        """Freeze the pipeline, swap the layers in; always put everything back as it was found."""
        flags = []
        for component in COMPONENTS:
            module = getattr(self.pipe, component, None)
            if module is not None:
                for p in module.parameters():
                    flags.append((p, p.requires_grad))
                    p.requires_grad_(False)
        for path, layer in self.layers.items():
            self._set_module(path, layer)
        try:
            yield self
        finally:
            for path, layer in self.layers.items():
                self._set_module(path, layer.base_layer)
            for p, flag in flags:
                p.requires_grad_(flag)

    @contextlib.contextmanager
    def acting_as(self, fused: Mapping[str, Factors]) -> Iterator[None]:
        """Within: each of these layers is its plain base layer with W0 + up @ down for every sample (its
        adapters set aside); afterwards the base weights are restored exactly and the layers put back."""
        saved: dict[str, torch.Tensor] = {}
        try:
            for path, factors in fused.items():
                base = self.layers[path].base_layer
                saved[path] = base.weight.detach().clone()
                with torch.no_grad():
                    delta = (factors.up.float() @ factors.down.float()).to(base.weight)
                    base.weight += delta.reshape(base.weight.shape)
                self._set_module(path, base)
            yield
        finally:
            for path, weight in saved.items():
                layer = self.layers[path]
                with torch.no_grad():
                    layer.base_layer.weight.copy_(weight)
                self._set_module(path, layer)

    # ------------------------------------------------------------------------------------------------
    def shared_layers(self) -> dict[str, ZipLoraLayer]:
        return {p: layer for p, layer in self.layers.items() if len(layer.slices) > 1}

    def parameters(self) -> list[nn.Parameter]:
        """The trainable mergers (nothing else trains)."""
        return [m for layer in self.layers.values() for m in layer.merger.values() if m.requires_grad]

    def set_mode(self, mode: str, sources: Sequence[int] | None = None) -> None:
        if mode not in ("merged", "sum", "base", "sources"):
            raise ValueError(f"unknown mode {mode!r}")
        if mode == "sources" and sources is None:
            raise ValueError("mode 'sources' needs the adapter index of every sample")
        masks = self._masks(tuple(sources)) if mode == "sources" else {}
        for path, layer in self.layers.items():
            layer.disabled = mode == "base"
            layer.use_mergers = mode == "merged"
            layer.sample_mask = masks.get(path)

    def _masks(self, sources: tuple[int, ...]) -> dict[str, torch.Tensor]:
        if sources not in self._mask_cache:
            masks = {}
            for path, layer in self.layers.items():
                mask = torch.zeros(len(sources), layer.total_rank, device=layer.base_layer.weight.device)
                for b, index in enumerate(sources):
                    cols = layer.slices.get(self.names[index])
                    if cols is not None:
                        mask[b, cols] = 1.0
                masks[path] = mask
            self._mask_cache[sources] = masks
        return self._mask_cache[sources]

    def similarity(self) -> torch.Tensor:
        """sum over shared layers and adapter pairs of |m_i . m_j| / width (differentiable).

        The paper's |m_i . m_j| divided by the layer's input width, so that lambda weighs every layer alike
        (it starts at 1 per layer and pair). Pairs of the same width are stacked: a model with hundreds of
        layers costs a few ops.
        """
        by_width: dict[int, list[tuple[nn.Parameter, nn.Parameter]]] = {}
        for layer in self.shared_layers().values():
            for a, b in itertools.combinations(layer.adapter_names, 2):
                by_width.setdefault(layer.in_features, []).append((layer.merger[a], layer.merger[b]))
        terms = []
        for width, pairs in by_width.items():
            first = torch.stack([a for a, _ in pairs])
            second = torch.stack([b for _, b in pairs])
            terms.append((first * second).sum(1).abs().sum() / width)
        return torch.stack(terms).sum() if terms else torch.zeros(())

    def pair_count(self) -> int:
        return sum(len(x.slices) * (len(x.slices) - 1) // 2 for x in self.shared_layers().values())

    @torch.no_grad()
    def mean_similarity(self) -> float:
        """Mean |m_i . m_j| / width over shared layers and pairs: 1 at first, 0 once no column is shared."""
        n = self.pair_count()
        return float(self.similarity()) / n if n else 0.0

    def merged_factors(self) -> dict[str, Factors]:
        return {path: layer.merged_factors() for path, layer in self.layers.items()}

    def mergers(self) -> dict[str, dict[str, torch.Tensor]]:
        """{path: {adapter name: merger}} of the shared layers."""
        return {
            path: {n: m.detach().float().cpu().clone() for n, m in layer.merger.items()}
            for path, layer in self.shared_layers().items()
        }

    def load_mergers(self, mergers: Mapping[str, Mapping[str, torch.Tensor]]) -> None:
        with torch.no_grad():
            for path, per_adapter in mergers.items():
                for name, value in per_adapter.items():
                    self.layers[path].merger[name].copy_(value)

    def reset_mergers(self) -> None:
        with torch.no_grad():
            for layer in self.layers.values():
                for m in layer.merger.values():
                    m.fill_(1.0)

    def record_inputs(
        self, run: Callable[[], object], sources: Sequence[int], max_rows: int, seed: int = 0
    ) -> dict[str, dict[int, torch.Tensor]]:
        """Inputs of every UNet layer while run() executes, split by the source of each sample.

        Returns {path: {source index: (rows, in * kh * kw)}} with at most max_rows random rows each.
        """
        generator = torch.Generator().manual_seed(seed)
        store: dict[str, dict[int, list[torch.Tensor]]] = {}

        def pick(rows: torch.Tensor) -> torch.Tensor:
            if rows.shape[0] <= max_rows:
                return rows
            return rows[torch.randperm(rows.shape[0], generator=generator)[:max_rows].to(rows.device)]

        def hook_for(path: str, layer: ZipLoraLayer):
            def hook(module, args, output):
                rows = layer.input_rows(args[0].detach())
                if rows.shape[0] != len(sources):
                    return
                for b, index in enumerate(sources):
                    store.setdefault(path, {}).setdefault(index, []).append(pick(rows[b]).float())

            return hook

        layers = {p: layer for p, layer in self.layers.items() if p.startswith("unet.")}
        handles = [layer.register_forward_hook(hook_for(p, layer)) for p, layer in layers.items()]
        try:
            with torch.no_grad():
                run()
        finally:
            for handle in handles:
                handle.remove()
        return {
            path: {index: pick(torch.cat(chunks)) for index, chunks in per_source.items()}
            for path, per_source in store.items()
        }
