"""The generation engine: one base model in memory with its cached LoRA adapters, making images.

    >>> engine = GenerationEngine(pipe, "sd15")  # doctest: +SKIP
    >>> images = engine.generate(GenerateConfig(prompt="a cat", loras=["cat.safetensors:0.7"]))  # doctest: +SKIP

`generate` reads top to bottom: check the config and weight the stack, pick the sampler, size and seeds,
denoise each image (merge, switch or composite), and write the record that reproduces it.
"""

from __future__ import annotations

import random
import re
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass
from importlib import metadata
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from studio.core.blocks import format_block_weights, parse_block_weights
from studio.core.errors import BadFileError, ConfigError, StudioError
from studio.core.families import TEXT_ENCODERS, Family
from studio.core.pipeline_words import word_alone
from studio.core.samplers import make_sampler, scheduler_name
from studio.generation.adapters import Adapter, AdapterPool, file_key
from studio.generation.composition import Conditioning, LoraComposite, LoraSwitch, RegionalSampler
from studio.generation.config import GenerateConfig, LoraSpec, Region
from studio.generation.records import RECORD_FORMAT, RECORD_VERSION

PRESET_NAME = re.compile(r"[A-Za-z_][\w.]*")
DTYPE_NAMES = {torch.float32: "fp32", torch.float16: "fp16", torch.bfloat16: "bf16"}


# --------------------------------------------------------------------------------------------------
# results


@dataclass
class GeneratedImage:
    """One image and the record that reproduces it (also written into its PNG)."""

    image: Image.Image
    seed: int
    record: dict
    trace: list[tuple[int, ...]] | None = None  # stack indices acting at each step (switch/composite)
    seconds: float = 0.0
    path: Path | None = None
    notes: tuple[str, ...] = ()  # settings that work but may draw poorly (GenerationEngine.notes)


@dataclass
class PromptEmbeds:
    """A prompt encoded by the pipeline's text encoders (pooled parts for SDXL)."""

    prompt_embeds: torch.Tensor
    negative_prompt_embeds: torch.Tensor | None
    pooled_prompt_embeds: torch.Tensor | None = None
    negative_pooled_prompt_embeds: torch.Tensor | None = None

    def pipeline_kwargs(self) -> dict:
        return {k: v for k, v in vars(self).items() if v is not None}

    def unet_conditioning(self, cfg_on: bool) -> Conditioning:
        """What the UNet receives, stacked [negative, positive] as the pipelines stack it under CFG."""
        if not cfg_on:
            return Conditioning(self.prompt_embeds, self.pooled_prompt_embeds)
        pooled = None
        if self.pooled_prompt_embeds is not None:
            pooled = torch.cat([self.negative_pooled_prompt_embeds, self.pooled_prompt_embeds])
        return Conditioning(torch.cat([self.negative_prompt_embeds, self.prompt_embeds]), pooled)


@dataclass
class _Entry:
    spec: LoraSpec
    adapter: Adapter
    block_weights: dict[str, float] | None


def unsaid_words(cfg: GenerateConfig, entries: list[_Entry]) -> tuple[str, ...]:
    """A hint for each trigger word a LoRA of the stack learnt (bundled embeddings) that no prompt says as a
    word of its own: the LoRA was trained to work with it, and the word is only read where it stands alone."""
    prompts = [cfg.prompt, *(r.prompt for r in cfg.regions)]
    out = []
    for entry in entries:
        for word in entry.adapter.embeddings:
            alone = word_alone(word)
            if not any(alone.search(p) for p in prompts):
                out.append(
                    f"{entry.spec.path.name} learnt the trigger word {word!r}, which the prompt does not say; "
                    "put it in the prompt to get what the LoRA learnt"
                )
    return tuple(out)


def studio_version() -> str:
    try:
        return metadata.version("lora-studio")
    except metadata.PackageNotFoundError:
        return "unknown"


# --------------------------------------------------------------------------------------------------
# the engine


