"""The training loop shared by every method: setup, models, data, optimizer, loop, save.

    >>> from studio.core.options import build_config, load_preset
    >>> cfg = build_config(TrainConfig, load_preset("style_sd15", "train"), data_dir="art", max_steps=500)
    >>> result = train(cfg)  # doctest: +SKIP
    >>> result.path  # doctest: +SKIP
    PosixPath('output/lora.safetensors')

Runs unchanged under `accelerate launch` on several GPUs: accelerate wraps the models, each process draws
its own batches, and only the main process writes files and events.
"""

from __future__ import annotations

import json
import random
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch
from accelerate import Accelerator
from accelerate.utils import set_seed
from diffusers.training_utils import cast_training_params
from tqdm.auto import tqdm

from studio.core.checkpoints import pipe_family
from studio.core.errors import ConfigError, StudioError
from studio.core.io import atomic_write_text
from studio.core.lora_files import write_lora
from studio.core.modules import model_module_shapes
from studio.core.options import config_to_dict
from studio.core.targets import ModuleTarget, plan_targets
from trainers import checkpoint as ckpt
from trainers.base_model import TrainModels, load_base_model, prepare_models, resolve_mixed_precision
from trainers.config import TrainConfig
from trainers.data import assign_resolutions, make_buckets
from trainers.encode import TextCache
from trainers.events import EventCallback, EventLog, TensorBoardSink
from trainers.metadata import training_metadata
from trainers.methods import DataContext, DataPart, Method, get_method, instance_dataset
from trainers.network import add_lora, extract_lora, param_groups, trainable_parameters
from trainers.optim import make_lr_scheduler, make_optimizer
from trainers.output_dir import claim_output_dir
from trainers.samples import render_samples
from trainers.step import TrainData, part_loss, step_seed
from trainers.token_words import TokenWords


class TrainingDiverged(StudioError):
    """The loss became NaN or infinite."""


@dataclass
class Run:
    cfg: TrainConfig
    accelerator: Accelerator
    out_dir: Path
    events: EventLog
    started: float = field(default_factory=time.time)
    step: int = 0
    last_checkpoint: Path | None = None
    lock: object | None = None  # the output folder's lock, held while the run lasts


@dataclass
class Optimization:
    optimizer: torch.optim.Optimizer
    scheduler: object
    params: dict[str, torch.nn.Parameter]
    models: list[torch.nn.Module]


@dataclass
class TrainResult:
    path: Path
    files: list[Path]
    step: int
    seconds: float
    events_path: Path


def train(cfg: TrainConfig, *, pipe=None, family: str | None = None, on_event: EventCallback | None = None,
          model_name: str = "", model_hash: str = "") -> TrainResult:  # fmt: skip
    """Train a LoRA as `cfg` says; `pipe` (with its `family`) replaces loading cfg.model when given."""
    run = setup_run(cfg, on_event)
    try:
        method = get_method(cfg.method)
        # the images are scanned once, before a multi-GB model is loaded: missing folders and broken files
        # are found at once
        instance = instance_dataset(cfg) if cfg.data_dir else None
        if instance is not None and instance.skipped:
            names = "; ".join(f"{p.name} ({why})" for p, why in instance.skipped)
            run.events.emit("log", message=f"left out {len(instance.skipped)} unreadable image(s): {names}")
        models = load_models(cfg, run, pipe, family, model_name, model_hash)
        method.check(cfg, models.family)
        context = DataContext(models.pipe, models.family, run.events, run.accelerator, instance)
        parts = method.data(cfg, context)
        plan = plan_targets(
            model_module_shapes(models.pipe), models.family, method.target_spec(cfg, models.family)
        )
        layers = add_lora(models.pipe, plan, cfg.lora_dropout, cfg.network_type, cfg.lokr_factor)
        if cfg.token_words:
            models.token_words = TokenWords(cfg.token_words, models.tokenizers, models.text_encoders)
            models.token_words.check_in_captions(
                [ex.caption for part in parts for ex in part.dataset.examples]
            )
        extra_meta = method.prepare_lora(cfg, layers, plan) if method.prepare_lora else {}
        data = prepare_data(cfg, parts, models, run)
        opt = build_optimizer(cfg, run, models, layers, plan)
        start = resume(cfg, run, opt) if cfg.resume else 0
        run.events.emit("start", max_steps=cfg.max_steps, method=cfg.method, family=models.family,
                        modules=len(plan), trainable_params=sum(p.numel() for p in opt.params.values()),
                        attention=models.attention, mixed_precision=run.accelerator.mixed_precision,
                        resumed_from_step=start, world_size=run.accelerator.num_processes,
                        effective_batch=cfg.batch_size * cfg.gradient_accumulation_steps * run.accelerator.num_processes)  # fmt: skip
        step = train_loop(cfg, run, models, data, opt, start)
        return save_outputs(cfg, run, models, method, (layers, plan), parts, step, extra_meta)
    except KeyboardInterrupt:
        run.events.emit("error", step=run.step, message="interrupted", last_checkpoint=run.last_checkpoint)
        raise
    except StudioError as exc:
        run.events.emit("error", step=run.step, message=str(exc), last_checkpoint=run.last_checkpoint)
        raise
    finally:
        if run.lock is not None:
            run.lock.release()


