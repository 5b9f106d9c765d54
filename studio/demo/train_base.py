"""Train the built-in demo base models on the demo world: first the VAE, then the UNet with its text encoders.

    python -m studio.demo.train_base --family sd15 --out studio/demo/weights/sd15 --work /tmp/demo-sd15
    python -m studio.demo.train_base --family sdxl --out studio/demo/weights/sdxl --work /tmp/demo-sdxl \
        --vae-from studio/demo/weights/sd15/vae

--buckets adds one-shape pictures of other sizes (studio/demo/buckets.py), each step taking the next size in
turn; with --init-from a run starts from a trained pipeline folder (the 128 px model's bucket pass):

    python -m studio.demo.train_base --family sd15 --image-size 128 --out DIR --work DIR \
        --vae-from studio/demo/weights/sd15/vae --init-from studio/demo/weights/sd15-128 \
        --buckets 128x128,64x128,128x64,128x128,64x64 --unet-steps 2500 --unet-lr 0.0003

Each phase is resumable: checkpoints go to --work every few minutes and a rerun with the same flags carries on.
--max-minutes bounds one run of a phase; a phase that stopped early is finished by running the command again.
The output is a diffusers pipeline folder (fp16 safetensors) with metadata.json recording command and seeds.
"""

from __future__ import annotations

import argparse
import json
import math
import random
import sys
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from diffusers import AutoencoderKL
from safetensors.torch import load_file, save_file

from studio.core.errors import ConfigError
from studio.core.families import TEXT_ENCODERS, check_family
from studio.core.io import atomic_write_text
from studio.core.tokenizers import EOS, clip_tokenizer, write_tokenizer_files
from studio.demo.architectures import build_text_encoders, build_unet, build_vae, train_scheduler
from studio.demo.buckets import bucket_name, parse_buckets
from studio.demo.captions import CaptionIds, keep_token_rows
from studio.demo.pipelines import assemble_pipeline, encode_text, time_ids
from studio.demo.world import World, world_for


@dataclass(frozen=True)
class TrainPlan:
    """Everything a run depends on (recorded in metadata.json)."""

    family: str
    out: str
    work: str
    seed: int = 0
    image_size: int = 64  # the world's image size: 64 (the built-in models) or 128 (16 x 16 latents)
    vae_from: str | None = None  # reuse a trained VAE folder instead of training one
    vae_images: int = 12000  # world images (split "all") for the VAE
    vae_steps: int = 400
    vae_batch: int = 16
    vae_lr: float = 1e-3
    unet_images: int = 12000  # world images (split "base") for the UNet
    unet_steps: int = 2000
    unet_batch: int = 32
    unet_lr: float = 1e-3
    ema_decay: float = 0.995
    caption_dropout: float = 0.1  # share of captions replaced by the empty prompt (for guidance)
    max_minutes: float = 40.0  # per phase and per run; rerun to continue
    threads: int = 1
    init_from: str | None = None  # start the UNet and text encoders from a trained demo pipeline folder
    buckets: str = ""  # e.g. "128x128,64x128,128x64,64x64": each step's pictures from the next size in turn
    bucket_images: int = 4000  # one-shape pictures per bucket of another size than the world's


# ------------------------------------------------------------------------------------------------ data
def render_images(world: World, seed: int, n: int, split: str) -> tuple[torch.Tensor, list]:
    """`n` world images from `split` as uint8 (n, 3, size, size), with their specs."""
    specs = world.sample(seed, n, split)
    return render_specs(world, specs), specs


def render_specs(world: World, specs: list, size: tuple[int, int] | None = None) -> torch.Tensor:
    """Scenes drawn at `size` (width, height; default the world's) as uint8 (n, 3, height, width)."""
    arr = np.stack([np.asarray(world.render(s, size=size)) for s in specs])
    return torch.from_numpy(arr).permute(0, 3, 1, 2).contiguous()


def to_float(images: torch.Tensor) -> torch.Tensor:
    """uint8 images -> float in [-1, 1]."""
    return images.float() / 127.5 - 1.0


def _cosine_lr(base: float, step: int, total: int, warmup: int = 100) -> float:
    if step < warmup:
        return base * (step + 1) / warmup
    progress = min(1.0, (step - warmup) / max(1, total - warmup))
    return base * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * progress)))


