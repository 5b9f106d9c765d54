"""Mix-of-Show gradient fusion (Gu et al., NeurIPS 2023), solved per layer in closed form.

For every UNet layer, with X_i the inputs it sees while concept i runs on its own data (noisy latents of its
reference images - its training images where given, else images it generates - with its prompt, as the
reference implementation records each concept on "photo of a <concept>"; its LoRA acting) and dW_i its
weighted delta (zero where concept i does not adapt the layer):

    W* = argmin_W  sum_i || W X_i - (W0 + dW_i) X_i ||^2      =>     W* - W0 = (sum_i dW_i G_i) G^-1

with G_i = X_i X_i^T / rows (each concept weighs alike) and G = sum_i G_i + ridge. The paper runs LBFGS for
minutes to tens of minutes; the normal equations of one layer are (in x in), so a solve per layer is enough.
dW_i = B_i A_i makes the answer low-rank exactly: up = [B_1 ... B_K], down = [A_i G_i G^-1]_i, rank sum r_i,
so the file is an ordinary LoRA; `rank` re-factorises it smaller by SVD (the loss reported). The inputs are
recorded with the machinery of ZipLoRA's layer-wise fit (merging.ziplora_layer), and the merge report
measures each concept's preservation on them.

Order (fusion_order): "joint" records every UNet layer at once, each concept with its own LoRA everywhere,
and sums the text encoders' deltas; "text-first" follows the reference implementation: the text encoders'
layers are fused on each concept's prompts, then the cross-attention's keys and values, whose only input is
the prompt, on the embeddings of the fused encoders (every token, or with fusion_text_rows "trigger" only
each concept's own words and the end token, the reference's concept-token features), and the other layers
are then recorded with those fused, as the merged model will feed them.

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
from merging.ziplora_data import encode_prompt, noisy_samples
from merging.ziplora_layer import ZipLoraLayer, ZipLoraModel
from studio.core.errors import ConfigError

Progress = Callable[[dict], None]


@dataclass
class FusionOutcome:
    factors: dict[str, Factors]
    info: dict = field(default_factory=dict)
    recorded: dict[str, dict[int, torch.Tensor]] | None = None


def reads_prompt(path: str) -> bool:
    """The cross-attention's keys and values: their inputs are the prompt's embeddings, not the latents."""
    return path.startswith("unet.") and (".attn2.to_k" in path or ".attn2.to_v" in path)


def forward_part(path: str) -> tuple[int, int]:
    """Where a UNet layer runs in the forward pass, by block: embeddings and conv_in, each down block, the
    middle block, each up block, the output layers."""
    parts = path.split(".")
    block = {"down_blocks": 1, "mid_block": 2, "up_blocks": 3, "conv_norm_out": 4, "conv_out": 4}.get(
        parts[1], 0
    )
    return block, int(parts[2]) if block in (1, 3) else 0


def fusion_merge(
    sources: list[MergeSource], pipe, cfg: MergeConfig, progress: Progress | None = None
) -> FusionOutcome:
    """Gather every concept's layer inputs and solve each layer's fusion.

    With fusion_order "text-first" (the reference implementation's order) the text encoders and the layers
    that read the prompt are fused first; the other layers' inputs are then recorded with those fused, as the merged model will
    feed them, instead of with each concept's own keys and values. "sequential" goes on block by block in
    forward order, each block recorded with every block before it fused (one recording per block)."""
    started = time.perf_counter()
    model = ZipLoraModel(pipe, {adapter_name(i): s.factors() for i, s in enumerate(sources)})
    solved: dict[str, Factors] = {}
    recorded: dict[str, dict[int, torch.Tensor]] = {}
    with model.installed(), contextlib.ExitStack() as fused_so_far:
        setup = prepare(pipe, model, sources, cfg)
        stages: list = [None]  # one recording of every layer
        if cfg.fusion_order != "joint":
            solved, recorded = fuse_prompt_side(model, setup, cfg, fused_so_far, progress)
            stages = [lambda path: not reads_prompt(path)]
        if cfg.fusion_order == "sequential":
            parts = sorted(
                {forward_part(p) for p in model.layers if p.startswith("unet.") and not reads_prompt(p)}
            )
            stages = [
                lambda path, part=part: not reads_prompt(path) and forward_part(path) == part
                for part in parts
            ]
        for n, select in enumerate(stages):
            gathered = record_inputs(model, setup, cfg, select, progress)
            if progress:
                progress({"stage": f"solving {len(gathered.cross)} layers (part {n + 1} of {len(stages)})"})
            fused = {
                path: solve_layer(
                    model.layers[path],
                    *gathered.system(path, cfg.fusion_balance),
                    cfg.fusion_ridge,
                    cfg.fusion_anchor,
                )  # fmt: skip
                for path in gathered.cross
            }
            solved |= fused
            recorded |= gathered.subsample()
            if n + 1 < len(stages):
                fused_so_far.enter_context(model.acting_as(fused))  # later parts are recorded with it fused
    factors, svd_info = fused_factors(model, solved, cfg)
    info = {
        "layers_fused": len(solved),
        "layers_summed": len(model.layers) - len(solved),
        "ridge": cfg.fusion_ridge,
        "anchor": cfg.fusion_anchor,
        "order": cfg.fusion_order,
        "text_rows": cfg.fusion_text_rows,
        "balance": cfg.fusion_balance,
        "text_encoders": "sum" if cfg.fusion_order == "joint" else cfg.fusion_text_encoders,
        "samples_per_concept": cfg.fusion_samples,
        "model_dtype": str(pipe.unet.dtype).removeprefix("torch."),
        "seconds": round(time.perf_counter() - started, 2),
    } | svd_info
    return FusionOutcome(factors, info, recorded)


def fused_factors(model: ZipLoraModel, solved: dict[str, Factors], cfg: MergeConfig) -> tuple[dict, dict]:
    """Every layer's result (unrecorded layers: the plain sum), cut to `cfg.rank` by SVD where asked, and
    {"svd_error": ...} when something was cut."""
    factors, errors = {}, {}
    for path, layer in model.layers.items():
        fused = solved.get(path) or layer.merged_factors()
        if cfg.rank and fused.rank > cfg.rank:
            fused, errors[path] = truncate_factors(fused, cfg.rank)
        factors[path] = fused
    if not errors:
        return factors, {}
    worst = max(errors, key=errors.get)
    mean = sum(errors.values()) / len(errors)
    return factors, {"svd_error": {"mean": mean, "max": errors[worst], "worst_module": worst}}


def record_inputs(
    model: ZipLoraModel, setup, cfg: MergeConfig, select, progress: Progress | None
) -> Gathered:
    """Run every concept on its own samples with hooks on the UNet layers `select` keeps (None: all)."""
    generator = torch.Generator().manual_seed(cfg.seed + 104729)
    sources = tuple(range(len(setup.refs)))
    gathered = Gathered(model, sources, cfg.fast_tokens, cfg.seed, cfg.fusion_samples)
    gathered.per_concept = cfg.fusion_balance != "rows"
    with gathered.hooked(select), torch.no_grad():
        for k in range(cfg.fusion_samples):  # one sample per concept a pass, its references in turn
            picks = [[k % ref.shape[0]] for ref in setup.refs]
            setup.run("sources", noisy_samples(setup.scheduler, setup.refs, picks, generator))
            if progress and (k + 1) % 8 == 0:
                progress({"stage": f"recording inputs: sample {k + 1} of {cfg.fusion_samples}"})
    return gathered


def fuse_prompt_side(model: ZipLoraModel, setup, cfg: MergeConfig, acting: contextlib.ExitStack, progress):
    """The text encoders fused on each concept's prompts, the prompts encoded again with them fused (as the
    merged model will encode them), then the cross-attention's keys and values fused on those embeddings;
    both left acting in `acting` for the recording of the rest."""
    solved, recorded = fuse_text_layers(model, setup, cfg) if cfg.fusion_text_encoders == "fuse" else ({}, {})
    if solved:
        acting.enter_context(model.acting_as(dict(solved)))
        with torch.no_grad():
            setup.target_conds = [encode_prompt(model.pipe, p, setup.size) for p in setup.prompts]
        if progress:
            progress({"stage": f"fused {len(solved)} text-encoder layers on the prompts"})
    kv_solved, kv_recorded = fuse_prompt_layers(model, setup, cfg)
    acting.enter_context(model.acting_as(dict(kv_solved)))  # the rest is recorded with them fused
    if progress:
        progress({"stage": f"fused {len(kv_solved)} cross-attention key/value layers on the prompts"})
    return solved | kv_solved, recorded | kv_recorded


def fuse_text_layers(model: ZipLoraModel, setup, cfg: MergeConfig):
    """Mix-of-Show fuses the text encoders first: each text-encoder layer solved on the inputs it sees while
    concept i's prompts are encoded with concept i's LoRA (each concept's rows weighing alike), so a concept
    whose LoRA does not touch the encoder keeps its prompt's embeddings unchanged. Returns ({path: fused
    factors}, {path: {concept: rows}})."""
    paths = [p for p in model.layers if not p.startswith("unet.")]
    grams: dict[str, list] = {p: [0] * len(setup.prompts) for p in paths}
    rows_of: dict[str, dict[int, torch.Tensor]] = {p: {} for p in paths}
    concept = [0]

    def hook_for(path: str):
        def hook(module, args, output):
            x = args[0].detach().float().reshape(-1, args[0].shape[-1])
            grams[path][concept[0]] = grams[path][concept[0]] + x.T @ x / x.shape[0]
            rows_of[path][concept[0]] = x[: cfg.fast_tokens]

        return hook

    handles = [model.layers[p].register_forward_hook(hook_for(p)) for p in paths]
    try:
        with torch.no_grad():
            for i, prompts in enumerate(setup.prompts):
                concept[0] = i
                model.set_mode("sources", [i])
                encode_prompt(model.pipe, prompts, setup.size)
    finally:
        for handle in handles:
            handle.remove()
    fused = {path: solve_on_grams(model.layers[path], model.names, grams[path], cfg) for path in paths}
    return fused, rows_of


def fuse_prompt_layers(model: ZipLoraModel, setup, cfg: MergeConfig):
    """The cross-attention's keys and values solved on the prompt embeddings alone (their only input): no
    UNet pass is needed. Returns ({path: fused factors}, {path: {concept: rows}} for the report)."""
    rows = prompt_rows(model.pipe, setup, cfg.fusion_text_rows)
    grams = [x.T @ x / x.shape[0] for x in rows]  # each concept weighs alike, whatever its row count
    fused, recorded = {}, {}
    for path, layer in model.layers.items():
        if not reads_prompt(path):
            continue
        fused[path] = solve_on_grams(layer, model.names, grams, cfg)
        recorded[path] = {i: x[: cfg.fast_tokens] for i, x in enumerate(rows)}
    return fused, recorded


def prompt_rows(pipe, setup, which: str) -> list[torch.Tensor]:
    """Per concept, the prompt-embedding rows its keys and values are kept on: every token of each of its
    prompts ("all"), or its trigger tokens - those of its prompt no other concept's prompt has - and the end
    token ("trigger": the reference implementation fits its concept tokens only)."""
    embeds = [c.embeds.detach().float() for c in setup.target_conds]  # per concept (prompts, tokens, dim)
    if which == "all":
        return [e.reshape(-1, e.shape[-1]) for e in embeds]
    tokenizer = pipe.tokenizer
    ids = [
        [
            tokenizer(
                pipe.maybe_convert_prompt(p, tokenizer),  # a bundled word of n vectors is n tokens
                padding="max_length",
                max_length=e.shape[1],
                truncation=True,
            ).input_ids  # fmt: skip
            for p in prompts
        ]
        for prompts, e in zip(setup.prompts, embeds)
    ]
    words = [{t for row in rows for t in row} for rows in ids]
    special = {tokenizer.bos_token_id, tokenizer.eos_token_id, tokenizer.pad_token_id}
    picked = []
    for i, (rows, e) in enumerate(zip(ids, embeds)):
        others = set().union(*(w for j, w in enumerate(words) if j != i))
        own = []
        for r, row in enumerate(rows):
            trigger = [p for p, t in enumerate(row) if t not in others and t not in special]
            if not trigger:
                raise ConfigError(
                    f"fusion_text_rows trigger: source {i + 1}'s prompt {setup.prompts[i][r]!r} has no word the "
                    "other sources' prompts lack; give each source its own trigger word, or fusion_text_rows all"
                )
            own.append(e[min(r, e.shape[0] - 1), trigger + [row.index(tokenizer.eos_token_id)]])
        picked.append(torch.cat(own))
    return picked


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
        self.per_concept = False  # also keep each concept's own G (fusion_balance "output")
        self.concept_grams: dict[str, list] = {}
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
        if self.per_concept:  # added in place: one buffer per concept, not a new one every sample
            kept = self.concept_grams.setdefault(path, [torch.zeros_like(g) for g in grams])
            for total, g in zip(kept, grams):
                total += g
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
                    self.cross[path][cols] += layer.exact_cat()[1][cols] @ grams[b]
                keep = torch.randperm(rows.shape[1], generator=self.generator)[: self.rows_per_pass]
                self.rows.setdefault(path, {}).setdefault(source, []).append(rows[b][keep.to(rows.device)])

        return hook

    def gram_of(self, path: str) -> torch.Tensor:
        return self.gram[self.owner[path]]

    def system(self, path: str, balance: str) -> tuple[torch.Tensor, torch.Tensor]:
        """The layer's (G, cross) to solve, the concepts weighed as `balance` says."""
        if balance == "rows":
            return self.gram_of(path), self.cross[path]
        grams = self.concept_grams[self.owner[path]]
        return weighed(self.model.layers[path], self.model.names, grams, self.cross[path], balance)

    @contextlib.contextmanager
    def hooked(self, select: Callable[[str], bool] | None = None):
        layers = {
            p: layer
            for p, layer in self.model.layers.items()
            if p.startswith("unet.") and (select is None or select(p))
        }
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