# --------------------------------------------------------------------------------------------------
# 1. setup


def setup_run(cfg: TrainConfig, on_event: EventCallback | None) -> Run:
    cuda = torch.cuda.is_available()
    if cfg.device == "cuda" and not cuda:
        raise ConfigError("device = 'cuda' but no CUDA GPU is visible; use device = 'auto' or 'cpu'")
    # without a GPU, "auto" is the CPU: said outright, so that accelerate runs several processes
    # (`accelerate launch --multi_gpu --num_processes N`, torchrun) as one CPU job over gloo
    accelerator = Accelerator(
        mixed_precision=resolve_mixed_precision(cfg, cuda and cfg.device != "cpu"),
        gradient_accumulation_steps=cfg.gradient_accumulation_steps,
        cpu=cfg.device == "cpu" or not cuda,
    )
    out_dir = Path(cfg.output_dir).expanduser()
    final = out_dir / f"{cfg.output_name}.safetensors"
    if final.exists() and not cfg.overwrite:
        raise ConfigError(f"{final} already exists; choose another output_name or pass --overwrite")
    if cfg.crop == "random" and cfg.cache_latents:
        raise ConfigError("crop = 'random' changes each image every step, so latents cannot be cached: "
                          "set cache_latents = false, or use crop = 'center'")  # fmt: skip
    lock = claim_output_dir(out_dir) if accelerator.is_main_process else None
    sinks = (
        (tensorboard_sink(cfg, out_dir),)
        if cfg.log_with == "tensorboard" and accelerator.is_main_process
        else ()
    )
    events = EventLog(out_dir / "events.jsonl", on_event, enabled=accelerator.is_main_process, sinks=sinks)
    ckpt.install_state_hooks(accelerator)
    # LoRA initialisation and dropout draw from the global RNGs: seed them so a run is reproducible.
    set_seed(cfg.seed)
    return Run(cfg, accelerator, out_dir, events, lock=lock)


def tensorboard_sink(cfg: TrainConfig, out_dir: Path) -> TensorBoardSink:
    try:
        return TensorBoardSink(Path(cfg.logging_dir).expanduser() if cfg.logging_dir else out_dir / "logs")
    except ImportError:
        raise ConfigError(
            "log_with = 'tensorboard' needs the tensorboard package: pip install tensorboard"
        ) from None


# --------------------------------------------------------------------------------------------------
# 2. models


def load_models(
    cfg: TrainConfig, run: Run, pipe, family: str | None, name: str, model_hash: str
) -> TrainModels:
    if pipe is None:
        loaded = load_base_model(cfg)
        pipe, family, name, model_hash = loaded.pipe, loaded.family, str(loaded.path), loaded.model_hash
    elif family is None:
        family = pipe_family(pipe)
    models = prepare_models(cfg, pipe, family, run.accelerator)
    models.name, models.model_hash = name, model_hash
    return models


