"""ZipLoRA (Shah et al. 2023): merge LoRAs by learning one merger per input column of every shared layer.

Objective (base model and LoRAs frozen; only the mergers train):

    sum_i || eps_merged(x_i, p_i) - eps_i(x_i, p_i) ||^2  +  lambda * sum_layers sum_{i<j} |m_i . m_j| / width

x_i: noisy latents of source i's reference images, p_i: its prompt, eps_i: the model with LoRA i alone.
The paper's defaults: lambda 0.01, lr 0.01, up to 100 steps, stop when the mergers no longer overlap.
The similarity is the paper's |m_i . m_j| divided by the layer's width, so that lambda weighs a 320-wide and
a 1280-wide layer alike (at the start it is 1 per layer and pair); it is the quantity the popular
implementation computes as mean(|m_i * m_j|) for non-negative mergers. (A cosine instead, tried as well,
cannot be lowered by fading both LoRAs, but with lambda 0.01 summed over hundreds of layers it outweighs the
reconstruction term and switched off half of all columns at a worse whole-model error.)

One step runs every source's target as one batch (per-sample adapter masks) and the merged model as one
batch, with low-rank merged layers (see ziplora_layer). The result is saved as an ordinary LoRA: per
module up = [B_i], down = [A_i diag(m_i)], alpha = rank, which any tool loads.

    >>> outcome = ziplora_merge(sources, pipe, cfg)  # doctest: +SKIP
    >>> outcome.info["model_error"]  # doctest: +SKIP
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field

import torch

from merging.config import MergeConfig
from merging.output import merger_stats
from merging.sources import Factors, MergeSource
from merging.ziplora_data import (
    Condition,
    NoisyBatch,
    cat_conditions,
    default_size,
    encode_images,
    encode_prompt,
    generate_latents,
    predict,
    reference_captions,
    sample_batch,
    training_scheduler,
)
from merging.ziplora_layer import ZipLoraModel
from merging.ziplora_optim import optimizer_step
from studio.core.errors import StudioError

Progress = Callable[[dict], None]


@dataclass
class ZipSetup:
    """Everything the objective needs, built once: model, references, conditioning, a fixed eval batch."""

    model: ZipLoraModel
    prompts: list[list[str]]  # per source: one prompt, or one per reference image (its caption)
    size: tuple[int, int]
    refs: list[torch.Tensor]
    target_conds: list[Condition]
    eval_batch: NoisyBatch
    fixed_merged_conds: list[Condition] | None = None  # None: text-encoder mergers train, encode every step
    scheduler: object = None

    @property
    def unet(self):
        return self.model.pipe.unet

    def conditions(self, mode: str) -> list[Condition]:
        """One Condition per source (a row per prompt), encoded with the model in `mode` ("sources" = each
        LoRA alone)."""
        if mode == "sources":
            return self.target_conds
        if mode == "merged" and self.fixed_merged_conds is not None:
            return self.fixed_merged_conds
        self.model.set_mode(mode)
        return [encode_prompt(self.model.pipe, p, self.size) for p in self.prompts]

    def run(self, mode: str, batch: NoisyBatch) -> torch.Tensor:
        """The UNet prediction of `batch` with the model in `mode`."""
        conds = self.conditions(mode)
        picks = batch.picks or (0,) * len(batch.sources)
        cond = cat_conditions([conds[i].row(pick) for i, pick in zip(batch.sources, picks)])
        self.model.set_mode(mode, batch.sources if mode == "sources" else None)
        return predict(self.unet, batch, cond)


@dataclass
class ZipOutcome:
    factors: dict[str, Factors]
    mergers: dict[str, dict[str, torch.Tensor]]
    info: dict = field(default_factory=dict)
    recorded: dict[str, dict[int, torch.Tensor]] | None = None
    warnings: list[str] = field(default_factory=list)


def adapter_name(index: int) -> str:
    return f"s{index}"


def ziplora_merge(
    sources: list[MergeSource],
    pipe,
    cfg: MergeConfig,
    *,
    fast: bool = False,
    progress: Progress | None = None,
) -> ZipOutcome:
    """Fit ZipLoRA mergers (whole-model objective, or layer by layer when fast) and return the merge."""
    model = ZipLoraModel(pipe, {adapter_name(i): s.factors() for i, s in enumerate(sources)})
    if not model.shared_layers():
        labels = " and ".join(s.label for s in sources)
        raise StudioError(
            f"nothing in common to merge: {labels} adapt no layer in common, so there are no mergers "
            "to learn. Their plain sum is already exact: use --method concat."
        )
    started = time.perf_counter()
    with model.installed():
        setup = prepare(pipe, model, sources, cfg)
        before = evaluate(setup, "sum")
        fit_started = time.perf_counter()
        if fast or cfg.warm_start:
            from merging.ziplora_fast import fit_layerwise

            history, stopped = fit_layerwise(setup, cfg, progress)
        if not fast:
            history, stopped = fit_whole_model(setup, cfg, progress)
        fit_seconds = time.perf_counter() - fit_started
        after = evaluate(setup, "merged")
        recorded = model.record_inputs(
            lambda: setup.run("sources", setup.eval_batch),
            setup.eval_batch.sources,
            cfg.fast_tokens,
            cfg.seed,
        )
        info = {
            "variant": "fast (layer-wise)"
            if fast
            else "full (whole model)" + (", warm start from layer-wise" if cfg.warm_start else ""),
            "steps_run": len(history),
            "stopped": stopped,
            "seconds": round(time.perf_counter() - started, 2),
            "fit_seconds": round(fit_seconds, 2),
            "shared_layers": len(model.shared_layers()),
            "history": history,
            "model_error": {
                s.label: {"plain_sum": before["relative"][i], "ziplora": after["relative"][i]}
                for i, s in enumerate(sources)
            },
            "objective": {"plain_sum": before["mse"], "ziplora": after["mse"]},
            "mean_similarity": model.mean_similarity(),
        }
        mergers = model.mergers()
        return ZipOutcome(model.merged_factors(), mergers, info, recorded, fit_warnings(info, mergers))


FADED = 0.5  # a mean merger under this for every LoRA, with few columns off, is a fade, not a separation


def fit_warnings(info: dict, mergers: dict[str, dict[str, torch.Tensor]]) -> list[str]:
    """What the user should know about a fit: a LoRA whose effect on its own prompt the merge keeps worse
    than the plain sum does, and mergers that faded every LoRA instead of switching columns off (the
    similarity term |m_i . m_j| also falls when every merger shrinks alike)."""
    warnings = []
    for label, error in info["model_error"].items():
        if error["ziplora"] > 1.1 * error["plain_sum"] + 0.02:
            warnings.append(
                f"ZipLoRA keeps {label}'s effect on its own prompt worse than the plain sum does (whole-model "
                f"error {error['ziplora']:.2f} against {error['plain_sum']:.2f}): compare with --method concat"
            )
    stats = merger_stats(mergers).values()
    means, off = [m["mean"] for m in stats], [m["off"] for m in stats]
    if means and max(means) < FADED and max(off) < 0.05 and info["history"]:
        first = info["history"][0]
        warnings.append(
            f"the mergers faded every LoRA (mean merger {' / '.join(f'{m:.2f}' for m in means)}) instead of "
            f"switching columns off ({' / '.join(f'{o:.0%}' for o in off)} off): the similarity term "
            f"outweighed the reconstruction ({first['loss'] - first['reconstruction']:.3g} against "
            f"{first['reconstruction']:.3g} at the first step); try a smaller --similarity-weight"
        )
    return warnings


def prepare(pipe, model: ZipLoraModel, sources: list[MergeSource], cfg: MergeConfig) -> ZipSetup:
    """Conditioning and reference latents of every source, and a fixed evaluation batch."""
    size = default_size(pipe, cfg.resolution)
    folders = list(cfg.references) or [""] * len(sources)
    prompts = [
        reference_captions(folder, prompt) if folder and cfg.reference_captions else [prompt]
        for prompt, folder in zip(cfg.prompts, folders)
    ]
    with torch.no_grad():
        target_conds = []
        refs = []
        for i, (prompt, folder) in enumerate(zip(cfg.prompts, folders)):
            model.set_mode("sources", [i])
            target_conds.append(encode_prompt(pipe, prompts[i], size))
            if folder:
                refs.append(encode_images(pipe, folder, size))
            else:
                steps, guidance = cfg.reference_steps, cfg.reference_guidance
                refs.append(
                    generate_latents(pipe, prompt, size, cfg.reference_count, steps, guidance, cfg.seed + i)
                )
    scheduler = training_scheduler(pipe)
    eval_batch = sample_batch(
        scheduler, refs, cfg.eval_samples, torch.Generator().manual_seed(cfg.seed + 7919)
    )
    setup = ZipSetup(model, prompts, size, refs, target_conds, eval_batch, scheduler=scheduler)
    text_mergers_train = any(not p.startswith("unet.") for p in model.shared_layers())
    if not text_mergers_train:
        with torch.no_grad():
            setup.fixed_merged_conds = setup.conditions("sum")  # mergers at 1 there: merged == sum
    return setup


def reconstruction(pred: torch.Tensor, target: torch.Tensor, sources: tuple[int, ...]) -> torch.Tensor:
    """sum over sources of the mean squared error on that source's samples."""
    index = torch.tensor(sources, device=pred.device)
    total = pred.new_zeros((), dtype=torch.float32)
    for s in sorted(set(sources)):
        rows = index == s
        total = total + (pred[rows].float() - target[rows].float()).square().mean()
    return total


