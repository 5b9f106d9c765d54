"""One training step's work: draw a batch (from caches or files), noise it, run the UNet, weigh the loss.

Every random choice of a step (batch order aside) comes from a generator seeded by (seed, step, micro-batch,
process), so any step can be recomputed exactly, which is what makes resume exact.
"""

from __future__ import annotations

import random
from dataclasses import dataclass

import torch
from tqdm.auto import tqdm

from studio.core.images import load_image
from trainers.config import TrainConfig
from trainers.data import BatchPlan, Example, fit_to_bucket, process_caption
from trainers.encode import TextCache, encode_pixels, sample_latents
from trainers.methods import DataPart
from trainers.optim import diffusion_loss, offset_noise


def step_seed(seed: int, step: int, micro: int, process: int) -> int:
    return ((seed * 1_000_003 + step) * 1_009 + micro) * 131 + process


@dataclass
class Batch:
    """Latent posterior parameters (B, 2C, h, w), captions, and SDXL size conditioning (B, 6)."""

    latent_params: torch.Tensor
    captions: list[str]
    time_ids: torch.Tensor
    loss_weight: float


class TrainData:
    """The data parts of a run with their batch plans and (optionally) cached latents."""

    def __init__(self, cfg: TrainConfig, parts: list[DataPart], vae, world_size: int):
        self.cfg, self.parts, self.vae = cfg, parts, vae
        self.plans = [
            BatchPlan([ex.bucket for ex in p.dataset.examples], batch_size=cfg.batch_size,
                      repeats=p.dataset.repeats, seed=cfg.seed + i)
            for i, p in enumerate(parts)
        ]  # fmt: skip
        self.world_size = world_size
        self.latents: dict[tuple[int, int, bool], tuple[torch.Tensor, tuple[int, int]]] = {}
        self.text: TextCache | None = None  # set by the loop once the text encoders are ready

    def cache_latents(self, progress: bool) -> None:
        """Encode every image (and its mirror image with flip_aug) once."""
        jobs = [(pi, ei) for pi, p in enumerate(self.parts) for ei in range(len(p.dataset.examples))]
        for pi, ei in tqdm(jobs, desc="caching latents", disable=not progress):
            ex = self.parts[pi].dataset.examples[ei]
            pixels, crop = fit_to_bucket(load_image(ex.path), ex.bucket, self.cfg.crop)
            for flip in (False, True) if self.cfg.flip_aug else (False,):
                batch = (pixels.flip(-1) if flip else pixels)[None]
                self.latents[(pi, ei, flip)] = (encode_pixels(self.vae, batch).cpu(), crop)

    def batch(self, part: int, index: int, rng: random.Random) -> Batch:
        """Global batch `index` of data part `part` (this process's share is chosen by the caller)."""
        cfg, plan = self.cfg, self.plans[part]
        examples = self.parts[part].dataset.examples
        params, captions, time_ids = [], [], []
        for ei in plan.batch(index):
            ex = examples[ei]
            flip = cfg.flip_aug and rng.random() < 0.5
            latent, crop = self._latent(part, ei, ex, flip, rng)
            params.append(latent)
            captions.append(
                process_caption(ex.caption, rng, dropout=cfg.caption_dropout_rate, shuffle=cfg.shuffle_caption,
                                keep_tokens=cfg.keep_tokens, separator=cfg.caption_separator)
            )  # fmt: skip
            w, h = ex.bucket
            time_ids.append([ex.size[1], ex.size[0], crop[0], crop[1], h, w])
        return Batch(torch.cat(params), captions, torch.tensor(time_ids, dtype=torch.float32),
                     self.parts[part].loss_weight)  # fmt: skip

    def _latent(self, part: int, ei: int, ex: Example, flip: bool, rng: random.Random):
        cached = self.latents.get((part, ei, flip))
        if cached is not None:
            return cached
        pixels, crop = fit_to_bucket(load_image(ex.path), ex.bucket, self.cfg.crop, rng)
        return encode_pixels(self.vae, (pixels.flip(-1) if flip else pixels)[None]).cpu(), crop


def part_loss(unet, batch: Batch, text: TextCache, noise_scheduler, vae, cfg: TrainConfig,
              generator: torch.Generator, dtype: torch.dtype) -> torch.Tensor:  # fmt: skip
    """Mean (min-SNR weighted) diffusion loss of one batch, times the part's loss weight."""
    device = next(p for p in unet.parameters()).device
    latents = sample_latents(vae, batch.latent_params, generator).to(device, dtype)
    noise = offset_noise(latents, cfg.noise_offset, generator)
    steps = noise_scheduler.config.num_train_timesteps
    timesteps = torch.randint(0, steps, (latents.shape[0],), generator=generator).to(device)
    noisy = noise_scheduler.add_noise(latents, noise, timesteps)
    if noise_scheduler.config.prediction_type == "v_prediction":
        target = noise_scheduler.get_velocity(latents, noise, timesteps)
    else:
        target = noise
    emb = text(batch.captions)
    extra = None
    if emb.pooled is not None:
        extra = {"text_embeds": emb.pooled.to(device, dtype), "time_ids": batch.time_ids.to(device, dtype)}
    pred = unet(
        noisy, timesteps, encoder_hidden_states=emb.hidden.to(device, dtype), added_cond_kwargs=extra
    ).sample
    return (
        diffusion_loss(pred, target, timesteps, noise_scheduler, cfg.min_snr_gamma).mean() * batch.loss_weight
    )
