"""ZipLoRA, fast variant: fit the mergers layer by layer on recorded layer inputs instead of the whole model.

One batched pass of every LoRA on its own references records, for each shared UNet layer, the inputs X_i
the layer sees under LoRA i. Each layer then has a small problem of its own:

    sum_i || M X_i - dW_i X_i ||^2 / || dW_i X_i ||^2  +  lambda * sum_{i<j} |m_i . m_j| / width
    with M = sum_j B_j A_j diag(m_j)

(the base weight cancels: both sides see the same inputs). In the rank space the error is
||B D||^2 = sum(D * (B^T B) D) with D = (A diag(m)) X^T - target, so a step costs O(rank * in * rows) per
layer and needs no pass through the UNet. Layers with the same shapes are stacked and solved as one batched
problem (a model repeats the same transformer block many times), so a step is a handful of batched matrix
products. Adam treats each parameter separately, so solving all layers together equals solving each alone.
Text-encoder mergers keep their value 1 here (their effect only shows through the whole model). The
whole-model error of the result is measured afterwards on the same evaluation batch as the full variant.

    >>> outcome = ziplora_merge(sources, pipe, cfg, fast=True)  # doctest: +SKIP
"""

from __future__ import annotations

import itertools

import torch
import torch.nn.functional as F

from merging.ziplora_data import sample_batch
from merging.ziplora_layer import ZipLoraLayer
from merging.ziplora_optim import optimizer_step


class LayerGroup:
    """Shared layers with identical shapes and adapters, stacked: mergers (L, K, in), factors (L, ...)."""

    def __init__(self, paths: list[str], layers: list[ZipLoraLayer], names: list[str], inputs: list[dict]):
        self.paths, self.layers = paths, layers
        first = layers[0]
        self.adapters = first.adapter_names
        self.kernel = int(first.lora_A_cat().shape[1] // first.in_features)  # kh * kw
        # which adapter each rank row belongs to, to spread the (K, in) mergers over the (R, in) factor
        rows = [
            k
            for k, n in enumerate(self.adapters)
            for _ in range(first.slices[n].stop - first.slices[n].start)
        ]
        self.row_adapter = torch.tensor(rows, device=first.lora_A_cat().device)
        self.down = torch.stack([layer.lora_A_cat().float() for layer in layers])  # (L, R, in * kernel)
        up = torch.stack([layer.lora_B_cat().float() for layer in layers])  # (L, out, R)
        self.gram = up.transpose(1, 2) @ up  # (L, R, R)
        self.mergers = torch.nn.Parameter(
            torch.stack(
                [torch.stack([layer.merger[n].detach().float() for n in self.adapters]) for layer in layers]
            )
        )
        self.terms = [self._term(k, names.index(n), inputs) for k, n in enumerate(self.adapters)]

    def _term(
        self, k: int, source: int, inputs: list[dict]
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Stacked inputs (L, in * kernel, rows), targets (L, R, rows), target energies (L,) of a source."""
        xs = [inp.get(source, self.down.new_zeros(0, self.down.shape[2])) for inp in inputs]
        n = max(x.shape[0] for x in xs)
        x = torch.stack([F.pad(x.to(self.down.device), (0, 0, 0, n - x.shape[0])) for x in xs]).transpose(
            1, 2
        )
        own = (self.row_adapter == k).to(self.down.dtype)[None, :, None]
        target = (self.down * own) @ x  # only source k's rows: its own delta's output in rank space
        energy = (self.gram @ target * target).sum((1, 2))
        return x, target, energy

    def reconstruction(self) -> torch.Tensor:
        scale = self.mergers[:, self.row_adapter]  # (L, R, in)
        if self.kernel > 1:
            scale = scale.repeat_interleave(self.kernel, dim=2)
        down = self.down * scale
        total = self.down.new_zeros(())
        for x, target, energy in self.terms:
            diff = down @ x - target
            err = (self.gram @ diff * diff).sum((1, 2))
            total = total + (err / energy.clamp_min(1e-30) * (energy > 0)).sum()
        return total

    def similarity(self) -> torch.Tensor:
        """Sum over layers and adapter pairs of |m_i . m_j| / width (as ZipLoraModel.similarity)."""
        pairs = itertools.combinations(range(len(self.adapters)), 2)
        width = self.mergers.shape[2]
        return sum((self.mergers[:, i] * self.mergers[:, j]).sum(1).abs().sum() / width for i, j in pairs)

    def store(self) -> None:
        """Write the fitted mergers back into the layers."""
        with torch.no_grad():
            for layer, values in zip(self.layers, self.mergers):
                for name, value in zip(self.adapters, values):
                    layer.merger[name].copy_(value)


def group_layers(model, recorded: dict) -> list[LayerGroup]:
    """Stack the shared UNet layers that have recorded inputs by (adapters, ranks, input width, kernel)."""
    buckets: dict[tuple, list[str]] = {}
    for path, layer in model.shared_layers().items():
        if path not in recorded:
            continue
        ranks = tuple((n, s.stop - s.start) for n, s in layer.slices.items())
        key = (ranks, tuple(layer.lora_A_cat().shape), layer.lora_B_cat().shape[0], layer.in_features)
        buckets.setdefault(key, []).append(path)
    return [
        LayerGroup(paths, [model.layers[p] for p in paths], model.names, [recorded[p] for p in paths])
        for paths in buckets.values()
    ]


def fit_layerwise(setup, cfg, progress=None) -> tuple[list[dict], str]:
    """Record layer inputs, then Adam on all layer problems at once; returns (history, why it stopped)."""
    model = setup.model
    batch = sample_batch(
        setup.scheduler, setup.refs, cfg.eval_samples, torch.Generator().manual_seed(cfg.seed + 104729)
    )
    recorded = model.record_inputs(
        lambda: setup.run("sources", batch), batch.sources, cfg.fast_tokens, cfg.seed
    )
    groups = group_layers(model, recorded)
    if not groups:
        return [], "no shared UNet layer to fit layer by layer (text-encoder mergers stay at 1)"
    pairs = sum(g.mergers.shape[0] * len(g.adapters) * (len(g.adapters) - 1) // 2 for g in groups)
    optimizer = torch.optim.Adam([g.mergers for g in groups], lr=cfg.fast_lr)
    history: list[dict] = []
    stopped = f"{cfg.fast_steps} steps"
    for _ in range(cfg.fast_steps):
        recon = sum(g.reconstruction() for g in groups)
        similarity = sum(g.similarity() for g in groups)
        loss = recon + cfg.similarity_weight * similarity
        stop = optimizer_step(
            optimizer, loss, recon, similarity, pairs, cfg.fast_steps, cfg, history, progress, "--fast-lr"
        )
        if stop:
            stopped = stop
            break
    for group in groups:
        group.store()
    return history, stopped
