"""ZipLoRA against the reference implementation's algorithm (part "ziplora" of bench/bench_merge.py).

On the tiny SDXL pipeline (tests.fixtures.tiny), two random LoRAs on every attention projection
(to_q/k/v/out.0, what the reference handles), one reference image each. Compared at the same steps, resolution
and data:
- ours: merging.ziplora (low-rank merged layers, all sources batched in one UNet call per pass);
- the reference algorithm (mkshing/ziplora-pytorch, re-implemented here from its description): dense
  per-layer W_1, W_2 with the merged weight m_1 * W_1 + m_2 * W_2 formed on every forward, four separate
  UNet calls per step (merged and target, per source), the VAE encoding both images every step, AdamW with
  weight decay 1e-4, gradient clipping at 1, similarity = sum over layers of mean |m_1 * m_2|; run at its own
  learning rate (5e-5) and at ours (0.01).
Every run is scored by the same whole-model objective (sum over sources of the noise-prediction MSE against
that LoRA alone) on one fixed evaluation batch, every `--eval-every` steps with the clock stopped.
"""

from __future__ import annotations

import time
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn


class DenseZipLayer(nn.Module):
    """The reference algorithm's layer: dense W_1, W_2, per-column mergers; merged weight made per forward."""

    def __init__(self, base: nn.Linear, w1: torch.Tensor, w2: torch.Tensor):
        super().__init__()
        self.base = base
        self.register_buffer("w1", w1)
        self.register_buffer("w2", w2)
        self.m1 = nn.Parameter(torch.ones(w1.shape[1]))
        self.m2 = nn.Parameter(torch.ones(w1.shape[1]))
        self.mode = "merge"

    def forward(self, x):
        if self.mode == "merge":
            weight = self.m1 * self.w1 + self.m2 * self.w2
        else:
            weight = self.w1 if self.mode == "weight_1" else self.w2
        return self.base(x) + F.linear(x, weight)


def swap(pipe, layers: dict[str, nn.Module]) -> dict[str, nn.Module]:
    """Put `layers` into the pipeline at their paths; returns the modules they replaced."""
    old = {}
    for path, layer in layers.items():
        component, _, name = path.partition(".")
        parent, _, child = name.rpartition(".")
        owner = getattr(pipe, component).get_submodule(parent)
        old[path] = getattr(owner, child)
        setattr(owner, child, layer)
    return old


def reference_fit(pipe, sources, pixels, conds, steps, lr, lam, seed, checkpoint) -> float:
    """The reference's training loop on `sources` (two MergeSources); returns seconds spent training."""
    from merging.ziplora_data import training_scheduler

    f1, f2 = sources[0].factors(), sources[1].factors()
    layers = {}
    for p in f1:
        base = pipe.unet.get_submodule(p.partition(".")[2])
        layers[p] = DenseZipLayer(base, f1[p].delta(), f2[p].delta())
    params = [q for layer in layers.values() for q in (layer.m1, layer.m2)]
    optimizer = torch.optim.AdamW(params, lr=lr, weight_decay=1e-4)
    scheduler = training_scheduler(pipe)
    generator = torch.Generator().manual_seed(seed)
    unet, vae = pipe.unet, pipe.vae
    seconds = 0.0
    for step in range(steps):
        old = swap(pipe, layers)
        start = time.perf_counter()
        latents = [vae.encode(px).latent_dist.sample(generator) * vae.config.scaling_factor for px in pixels]
        noise = torch.randn(latents[0].shape, generator=generator)
        t = torch.randint(0, scheduler.config.num_train_timesteps, (1,), generator=generator)
        noisy = [scheduler.add_noise(x, noise, t) for x in latents]

        def run(i, mode, noisy=noisy, t=t):
            for layer in layers.values():
                layer.mode = mode
            kwargs = {"added_cond_kwargs": conds[i].added} if conds[i].added else {}
            return unet(noisy[i], t, encoder_hidden_states=conds[i].embeds, **kwargs).sample

        pred_c, pred_s = run(0, "merge"), run(1, "merge")
        with torch.no_grad():
            target_c, target_s = run(0, "weight_1"), run(1, "weight_2")
        similarity = sum((layer.m1 * layer.m2).abs().mean() for layer in layers.values())
        loss = F.mse_loss(pred_c, target_c) + F.mse_loss(pred_s, target_s) + lam * similarity
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        optimizer.step()
        optimizer.zero_grad()
        seconds += time.perf_counter() - start
        swap(pipe, old)
        mergers = {p: {"s0": layer.m1.detach(), "s1": layer.m2.detach()} for p, layer in layers.items()}
        checkpoint(step + 1, seconds, mergers)
        if float(similarity.detach()) == 0.0:
            break
    return seconds