def _save_checkpoint(path: Path, state: dict) -> None:
    tmp = path.with_suffix(".tmp")
    torch.save(state, tmp)
    tmp.replace(path)


def _load_checkpoint(path: Path) -> dict | None:
    return torch.load(path, weights_only=True) if path.is_file() else None


# ------------------------------------------------------------------------------------------------ VAE
def train_vae(plan: TrainPlan, work: Path) -> AutoencoderKL:
    """Train the autoencoder on all of the world (held-out shapes and styles too: LoRAs need them later)."""
    vae = build_vae(plan.image_size)
    with torch.no_grad():  # start nearly deterministic (posterior std ~0.02), as a trained SD VAE is
        logvar = slice(vae.config.latent_channels, None)
        vae.quant_conv.weight[logvar] *= 0.01
        vae.quant_conv.bias[logvar] = -8.0
    ckpt_path = work / "vae.ckpt"
    opt = torch.optim.AdamW(vae.parameters(), lr=plan.vae_lr, weight_decay=0.0)
    ckpt = _load_checkpoint(ckpt_path)
    step, elapsed = 0, 0.0
    if ckpt:
        vae.load_state_dict(ckpt["model"])
        opt.load_state_dict(ckpt["opt"])
        step, elapsed = ckpt["step"], ckpt["elapsed"]
        print(f"vae: resuming at step {step}", flush=True)
    if step >= plan.vae_steps:
        return vae.eval()
    images, _ = render_images(world_for(plan.image_size), plan.seed, plan.vae_images, "all")
    gen = torch.Generator().manual_seed(plan.seed * 1000 + step)
    started, last_save = time.time(), time.time()
    vae.train()
    while step < plan.vae_steps and time.time() - started < plan.max_minutes * 60:
        x = to_float(images[torch.randint(0, len(images), (plan.vae_batch,), generator=gen)])
        posterior = vae.encode(x).latent_dist
        recon = vae.decode(posterior.sample(generator=gen)).sample
        loss = F.l1_loss(recon, x) + F.mse_loss(recon, x) + 1e-6 * posterior.kl().mean()
        for group in opt.param_groups:
            group["lr"] = _cosine_lr(plan.vae_lr, step, plan.vae_steps)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(vae.parameters(), 1.0)
        opt.step()
        step += 1
        if step % 25 == 0:
            print(
                f"vae step {step}/{plan.vae_steps} loss {loss.item():.4f} {time.time() - started:.0f}s",
                flush=True,
            )
        if time.time() - last_save > 180 or step == plan.vae_steps:
            state = {"model": vae.state_dict(), "opt": opt.state_dict(), "step": step}
            _save_checkpoint(ckpt_path, state | {"elapsed": elapsed + time.time() - started})
            last_save = time.time()
    state = {"model": vae.state_dict(), "opt": opt.state_dict(), "step": step}
    _save_checkpoint(ckpt_path, state | {"elapsed": elapsed + time.time() - started})
    if step < plan.vae_steps:
        raise SystemExit(f"vae: stopped at step {step}/{plan.vae_steps} (time limit); run again to continue")
    return vae.eval()


@torch.no_grad()
def encode_latents(
    vae: AutoencoderKL, images: torch.Tensor, batch: int = 64
) -> tuple[torch.Tensor, torch.Tensor]:
    """Posterior mean and std of every image (unscaled)."""
    means, stds = [], []
    for i in range(0, len(images), batch):
        dist = vae.encode(to_float(images[i : i + batch])).latent_dist
        means.append(dist.mean)
        stds.append(dist.std)
    return torch.cat(means), torch.cat(stds)


def load_vae(folder: Path) -> AutoencoderKL:
    """A trained demo VAE from a diffusers folder (its scaling_factor is kept)."""
    if not (folder / "config.json").is_file():
        raise ConfigError(f"--vae-from {folder}: no VAE there (expected config.json + safetensors).")
    return AutoencoderKL.from_pretrained(folder, torch_dtype=torch.float32).eval()