# --------------------------------------------------------------------------------------------------
# 3. data


def prepare_data(cfg: TrainConfig, parts: list[DataPart], models: TrainModels, run: Run) -> TrainData:
    """Buckets, latent cache and text cache for the data parts of the method."""
    check_bucket_step(cfg, models)
    bucket_sets = [
        resolution_buckets(cfg, r) for r in dict.fromkeys([cfg.resolution, *cfg.extra_resolutions])
    ]
    for part in parts:
        assign_resolutions(part.dataset, bucket_sets)
    data = TrainData(cfg, parts, models.vae, run.accelerator.num_processes)
    if cfg.cache_latents:
        data.cache_latents(progress=cfg.progress_bar and run.accelerator.is_main_process)
    data.text = TextCache(models.tokenizers, models.text_encoders, family=models.family, clip_skip=cfg.clip_skip,
                          cache=cfg.cache_text_embeddings and not cfg.shuffle_caption,
                          trainable=cfg.train_text_encoder or bool(cfg.token_words))  # fmt: skip
    if cfg.cache_latents and data.text.cache and not cfg.sample_every:
        free_encoders(cfg, parts, models, data, run)
    return data


def resolution_buckets(cfg: TrainConfig, resolution: int) -> list[tuple[int, int]]:
    """The buckets of one training resolution; an extra resolution widens the bucket range to hold it."""
    if not cfg.enable_buckets:
        return [(resolution, resolution)]
    if resolution == cfg.resolution:
        low, high = cfg.min_bucket_reso, cfg.max_bucket_reso
    else:
        low, high = min(cfg.min_bucket_reso, resolution), max(cfg.max_bucket_reso, resolution)
    return make_buckets(resolution, step=cfg.bucket_step, min_reso=low, max_reso=high)


def free_encoders(
    cfg: TrainConfig, parts: list[DataPart], models: TrainModels, data: TrainData, run: Run
) -> None:
    """Every latent and caption embedding is cached and no samples are drawn: the VAE and the text encoders
    are not needed again, so their memory goes back (moved to the meta device, where any use would fail)."""
    captions = [ex.caption for part in parts for ex in part.dataset.examples]
    data.text.prefill(captions + ([""] if cfg.caption_dropout_rate > 0 else []))
    for module in (models.vae, *models.text_encoders):
        module.to("meta")
    run.events.emit("log", message="the VAE and text encoders are freed: their outputs are cached")


def check_bucket_step(cfg: TrainConfig, models: TrainModels) -> None:
    factor = 2 ** (len(models.vae.config.block_out_channels) - 1) * 2 ** (
        len(models.unet.config.down_block_types) - 1
    )
    sizes = [cfg.bucket_step] if cfg.enable_buckets else [cfg.resolution, *cfg.extra_resolutions]
    if any(s % factor for s in sizes):
        what = "bucket_step" if cfg.enable_buckets else "resolution (and each extra resolution)"
        raise ConfigError(f"{what} must be a multiple of {factor} for this model (VAE x UNet downsampling)")


# --------------------------------------------------------------------------------------------------
# 4. optimizer


