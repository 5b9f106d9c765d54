"""Mix-of-Show gradient fusion (Gu et al., NeurIPS 2023), solved per layer in closed form.

For every UNet layer, with X_i the inputs it sees while concept i runs on its own data (noisy latents of its
reference images - its training images where given, else images it generates - with its prompt, as the
reference implementation records each concept on "photo of a <concept>"; its LoRA acting) and dW_i its
weighted delta (zero where concept i does not adapt the layer):

    W* = argmin_W  sum_i || W X_i - (W0 + dW_i) X_i ||^2      =>     W* - W0 = (sum_i dW_i G_i) G^-1

with G_i = X_i X_i^T / rows (each concept weighs alike) and G = sum_i G_i + ridge. The paper runs LBFGS for
minutes to tens of minutes; the normal equations of one layer are (in x in), so a solve per layer is enough.
dW_i = B_i A_i makes the answer low-rank exactly: up = [B_1 ... B_K], down = [A_i G_i G^-1]_i, rank sum r_i,
so the file is an ordinary LoRA; `rank` re-factorises it smaller by SVD (the loss reported). Text-encoder
layers are not recorded: their deltas are summed. The inputs are recorded with the machinery of ZipLoRA's
layer-wise fit (merging.ziplora_layer), and the merge report measures each concept's preservation on them.

    >>> outcome = fusion_merge(sources, pipe, cfg)  # doctest: +SKIP
"""

from __future__ import annotations

import contextlib
import time
import weakref
from collections.abc import Callable
from dataclasses import dataclass, field

import torch

from merging.config import MergeConfig
from merging.linear import truncate_factors
from merging.sources import Factors, MergeSource
from merging.ziplora import adapter_name, prepare
from merging.ziplora_data import noisy_samples
from merging.ziplora_layer import ZipLoraLayer, ZipLoraModel

Progress = Callable[[dict], None]


@dataclass
class FusionOutcome:
    factors: dict[str, Factors]
    info: dict = field(default_factory=dict)
    recorded: dict[str, dict[int, torch.Tensor]] | None = None


def fusion_merge(
    sources: list[MergeSource], pipe, cfg: MergeConfig, progress: Progress | None = None
) -> FusionOutcome:
    """Gather every concept's layer inputs, solve each UNet layer's fusion, keep the text encoders' sum."""
    started = time.perf_counter()
    model = ZipLoraModel(pipe, {adapter_name(i): s.factors() for i, s in enumerate(sources)})
    with model.installed():
        setup = prepare(pipe, model, sources, cfg)
        generator = torch.Generator().manual_seed(cfg.seed + 104729)
        gathered = Gathered(model, tuple(range(len(sources))), cfg.fast_tokens, cfg.seed, cfg.fusion_samples)
        with gathered.hooked(), torch.no_grad():
            for k in range(cfg.fusion_samples):  # one sample per concept a pass, its references in turn
                picks = [[k % ref.shape[0]] for ref in setup.refs]
                setup.run("sources", noisy_samples(setup.scheduler, setup.refs, picks, generator))
                if progress and (k + 1) % 8 == 0:
                    progress({"stage": f"recording inputs: sample {k + 1} of {cfg.fusion_samples}"})
    if progress:
        progress({"stage": f"solving {len(gathered.cross)} layers"})
    factors, errors = {}, {}
    for path, layer in model.layers.items():
        if path in gathered.cross:
            fused = solve_layer(layer, gathered.gram_of(path), gathered.cross.pop(path), cfg.fusion_ridge,
                                cfg.fusion_anchor)  # fmt: skip
        else:
            fused = layer.merged_factors()  # mergers at 1: the plain sum
        if cfg.rank and fused.rank > cfg.rank:
            fused, errors[path] = truncate_factors(fused, cfg.rank)
        factors[path] = fused
    info = {
        "layers_fused": len(gathered.rows),
        "layers_summed": len(model.layers) - len(gathered.rows),
        "ridge": cfg.fusion_ridge,
        "anchor": cfg.fusion_anchor,
        "samples_per_concept": cfg.fusion_samples,
        "seconds": round(time.perf_counter() - started, 2),
    }
    if errors:
        worst = max(errors, key=errors.get)
        info["svd_error"] = {
            "mean": sum(errors.values()) / len(errors),
            "max": errors[worst],
            "worst_module": worst,
        }
    return FusionOutcome(factors, info, gathered.subsample())