# ------------------------------------------------------------------------------------------------ UNet
def training_sets(plan: TrainPlan, work: Path, vae: AutoencoderKL, world: World) -> list[tuple]:
    """(latent mean, std, specs, (width, height)) per bucket, in the order steps take them: the world's own
    scenes (its size, two-shape scenes too) and, with --buckets, one-shape pictures of other sizes.
    Latents are cached in --work."""
    sets = []
    for bucket in parse_buckets(plan.buckets) or [(plan.image_size, plan.image_size)]:
        own = bucket == (plan.image_size, plan.image_size)
        name = "latents.safetensors" if own else f"latents_{bucket_name(bucket)}.safetensors"
        seed = plan.seed + 1 if own else plan.seed + 1 + bucket[0] * 1000 + bucket[1]
        n = plan.unet_images if own else plan.bucket_images
        specs = world.sample(seed, n, "base") if own else world.singles().sample(seed, n, "base")
        if (work / name).is_file():
            cached = load_file(str(work / name))
            mean, std = cached["mean"], cached["std"]
        else:
            images = render_specs(world, specs, bucket)
            mean, std = encode_latents(vae, images)
            save_file({"mean": mean.contiguous(), "std": std.contiguous()}, str(work / name))
        sets.append((mean, std, specs, bucket))
    return sets


def load_trained(modules: dict[str, torch.nn.Module], folder: Path) -> None:
    """The UNet and text encoders of a demo pipeline folder (fp16 on disk) into `modules`, as float32."""
    for key, module in modules.items():
        files = sorted((folder / key).glob("*.safetensors"))
        if not files:
            raise ConfigError(f"--init-from {folder}: no {key} weights there (expected {key}/*.safetensors)")
        state = {k: v.float() for f in files for k, v in load_file(str(f)).items()}
        shapes = {k: v.shape for k, v in module.state_dict().items() if "position_ids" not in k}
        if {k: v.shape for k, v in state.items() if "position_ids" not in k} != shapes:
            raise ConfigError(
                f"--init-from {folder}: its {key} has another shape than --family / --image-size ask for"
            )
        module.load_state_dict(state, strict=False)


def _ema_update(ema: dict[str, torch.Tensor], modules: dict[str, torch.nn.Module], decay: float) -> None:
    with torch.no_grad():
        for prefix, module in modules.items():
            for name, p in module.named_parameters():
                ema[f"{prefix}.{name}"].lerp_(p.detach(), 1 - decay)


def denoiser_modules(plan: TrainPlan, world: World) -> tuple[dict[str, torch.nn.Module], list]:
    """({"unet", "text_encoder"[, "text_encoder_2"]}, tokenizers): new, or from --init-from."""
    unet, text_encoders = (
        build_unet(plan.family, plan.image_size),
        build_text_encoders(plan.family, plan.image_size),
    )
    tokenizers = (
        [clip_tokenizer()] if plan.family == "sd15" else [clip_tokenizer(), clip_tokenizer(pad_token="!")]
    )
    keep_token_rows(text_encoders, tokenizers, plan.seed, world)
    modules = {"unet": unet} | {
        f"text_encoder{'' if i == 0 else '_2'}": te for i, te in enumerate(text_encoders)
    }
    if plan.init_from:
        load_trained(modules, Path(plan.init_from))
    return modules, tokenizers


def denoising_loss(
    plan: TrainPlan, modules: dict, ids: list, drop: list[bool], x0: torch.Tensor, size, scheduler, gen, rng
) -> torch.Tensor:
    """The min-SNR-5 weighted epsilon loss of one batch (captions `ids`, `drop` marking the dropped ones)."""
    text_encoders = [m for k, m in modules.items() if k.startswith("text_encoder")]
    embeds, pooled = encode_text(text_encoders, ids, plan.family)
    if plan.family == "sdxl":  # half of the dropped captions become zeros (force_zeros_for_empty_prompt)
        zero = torch.tensor([d and rng.random() < 0.5 for d in drop])[:, None]
        embeds = torch.where(zero[:, :, None], torch.zeros_like(embeds), embeds)
        pooled = torch.where(zero, torch.zeros_like(pooled), pooled)
    noise = torch.randn(x0.shape, generator=gen)
    t = torch.randint(0, scheduler.config.num_train_timesteps, (len(x0),), generator=gen)
    noisy = scheduler.add_noise(x0, noise, t)
    extra = {}
    if plan.family == "sdxl":
        extra = {"added_cond_kwargs": {"text_embeds": pooled, "time_ids": time_ids(len(x0), size)}}
    pred = modules["unet"](noisy, t, embeds, **extra).sample
    alphas = scheduler.alphas_cumprod
    snr = (alphas / (1 - alphas))[t]
    weight = torch.clamp(snr, max=5.0) / snr
    return (weight * F.mse_loss(pred, noise, reduction="none").mean(dim=(1, 2, 3))).mean()