def solve_on_grams(layer: ZipLoraLayer, names, grams: list, cfg: MergeConfig) -> Factors:
    """One layer's fusion from each concept's input Gram matrix G_i (a layer several concepts share):
    cross_i = A_i G_i for the concepts that adapt it, weighed and solved as the options say."""
    down = layer.exact_cat()[1]
    cross = torch.zeros(layer.total_rank, down.shape[1], device=down.device)
    for i, g in enumerate(grams):
        cols = layer.slices.get(names[i])
        if cols is not None:
            cross[cols] += down[cols] @ g
    gram, cross = weighed(layer, names, grams, cross, cfg.fusion_balance)
    return solve_layer(layer, gram, cross, cfg.fusion_ridge, cfg.fusion_anchor)


def weighed(layer: ZipLoraLayer, names, grams, cross: torch.Tensor, balance: str):
    """G = sum_i c_i G_i and cross_i scaled by c_i. "output": c_i = 1 / ||dW_i X_i||^2 (normalised to a mean
    of 1 over the concepts the layer adapts; the others keep 1), so each concept's error counts relative to its
    own delta's effect rather than in absolute terms, where a stronger LoRA outweighs a weaker one. Each
    concept's G is kept for this (K times the Gram memory of "rows")."""
    if balance == "rows":
        return sum(grams), cross
    up, down = layer.exact_cat()
    energy = {}
    for i, g in enumerate(grams):
        cols = layer.slices.get(names[i])
        if cols is not None:  # ||B A X||^2 = sum((B^T B) * (A G A^T))
            energy[i] = float(((up[:, cols].T @ up[:, cols]) * (down[cols] @ g @ down[cols].T)).sum())
    scale = [1.0] * len(grams)
    live = {i: e for i, e in energy.items() if e > 0}
    if live:
        mean_inverse = sum(1 / e for e in live.values()) / len(live)
        for i, e in live.items():
            scale[i] = 1 / e / mean_inverse
    cross = cross.clone()
    for i, c in enumerate(scale):
        cols = layer.slices.get(names[i])
        if cols is not None:
            cross[cols] *= c
    return sum(c * g for c, g in zip(scale, grams)), cross


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
        cross = cross + r * layer.exact_cat()[1].double()
    down = torch.linalg.solve(gram + r * eye, cross.T).T  # G symmetric
    return Factors(layer.exact_cat()[0].clone(), down.float())