class GenerationEngine:
    """One base model in memory with its cached LoRA adapters; makes images for GenerateConfigs.

    >>> gen = GenerationEngine(pipe, "sd15")  # doctest: +SKIP
    >>> gen.generate(GenerateConfig(prompt="a cat", loras=[LoraSpec(Path("cat.safetensors"), 0.7)]))  # doctest: +SKIP
    """

    def __init__(
        self,
        pipe,
        family: Family,
        *,
        model_label: str = "",
        model_hash: str = "",
        max_adapters: int = 8,
        allow_pickle: bool = False,
    ):
        self.pipe, self.family = pipe, family
        self.model_label, self.model_hash = model_label, model_hash
        self.pool = AdapterPool(pipe, family, max_adapters=max_adapters, allow_pickle=allow_pickle)
        # diffusers' .device / ._execution_device walk every module (~20 ms on SD1.5); the pipeline stays put
        self.device: torch.device = pipe.unet.device
        self.dtype: torch.dtype = pipe.unet.dtype
        self._scheduler_config = dict(pipe.scheduler.config)
        self._last_signature: tuple | None = None
        self._compiled = False
        pipe.set_progress_bar_config(disable=True)
        if self.device.type == "cuda":
            _use_fast_attention(pipe)

    def native_size(self) -> int:
        return int(self.pipe.unet.config.sample_size) * int(self.pipe.vae_scale_factor)

    def generate(self, cfg: GenerateConfig, on_image: Callable[[GeneratedImage], None] | None = None):
        """Make cfg.batch_count images; `on_image` sees each as soon as it is done. Returns them all."""
        # 1. check inputs, load and weight the stack
        entries, fused = self.prepare(cfg)
        # 2. scheduler, size, seeds
        self.pipe.scheduler = make_sampler(cfg.scheduler, self._scheduler_config)
        width, height = cfg.width or self.native_size(), cfg.height or self.native_size()
        first_seed = cfg.seed if cfg.seed >= 0 else random.SystemRandom().randrange(2**32)
        notes = self.notes(cfg, width, height) + unsaid_words(cfg, entries)
        # 3. one image per seed
        results = []
        for i in range(cfg.batch_count):
            seed = first_seed + i
            start = time.perf_counter()
            image, trace = self._denoise(cfg, entries, seed, width, height)
            record = self._record(cfg, entries, seed, width, height, fused, trace)
            result = GeneratedImage(image, seed, record, trace, time.perf_counter() - start, notes=notes)
            if on_image is not None:
                on_image(result)
            results.append(result)
        self._last_signature = _signature(entries)
        return results

    def notes(self, cfg: GenerateConfig, width: int, height: int) -> tuple[str, ...]:
        """Hints on settings that run but may draw poorly: in area mode, a box under half the model's
        native size on a side is drawn as a picture that small, which a model (or LoRA) trained at one size
        draws as a smear (SD1.5 at 256 px; the 128 px demo model drew shapes at chance at 64 px until it was
        trained with size buckets, bench/results/eval_sd15_128.md)."""
        if cfg.region_mode != "area":
            return ()
        native, out = self.native_size(), []
        for n, region in enumerate(cfg.regions, start=1):
            x0, y0, x1, y1 = region.fractions(width, height)
            w, h = round((x1 - x0) * width), round((y1 - y0) * height)
            if min(w, h) < native / 2:
                out.append(
                    f"region {n} is {w}x{h} px in area mode, under half this model's native {native} px: it "
                    "may come out smeared unless the model and the box's LoRA have seen pictures that small "
                    "(extra_resolutions); make the image or the box bigger, or draw regions in mask mode"
                )
        return tuple(out)

    def prepare(self, cfg: GenerateConfig) -> tuple[list[_Entry], bool]:
        """Check cfg, load its LoRAs (cached) and set their weights, fusing when asked, without making an
        image; `generate` starts with this, and a UI may call it when the stack is edited."""
        cfg.check()
        entries = self.resolve_stack(cfg)
        fused = self._apply_stack(cfg, entries)
        if cfg.compile and not self._compiled:
            self.pipe.unet.compile()
            self._compiled = True
        return entries, fused

    # ---------------------------------------------------------------------------------------------
    # the stack

    def resolve_stack(self, cfg: GenerateConfig) -> list[_Entry]:
        """Adapters for every LoRA of cfg's stack (read only on first use) with parsed block weights."""
        entries, seen = [], Counter()
        for spec in cfg.stack():
            path_id = file_key(spec.path)[0]
            adapter = self.pool.load(spec.path, slot=seen[path_id])
            seen[path_id] += 1
            _check_hash(spec, adapter)
            if spec.block_weights in ("CONTENT", "STYLE") and self.family != "sdxl":
                raise ConfigError(f"{spec.path}: B-LoRA content/style blocks exist in SDXL models only.")
            entries.append(_Entry(spec, adapter, self._block_weights(spec, adapter)))
        return entries

    def resolve_regions(
        self, cfg: GenerateConfig, entries: list[_Entry]
    ) -> list[tuple[Region, Adapter | None]]:
        """Each region with the adapter of its LoRA (a file also in the stack gets an adapter of its own)."""
        seen = Counter(file_key(e.spec.path)[0] for e in entries)
        out = []
        for region in cfg.regions:
            adapter = None
            if region.lora is not None:
                path_id = file_key(region.lora.path)[0]
                adapter = self.pool.load(region.lora.path, slot=seen[path_id])
                seen[path_id] += 1
                _check_hash(region.lora, adapter)
            out.append((region, adapter))
        if len(self.pool.adapters) > self.pool.max_adapters:
            raise ConfigError(
                f"the stack and the regions use {len(self.pool.adapters)} LoRAs; at most "
                f"{self.pool.max_adapters} fit at once. Use fewer LoRAs."
            )
        return out

    def _block_weights(self, spec: LoraSpec, adapter: Adapter) -> dict[str, float] | None:
        if spec.block_weights is None:
            return None
        try:
            weights = parse_block_weights(spec.block_weights, self.family)
        except ConfigError as exc:
            raise ConfigError(f"{spec.path}: {exc}") from None
        acting = [block for _, block in adapter.layers if block is None or weights.get(block, 1.0) != 0]
        if spec.weight != 0 and not acting:
            touched = ", ".join(adapter.blocks) or "none"
            raise ConfigError(
                f"{spec.path}: the block weights {spec.block_weights!r} switch off every block this LoRA has "
                f"modules in ({touched}), so it would do nothing. Pick blocks it has, or drop the LoRA."
            )
        return weights

    def _apply_stack(self, cfg: GenerateConfig, entries: list[_Entry]) -> bool:
        """Set the stack's weights (or keep it fused when unchanged); True when the LoRAs are fused."""
        signature = _signature(entries)
        fuse = bool(entries) and cfg.mode == "merge" and cfg.fuse != "off" and not cfg.regions
        if cfg.fuse == "auto":  # fusing pays off on a GPU while the same stack makes several images
            fuse = fuse and self.device.type == "cuda"
            fuse = fuse and (cfg.batch_count > 1 or signature == self._last_signature)
        if fuse and self.pool.fused_signature == signature:
            return True
        self.pool.activate([(e.adapter, e.spec.weight, e.block_weights) for e in entries])
        if fuse:
            self.pool.fuse(signature)
        return fuse

    # ---------------------------------------------------------------------------------------------
    # denoising

    def _denoise(self, cfg, entries, seed, width, height) -> tuple[Image.Image, list[tuple[int, ...]] | None]:
        cfg_on = cfg.cfg > 1 and self.pipe.unet.config.time_cond_proj_dim is None
        call = {
            "num_inference_steps": cfg.steps,
            "guidance_scale": cfg.cfg,
            "width": width,
            "height": height,
            "generator": torch.Generator("cpu").manual_seed(seed),  # same noise on every device
            "output_type": "np",  # checked for NaN before it becomes a picture (see _picture)
        }
        if cfg.regions:
            return self._denoise_regions(cfg, entries, call, cfg_on), None
        if cfg.mode == "merge":
            return _picture(self.pipe(**self.encode(cfg, cfg_on).pipeline_kwargs(), **call).images[0]), None
        names = [e.adapter.name for e in entries]
        embeds = [self.encode(cfg, cfg_on, only=name) for name in names]
        conds = [e.unet_conditioning(cfg_on) for e in embeds]
        if cfg.mode == "switch":
            router = LoraSwitch(self.pool, names, conds, cfg.tau)
            call["callback_on_step_end"] = router.on_step_end
        else:
            router = LoraComposite(self.pool, names, conds, batched=cfg.composite_batched)
        try:
            with router.installed(self.pipe.unet):
                image = _picture(self.pipe(**embeds[0].pipeline_kwargs(), **call).images[0])
        finally:
            self.pool.set_active(names)
        index = {name: i for i, name in enumerate(names)}
        return image, [tuple(sorted(index[n] for n in step)) for step in router.trace]

    def _denoise_regions(
        self, cfg: GenerateConfig, entries: list[_Entry], call: dict, cfg_on: bool
    ) -> Image.Image:
        """The global prompt with the stack, each region's prompt with the stack and its LoRA (composition's
        RegionalSampler), the text encoders included."""
        stack = [(e.adapter, e.spec.weight, e.block_weights) for e in entries]
        regions = self.resolve_regions(cfg, entries)
        stacks = [stack] + [stack + ([(a, r.lora.weight, None)] if a else []) for r, a in regions]
        boxes = [r.fractions(call["width"], call["height"]) for r, _ in regions]

        def activate(branch: int, words: bool = False) -> None:  # the prompts' words only when encoding
            self.pool.activate(stacks[branch], evict=False, words=words)

        embeds = []
        for branch, prompt in enumerate([cfg.prompt] + [r.prompt for r, _ in regions]):
            activate(branch, words=True)
            embeds.append(self.encode(cfg, cfg_on, prompt=prompt))
        router = RegionalSampler(
            activate, [e.unet_conditioning(cfg_on) for e in embeds], boxes, cfg.region_base,
            area=cfg.region_mode == "area",
        )  # fmt: skip
        try:
            with router.installed(self.pipe.unet):
                return _picture(self.pipe(**embeds[0].pipeline_kwargs(), **call).images[0])
        finally:
            activate(0, words=True)

    @torch.no_grad()
    def encode(
        self, cfg: GenerateConfig, cfg_on: bool, only: str | None = None, prompt: str | None = None
    ) -> PromptEmbeds:
        """Encode the prompt (cfg's, or `prompt`) with the stack's text-encoder parts (or with adapter
        `only`'s alone)."""
        if only is not None:
            self.pool.set_active([only], TEXT_ENCODERS)
        try:
            out = self.pipe.encode_prompt(
                prompt=cfg.prompt if prompt is None else prompt,
                device=self.device,
                num_images_per_prompt=1,
                do_classifier_free_guidance=cfg_on,
                negative_prompt=cfg.negative_prompt or None,
                clip_skip=cfg.clip_skip - 1 or None,
            )
        finally:
            if only is not None:
                self.pool.set_active(self.pool.stack_names, TEXT_ENCODERS)
        return PromptEmbeds(*out)

    # ---------------------------------------------------------------------------------------------
    # the record written into each PNG

    def _record(self, cfg, entries, seed, width, height, fused, trace) -> dict:
        loras = []
        for e in entries:
            text = e.spec.block_weights
            if e.block_weights is not None and not (isinstance(text, str) and PRESET_NAME.fullmatch(text)):
                text = format_block_weights(e.block_weights, self.family)
            loras.append(
                {
                    "path": str(e.adapter.path),
                    "sha256": e.adapter.sha256,
                    "weight": e.spec.weight,
                    "block_weights": e.block_weights,
                    "block_weights_text": text,
                }
            )
        return {
            "format": RECORD_FORMAT,
            "version": RECORD_VERSION,
            "studio_version": studio_version(),
            "prompt": cfg.prompt,
            "negative_prompt": cfg.negative_prompt,
            "model": {"path": self.model_label, "hash": self.model_hash, "family": self.family},
            "loras": loras,
            "mode": cfg.mode,
            "tau": cfg.tau,
            "composite_batched": cfg.composite_batched,
            "scheduler": scheduler_name(cfg.scheduler),
            "steps": cfg.steps,
            "cfg": cfg.cfg,
            "seed": seed,
            "width": width,
            "height": height,
            "clip_skip": cfg.clip_skip,
            "device": self.device.type,
            "dtype": DTYPE_NAMES.get(self.dtype, str(self.dtype)),
            "fused": fused,
            "trace": trace,
            **self._regions_record(cfg, entries),
        }

    def _regions_record(self, cfg: GenerateConfig, entries: list[_Entry]) -> dict:
        if not cfg.regions:
            return {}
        regions = []
        for region, adapter in self.resolve_regions(cfg, entries):
            lora = None
            if adapter is not None:
                lora = {"path": str(adapter.path), "sha256": adapter.sha256, "weight": region.lora.weight}
            regions.append({"box": list(region.box), "prompt": region.prompt, "lora": lora})
        return {"regions": regions, "region_base": cfg.region_base, "region_mode": cfg.region_mode}