def build_optimizer(cfg: TrainConfig, run: Run, models: TrainModels, layers: dict,
                    plan: dict[str, ModuleTarget]) -> Optimization:  # fmt: skip
    acc = run.accelerator
    trained = [models.unet] + (models.text_encoders if cfg.train_text_encoder else [])
    cast_training_params(trained, dtype=torch.float32)  # LoRA factors train in fp32 under mixed precision
    params = trainable_parameters(layers)
    groups = param_groups(layers, plan, cfg.learning_rate, cfg.effective_text_encoder_lr)
    if models.token_words is not None:  # the learnt word vectors: their own group, saved in checkpoints
        params |= models.token_words.params
        groups.append(models.token_words.group(cfg.token_lr))
    optimizer = make_optimizer(cfg, groups)
    scheduler = make_lr_scheduler(cfg, optimizer, acc.num_processes)
    prepared = acc.prepare(*trained, optimizer, scheduler)
    wrapped, optimizer, scheduler = list(prepared[: len(trained)]), prepared[-2], prepared[-1]
    models.unet = wrapped[0]
    if cfg.train_text_encoder:
        models.text_encoders[:] = wrapped[1:]
    for module in wrapped:
        module.train()
    return Optimization(optimizer, scheduler, params, wrapped)


def resume(cfg: TrainConfig, run: Run, opt: Optimization) -> int:
    path = ckpt.find_checkpoint(cfg.resume, run.out_dir)
    saved = ckpt.read_checkpoint_state(path)
    changed = ckpt.check_same_run(saved.get("config", {}), config_to_dict(cfg), path)
    step = ckpt.load_checkpoint(run.accelerator, path, opt.params)
    run.step, run.last_checkpoint = step, path
    note = f" (changed: {', '.join(changed)})" if changed else ""
    run.events.emit("log", message=f"resumed from {path} at step {step}{note}")
    return step


# --------------------------------------------------------------------------------------------------
# 5. loop


def train_loop(cfg: TrainConfig, run: Run, models: TrainModels, data: TrainData, opt: Optimization,
               start: int) -> int:  # fmt: skip
    main = run.accelerator.is_main_process
    bar = tqdm(total=cfg.max_steps, initial=start, desc="training", disable=not (main and cfg.progress_bar))
    images = cfg.batch_size * cfg.gradient_accumulation_steps * run.accelerator.num_processes
    for step in range(start + 1, cfg.max_steps + 1):
        tick = time.perf_counter()
        loss = optimizer_step(cfg, run, models, data, opt, step)
        run.step = step
        lr = opt.scheduler.get_last_lr()[0]
        speed = images / max(time.perf_counter() - tick, 1e-9)
        run.events.emit("step", step=step, loss=loss, lr=lr, images_per_s=round(speed, 3))
        bar.update(1)
        bar.set_postfix(loss=f"{loss:.4f}", lr=f"{lr:.2e}")
        if cfg.sample_every and step % cfg.sample_every == 0 and cfg.sample_prompts:
            sample(cfg, run, models, step)
        if cfg.checkpoint_every and step % cfg.checkpoint_every == 0:
            save_checkpoint(cfg, run, opt, step)
    bar.close()
    return max(start, cfg.max_steps)


def optimizer_step(cfg: TrainConfig, run: Run, models: TrainModels, data: TrainData, opt: Optimization,
                   step: int) -> float:  # fmt: skip
    """One optimizer step over gradient_accumulation_steps micro-batches; returns the mean loss."""
    acc, total = run.accelerator, 0.0
    for micro in range(cfg.gradient_accumulation_steps):
        seed = step_seed(cfg.seed, step, micro, acc.process_index)
        generator, rng = torch.Generator().manual_seed(seed), random.Random(seed)
        index = ((step - 1) * cfg.gradient_accumulation_steps + micro) * acc.num_processes + acc.process_index
        with acc.accumulate(*opt.models):
            loss = sum(
                part_loss(models.unet, data.batch(i, index, rng), data.text, models.noise_scheduler, models.vae,
                          cfg, generator, models.weight_dtype)
                for i in range(len(data.parts))
            )  # fmt: skip
            stop_if_not_finite(loss, step, run)
            acc.backward(loss)
            if acc.sync_gradients and models.token_words is not None:
                models.token_words.sync_gradients(acc)  # outside the prepared models: averaged here
            if acc.sync_gradients and cfg.max_grad_norm:
                acc.clip_grad_norm_(list(opt.params.values()), cfg.max_grad_norm)
            opt.optimizer.step()
            opt.scheduler.step()
            opt.optimizer.zero_grad(set_to_none=True)
        total += float(loss.detach())
    return total / cfg.gradient_accumulation_steps