class Gathered:
    """Forward hooks on the UNet's layers that add up, over every token of every sample, the inputs' Gram
    matrix G = sum X^T X and, in rank space, sum A_i X^T X over the rows of the sample's own concept i, and
    keep a few rows per concept for the report. Every concept has the same number of samples of the same
    size, so each weighs alike. Layers fed the same tensor (an attention's to_q, to_k and to_v; every
    cross-attention's to_k and to_v, which all read the text embeddings) share one G. Memory: (in x in)
    float32 per distinct input + (rank x in) per layer, whatever the number of concepts."""

    def __init__(
        self, model: ZipLoraModel, sources: list[int], report_rows: int, seed: int, passes: int = 1
    ) -> None:
        self.model, self.sources = model, list(sources)
        self.report_rows, self.generator = report_rows, torch.Generator().manual_seed(seed)
        self.rows_per_pass = -(-report_rows // passes)  # the report's rows come from every pass alike
        self.gram: dict[str, torch.Tensor] = {}
        self.owner: dict[str, str] = {}  # path -> the path whose G it shares (itself when not shared)
        self.cross: dict[str, torch.Tensor] = {}
        self.rows: dict[str, dict[int, list[torch.Tensor]]] = {}
        self._seen: dict[int, tuple] = {}  # id(input) -> (weak reference, owner path, per-sample grams)

    def _grams(self, path: str, layer: ZipLoraLayer, x_in: torch.Tensor, rows: torch.Tensor) -> list:
        """Each sample's X^T X, computed once per input tensor, and added to the owner's G."""
        seen = self._seen.get(id(x_in))
        if seen is not None and seen[0]() is x_in and not layer.is_conv:
            owner, grams = seen[1], seen[2]
            if self.owner.setdefault(path, owner) == owner:
                return grams
        if self.owner.setdefault(path, path) != path:  # shared G so far: its inputs cannot part now
            raise RuntimeError(f"fusion: the inputs of {path} changed from one forward pass to the next")
        grams = [rows[b].T @ rows[b] for b in range(rows.shape[0])]
        self.gram[path] = self.gram.get(path, 0) + sum(grams)
        self._seen = {k: v for k, v in self._seen.items() if v[0]() is not None}
        if not layer.is_conv and id(x_in) not in self._seen:
            self._seen[id(x_in)] = (weakref.ref(x_in), path, grams)
        return grams

    def hook_for(self, path: str, layer: ZipLoraLayer):
        def hook(module, args, output):
            rows = layer.input_rows(args[0].detach()).float()
            if rows.shape[0] != len(self.sources):
                return
            grams = self._grams(path, layer, args[0], rows)
            if path not in self.cross:
                self.cross[path] = torch.zeros(layer.total_rank, rows.shape[2], device=rows.device)
            for b, source in enumerate(self.sources):
                cols = layer.slices.get(self.model.names[source])
                if cols is not None:  # in rank space: N = up @ cross, cross[cols] = sum A_i X^T X
                    self.cross[path][cols] += layer.lora_A_cat().detach()[cols].float() @ grams[b]
                keep = torch.randperm(rows.shape[1], generator=self.generator)[: self.rows_per_pass]
                self.rows.setdefault(path, {}).setdefault(source, []).append(rows[b][keep.to(rows.device)])

        return hook

    def gram_of(self, path: str) -> torch.Tensor:
        return self.gram[self.owner[path]]

    @contextlib.contextmanager
    def hooked(self):
        layers = {p: layer for p, layer in self.model.layers.items() if p.startswith("unet.")}
        handles = [layer.register_forward_hook(self.hook_for(p, layer)) for p, layer in layers.items()]
        try:
            yield self
        finally:
            for handle in handles:
                handle.remove()

    def subsample(self) -> dict[str, dict[int, torch.Tensor]]:
        """{path: {concept: (rows, in)}}: the recorded inputs the merge report measures preservation on."""
        return {
            p: {i: torch.cat(chunks)[: self.report_rows] for i, chunks in per.items()}
            for p, per in self.rows.items()
        }


def solve_layer(
    layer: ZipLoraLayer, gram: torch.Tensor, cross: torch.Tensor, ridge: float, anchor: str = "base"
) -> Factors:
    """W* - W0 = (sum_i B_i A_i G_i) (G + r)^-1 as factors: up = [B_i], down = cross (G + r)^-1, in float64
    (inputs after a LayerNorm miss a direction, so G is nearly singular), r = ridge x G's mean diagonal.
    Where two concepts' inputs are nearly parallel but their targets differ, the least-squares answer grows
    along their small difference; the ridge bounds it, pulling W* toward W0 (anchor "base") or toward the
    exact sum W0 + sum_i B_i A_i (anchor "sum": the term r ||W - W_sum||^2, so cross_i gains r A_i)."""
    gram, cross = gram.double(), cross.double()
    eye = torch.eye(gram.shape[0], dtype=gram.dtype, device=gram.device)
    r = ridge * float(gram.diagonal().mean())
    if anchor == "sum":
        cross = cross + r * layer.lora_A_cat().detach().double()
    down = torch.linalg.solve(gram + r * eye, cross.T).T  # G symmetric
    return Factors(layer.lora_B_cat().detach().float(), down.float())