def _picture(pixels: np.ndarray) -> Image.Image:
    """The image of an (H, W, 3) array in [0, 1]; NaN / inf pixels would silently turn black, so they stop here."""
    if not np.isfinite(pixels).all():
        raise StudioError(
            "the image came out as NaN (not a number): a LoRA's values are too large for this model, or the "
            "base model overflows in this precision. Lower the LoRA weights, or try dtype fp32."
        )
    return Image.fromarray((np.clip(pixels, 0, 1) * 255).round().astype(np.uint8))


def _check_hash(spec: LoraSpec, adapter: Adapter) -> None:
    if spec.sha256 and adapter.sha256 != spec.sha256:
        raise BadFileError(
            f"{spec.path}: this file has changed since the image was made (sha256 {adapter.sha256[:12]}, "
            f"expected {spec.sha256[:12]}); the image cannot be reproduced with it."
        )


def _signature(entries: list[_Entry]) -> tuple:
    """What a fused stack is: adapters, weights and block weights."""
    return tuple(
        (e.adapter.name, e.spec.weight, tuple(sorted(e.block_weights.items())) if e.block_weights else None)
        for e in entries
    )


def _use_fast_attention(pipe) -> None:
    """xformers when installed, else PyTorch SDPA (diffusers' default attention processor)."""
    try:
        import xformers  # noqa: F401
    except ImportError:
        return
    try:
        pipe.enable_xformers_memory_efficient_attention()
    except Exception:  # an xformers build that does not match this torch/GPU: SDPA stays
        pass