def zip_pipe(size: str):
    """The tiny SDXL pipeline, or ("small") the same with 4x wider UNet blocks, run at 128 px."""
    from diffusers import UNet2DConditionModel

    from tests.fixtures.tiny import TINY_SDXL_UNET, tiny_sdxl_pipeline

    pipe = tiny_sdxl_pipeline(seed=0)
    if size == "small":
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(0)
            wide = {"block_out_channels": (128, 256, 256), "attention_head_dim": (2, 4, 8), "sample_size": 16}
            pipe.unet = UNet2DConditionModel(**{**TINY_SDXL_UNET, **wide})
    return pipe, (64 if size == "tiny" else 128)


def zip_setup(work: Path, steps: int, size: str = "tiny", seed: int = 0):
    """Two LoRAs on every attention projection of an SDXL-shaped model; one generated reference image each."""
    from merging import MergeConfig
    from merging.sources import load_sources
    from merging.ziplora_layer import ZipLoraModel
    from studio.core.lora_files import write_lora
    from studio.core.lora_ref import parse_lora_ref
    from studio.core.modules import model_module_shapes
    from studio.core.options import build_config
    from tests.fixtures.lora_random import random_lora

    pipe, side = zip_pipe(size)
    for part in (pipe.unet, pipe.vae, pipe.text_encoder, pipe.text_encoder_2):
        part.requires_grad_(False)  # frozen, as in both implementations: only the mergers train
    attn = [
        p
        for p in model_module_shapes(pipe)
        if ".attn" in p and p.endswith(("to_q", "to_k", "to_v", "to_out.0"))
    ]
    paths = [
        write_lora(
            random_lora(pipe, "sdxl", rank=4, seed=s, scale=0.12, targets=attn), work / f"zip{s}.safetensors"
        )
        for s in (1, 2)
    ]
    sources, _ = load_sources([parse_lora_ref(str(p)) for p in paths])
    prompts = ["a photo of sks dog", "a painting in zwx style"]
    folders = []
    model = ZipLoraModel(pipe, {f"s{i}": s.factors() for i, s in enumerate(sources)})
    with model.installed(), torch.no_grad():
        for i, prompt in enumerate(prompts):
            model.set_mode("sources", [i])
            image = pipe(
                prompt,
                num_inference_steps=10,
                height=64,
                width=64,
                generator=torch.Generator().manual_seed(i),
            ).images[0]
            folder = work / f"refs{i}"
            folder.mkdir(exist_ok=True)
            image.save(folder / "0.png")
            folders.append(str(folder))
    cfg = build_config(
        MergeConfig, sources=[str(p) for p in paths], method="ziplora", model="tiny", prompts=prompts,
        references=folders, steps=steps, seed=seed, eval_samples=4, resolution=side,
    )  # fmt: skip
    return pipe, sources, cfg