def _resume(ckpt_path: Path, modules: dict[str, torch.nn.Module], opt) -> tuple[dict, int, float]:
    """(EMA weights, step, minutes so far): from the checkpoint when there is one (modules and optimizer
    loaded from it), else a fresh start."""
    ema = {f"{k}.{n}": p.detach().clone() for k, m in modules.items() for n, p in m.named_parameters()}
    if (ckpt := _load_checkpoint(ckpt_path)) is None:
        return ema, 0, 0.0
    for key, module in modules.items():
        module.load_state_dict(ckpt[key])
    opt.load_state_dict(ckpt["opt"])
    print(f"unet: resuming at step {ckpt['step']}", flush=True)
    return ckpt["ema"], ckpt["step"], ckpt["elapsed"]


def _load_ema(modules: dict[str, torch.nn.Module], ema: dict[str, torch.Tensor]) -> None:
    for key, module in modules.items():
        module.load_state_dict({n: ema[f"{key}.{n}"] for n, _ in module.named_parameters()}, strict=False)
        module.eval()


def train_unet(plan: TrainPlan, work: Path, vae: AutoencoderKL) -> dict[str, torch.nn.Module]:
    """Train UNet + text encoders with the epsilon objective on captioned base-split latents."""
    torch.manual_seed(plan.seed)
    world = world_for(plan.image_size)
    modules, tokenizers = denoiser_modules(plan, world)
    params = [p for m in modules.values() for p in m.parameters()]
    opt = torch.optim.AdamW(params, lr=plan.unet_lr, weight_decay=0.0)
    ckpt_path = work / "unet.ckpt"
    ema, step, elapsed = _resume(ckpt_path, modules, opt)
    sets = training_sets(plan, work, vae, world)
    scale = vae.config.scaling_factor
    scheduler = train_scheduler()
    ids_of = CaptionIds(tokenizers)
    gen = torch.Generator().manual_seed(plan.seed * 1000 + step)
    rng = random.Random(f"captions:{plan.seed}:{step}")
    started, last_save = time.time(), time.time()

    def checkpoint() -> None:
        state = {k: m.state_dict() for k, m in modules.items()}
        state |= {
            "opt": opt.state_dict(),
            "ema": ema,
            "step": step,
            "elapsed": elapsed + time.time() - started,
        }
        _save_checkpoint(ckpt_path, state)

    for m in modules.values():
        m.train()
    while step < plan.unet_steps and time.time() - started < plan.max_minutes * 60:
        mean, std, specs, size = sets[step % len(sets)]
        idx = torch.randint(0, len(mean), (plan.unet_batch,), generator=gen)
        x0 = (mean[idx] + std[idx] * torch.randn(mean[idx].shape, generator=gen)) * scale
        drop = [rng.random() < plan.caption_dropout for _ in idx]
        captions = ["" if d else world.caption_variant(specs[i], rng) for d, i in zip(drop, idx.tolist())]
        loss = denoising_loss(plan, modules, ids_of(captions), drop, x0, size, scheduler, gen, rng)
        for group in opt.param_groups:
            group["lr"] = _cosine_lr(plan.unet_lr, step, plan.unet_steps)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        step += 1
        _ema_update(ema, modules, min(plan.ema_decay, (1 + step) / (10 + step)))
        if step % 25 == 0:
            print(
                f"unet step {step}/{plan.unet_steps} loss {loss.item():.4f} {time.time() - started:.0f}s",
                flush=True,
            )
        if time.time() - last_save > 180:
            checkpoint()
            last_save = time.time()
    checkpoint()
    if step < plan.unet_steps:
        print(
            f"unet: stopped at step {step}/{plan.unet_steps} (time limit); exporting, rerun to continue",
            flush=True,
        )
    _load_ema(modules, ema)  # ship the EMA weights
    minutes = (elapsed + time.time() - started) / 60
    return modules | {"tokenizers": tokenizers, "elapsed_minutes": minutes, "steps_done": step}