def fit_whole_model(setup: ZipSetup, cfg: MergeConfig, progress: Progress | None) -> tuple[list[dict], str]:
    """Adam on the mergers against the whole-model objective; returns (history, why it stopped)."""
    model = setup.model
    optimizer = torch.optim.Adam(model.parameters(), lr=cfg.lr)
    generator = torch.Generator().manual_seed(cfg.seed)
    history: list[dict] = []
    for _ in range(cfg.steps):
        batch = sample_batch(setup.scheduler, setup.refs, cfg.batch_size, generator)
        with torch.no_grad():
            target = setup.run("sources", batch)
        pred = setup.run("merged", batch)
        recon = reconstruction(pred, target, batch.sources)
        similarity = model.similarity()
        loss = recon + cfg.similarity_weight * similarity
        stop = optimizer_step(
            optimizer, loss, recon, similarity, model.pair_count(), cfg.steps, cfg, history, progress
        )
        if stop:
            return history, stop
    return history, f"{cfg.steps} steps"


@torch.no_grad()
def evaluate(setup: ZipSetup, mode: str) -> dict:
    """Whole-model error of `mode` on the fixed eval batch, per source.

    relative[i] = ||eps_mode - eps_i|| / ||eps_i - eps_base|| over source i's samples: 0 keeps LoRA i's
    effect exactly, 1 is as far from it as having no LoRA. mse = the objective's reconstruction term.
    """
    batch = setup.eval_batch
    base = setup.run("base", batch)
    target = setup.run("sources", batch)
    pred = setup.run(mode, batch)
    index = torch.tensor(batch.sources, device=pred.device)
    relative = []
    for s in range(len(setup.prompts)):
        rows = index == s
        effect = float((target[rows] - base[rows]).float().norm())
        error = float((pred[rows] - target[rows]).float().norm())
        relative.append(error / effect if effect > 0 else 0.0)
    return {"relative": relative, "mse": float(reconstruction(pred, target, batch.sources))}