def stop_if_not_finite(loss: torch.Tensor, step: int, run: Run) -> None:
    """Stop on a NaN/inf loss (on any process) before it reaches the weights; checkpoints already saved stay."""
    value = loss.detach().reshape(1)
    if run.accelerator.num_processes > 1:
        value = run.accelerator.gather(value)
    if bool(torch.isfinite(value).all()):
        return
    kept = (
        f"the last good checkpoint is {run.last_checkpoint}"
        if run.last_checkpoint
        else "no checkpoint was saved"
    )
    raise TrainingDiverged(
        f"the loss became {float(value[~torch.isfinite(value)][0])} at step {step}; training stopped and {kept}. "
        "Lower learning_rate, use mixed_precision 'bf16' or 'no' instead of fp16, or set max_grad_norm."
    )


def sample(cfg: TrainConfig, run: Run, models: TrainModels, step: int) -> None:
    if run.accelerator.is_main_process:
        with run.accelerator.autocast():
            paths = render_samples(models.pipe, cfg.sample_prompts, run.out_dir / "samples", step,
                                   seed=cfg.sample_seed, steps=cfg.sample_steps, guidance=cfg.sample_guidance,
                                   size=cfg.resolution)  # fmt: skip
        run.events.emit("sample", step=step, paths=paths, prompts=list(cfg.sample_prompts))
    run.accelerator.wait_for_everyone()


def save_checkpoint(cfg: TrainConfig, run: Run, opt: Optimization, step: int) -> None:
    path = ckpt.save_checkpoint(run.accelerator, run.out_dir, step, opt.params, config_to_dict(cfg),
                                keep=cfg.checkpoints_keep)  # fmt: skip
    run.last_checkpoint = path
    run.events.emit("checkpoint", step=step, path=path)


# --------------------------------------------------------------------------------------------------
# 6. save


def save_outputs(cfg: TrainConfig, run: Run, models: TrainModels, method: Method,
                 network: tuple[dict, dict[str, ModuleTarget]], parts: list[DataPart], step: int,
                 extra_meta: dict[str, str]) -> TrainResult:  # fmt: skip
    """Write the kohya-format LoRA (plus method extras and the run's config) from the main process.

    `network` is (the trained layers, the plan they were made from)."""
    layers, plan = network
    acc = run.accelerator
    acc.wait_for_everyone()
    if models.token_words is not None:
        models.token_words.check_same_everywhere(acc)
    path = run.out_dir / f"{cfg.output_name}.safetensors"
    files: list[Path] = []
    if acc.is_main_process:
        dtype = {"fp16": torch.float16, "bf16": torch.bfloat16, "fp32": torch.float32}[cfg.save_dtype]
        lora = extract_lora(layers, plan, models.family, dtype)
        if models.token_words is not None:
            lora.embeddings = models.token_words.embeddings()
        meta = training_metadata(cfg, parts=parts, plan=plan, step=step, started=run.started, finished=time.time(),
                                 model_name=models.name, model_hash=models.model_hash, extra=extra_meta)  # fmt: skip
        files.append(write_lora(lora, path, family=models.family, metadata=meta, overwrite=cfg.overwrite))
        if method.save_extra:
            files += method.save_extra(cfg, lora, path, meta)
        atomic_write_text(run.out_dir / f"{cfg.output_name}.config.json",
                          json.dumps(config_to_dict(cfg), indent=2, default=str))  # fmt: skip
    seconds = time.time() - run.started
    # every process says how many steps it ran (its own batches, the gradients averaged across processes)
    trained = acc.gather(torch.tensor([run.step], device=acc.device)).tolist()
    run.events.emit(
        "done", step=step, path=path, files=files, seconds=round(seconds, 2), steps_per_process=trained
    )
    acc.wait_for_everyone()
    return TrainResult(path, files, step, seconds, run.out_dir / "events.jsonl")