def part_ziplora(work: Path, steps: int, eval_every: int, size: str) -> dict:
    from merging.ziplora import evaluate, fit_whole_model, prepare
    from merging.ziplora_fast import fit_layerwise
    from merging.ziplora_layer import ZipLoraModel
    from studio.core.images import image_files

    pipe, sources, cfg = zip_setup(work, steps, size)
    model = ZipLoraModel(pipe, {f"s{i}": s.factors() for i, s in enumerate(sources)})
    with model.installed():
        setup = prepare(pipe, model, sources, cfg)
        plain = evaluate(setup, "sum")["mse"]
    runs = {}

    def curve(name):
        points = runs.setdefault(name, {"points": []})["points"]
        return points

    def ours(name, warm=False, fast=False):
        model.reset_mergers()
        points, clock = curve(name), {"eval": 0.0, "start": time.perf_counter()}

        def progress(event):
            if _checkpoint(event["step"], eval_every, event["steps"]):
                t0 = time.perf_counter()
                points.append(
                    (event["step"], t0 - clock["start"] - clock["eval"], evaluate(setup, "merged")["mse"])
                )
                clock["eval"] += time.perf_counter() - t0

        with model.installed():
            if warm or fast:
                fit_layerwise(setup, cfg, None)  # its mergers reach the layers at the end: one point
                points.append(
                    (
                        "layer-wise",
                        time.perf_counter() - clock["start"] - clock["eval"],
                        evaluate(setup, "merged")["mse"],
                    )
                )
            if not fast:
                fit_whole_model(setup, cfg, progress)

    ours("ours (lr 0.01)")
    ours("ours, warm start", warm=True)
    ours("ours fast (layer-wise)", fast=True)
    side = cfg.resolution
    pixels = [pipe.image_processor.preprocess(_load(image_files(f)[0]), side, side) for f in cfg.references]
    conds = setup.target_conds
    for lr in (5e-5, 0.01):
        points = curve(f"reference (lr {lr:g})")

        def checkpoint(step, seconds, mergers, points=points):
            if _checkpoint(step, eval_every, steps):
                model.load_mergers(mergers)
                with model.installed():
                    points.append((step, seconds, evaluate(setup, "merged")["mse"]))

        reference_fit(pipe, sources, pixels, conds, steps, lr, cfg.similarity_weight, cfg.seed, checkpoint)
    return {"plain_sum": plain, "runs": runs, "steps": steps, "size": size, "side": side}


def _checkpoint(step: int, every: int, last: int) -> bool:
    """Evaluate at steps 1, 2, 3, 5, then every `every` steps, and at the last."""
    return step in (1, 2, 3, 5) or step % every == 0 or step == last


def _load(path):
    from PIL import Image

    return Image.open(path).convert("RGB")


# ----------------------------------------------------------------------------------------------------
# results


def zip_table(result: dict) -> list[str]:
    runs = result["runs"]
    lines = [
        f"Plain sum (all mergers 1): objective {result['plain_sum']:.5g}. Steps per run: {result['steps']}.",
        "",
        "| run | steps | train s | s/step | final objective |",
        "|---|---|---|---|---|",
    ]
    for name, run in runs.items():
        last = run["points"][-1]
        steps = [p[0] for p in run["points"] if isinstance(p[0], int)]
        per_step = f"{last[1] / steps[-1]:.3f}" if steps and last[0] == steps[-1] else "-"
        lines.append(f"| {name} | {last[0]} | {last[1]:.1f} | {per_step} | {last[2]:.5g} |")
    lines += [
        "",
        "Same objective: when each run first reaches a reference run's final objective (train seconds).",
        "",
        "| target: final objective of | objective | run | first reaches it after | speed-up vs reference |",
        "|---|---|---|---|---|",
    ]
    for ref_name, ref in runs.items():
        if not ref_name.startswith("reference"):
            continue
        target = ref["points"][-1][2]
        ref_first = _first_reach(ref["points"], target)
        for name, run in runs.items():
            if name.startswith("reference") and name != ref_name:
                continue
            reach = _first_reach(run["points"], target)
            when = f"{reach:.2f} s" if reach is not None else "not reached"
            speed = f"{ref_first / reach:.1f}x" if reach else "-"
            lines.append(f"| {ref_name} | {target:.5g} | {name} | {when} | {speed} |")
    return lines


def _first_reach(points: list, target: float) -> float | None:
    return next((t for _, t, objective in points if objective <= target), None)