# ------------------------------------------------------------------------------------------------ main
def run(plan: TrainPlan, command: str) -> Path:
    """All phases, then write the pipeline folder and metadata.json."""
    check_family(plan.family)
    torch.set_num_threads(plan.threads)
    work, out = Path(plan.work), Path(plan.out)
    work.mkdir(parents=True, exist_ok=True)
    t0 = time.time()
    if plan.vae_from:
        vae = load_vae(Path(plan.vae_from))
    else:
        vae = train_vae(plan, work)
        if vae.config.scaling_factor == 1.0:
            images, _ = render_images(world_for(plan.image_size), plan.seed + 1, 2000, "base")
            mean, _ = encode_latents(vae, images)
            vae.register_to_config(scaling_factor=round(float(1.0 / mean.std()), 5))
    vae_minutes = (time.time() - t0) / 60
    trained = train_unet(plan, work, vae)
    pipe = assemble_pipeline(plan.family, vae, trained)
    pipe.to(torch.float16)
    pipe.save_pretrained(out, safe_serialization=True)
    finish_folder(out, plan.family)
    # A run may take several invocations (a VAE-only pass, resumes after --max-minutes): keep them all.
    earlier = _earlier_commands(out / "metadata.json")
    meta = {
        "commands": [*earlier, command],
        "plan": asdict(plan),
        "family": plan.family,
        "scaling_factor": vae.config.scaling_factor,
        "unet_minutes": round(trained["elapsed_minutes"], 1),
        "unet_steps_done": trained["steps_done"],
        "complete": trained["steps_done"] >= plan.unet_steps,
        "vae_minutes_this_run": round(vae_minutes, 1),
        "torch": torch.__version__,
        "train_splits": {"vae": "all", "unet": "base"},
    }
    atomic_write_text(out / "metadata.json", json.dumps(meta, indent=2) + "\n")
    return out


def _earlier_commands(previous: Path) -> list[str]:
    """Commands recorded by earlier invocations; an unreadable file is reported and started afresh."""
    if not previous.is_file():
        return []
    try:
        return list(json.loads(previous.read_text()).get("commands", []))
    except (ValueError, AttributeError, TypeError) as exc:
        print(f"{previous}: unreadable ({exc}); earlier commands are not carried over", flush=True)
        return []


def finish_folder(out: Path, family: str) -> None:
    """Ship CLIP's vocab.json/merges.txt (smaller than tokenizer.json) and mark text encoders float32.

    The weights are stored in fp16 to keep the files small; "dtype": "float32" makes transformers load them
    in float32 by default, like the UNet and VAE.
    """
    pads = {"tokenizer": EOS} if family == "sd15" else {"tokenizer": EOS, "tokenizer_2": "!"}
    for name, pad in pads.items():
        folder = out / name
        for f in folder.iterdir():
            f.unlink()
        write_tokenizer_files(folder, pad_token=pad)
    for name in TEXT_ENCODERS:
        config = out / name / "config.json"
        if config.is_file():
            data = json.loads(config.read_text())
            data["dtype"] = "float32"
            config.write_text(json.dumps(data, indent=2, sort_keys=True) + "\n")


def parse_plan(argv: Sequence[str] | None = None) -> TrainPlan:
    """Command-line flags -> TrainPlan (one flag per field, help from the field comments)."""
    parser = argparse.ArgumentParser(description="Train a demo base model on the demo world.")
    parser.add_argument("--family", required=True, choices=("sd15", "sdxl"))
    parser.add_argument("--out", required=True, help="output pipeline folder")
    parser.add_argument("--work", required=True, help="folder for checkpoints and cached latents")
    defaults = TrainPlan(family="sd15", out="", work="")
    for name, value in asdict(defaults).items():
        if name in ("family", "out", "work"):
            continue
        kind = str if name in ("vae_from", "init_from") else type(value)
        parser.add_argument(f"--{name.replace('_', '-')}", type=kind, default=value)
    return TrainPlan(**vars(parser.parse_args(argv)))


def main(argv: Sequence[str] | None = None) -> None:
    """Entry point: `python -m studio.demo.train_base --family sd15 --out DIR --work DIR`."""
    args = list(sys.argv[1:] if argv is None else argv)
    plan = parse_plan(args)
    out = run(plan, " ".join(["python -m studio.demo.train_base", *args]))
    print(f"saved {out}")


if __name__ == "__main__":
    main()
