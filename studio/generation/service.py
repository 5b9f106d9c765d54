"""Generation for the CLI and the UI: one loaded base model kept between calls, images saved with records.

service = GenerationService()
cfg = GenerateConfig(model="my_model.safetensors", prompt="a red fox in the snow",
                     loras=[LoraSpec.parse("fox.safetensors:0.8:OUTALL")], steps=20, seed=42)
images = service.generate(cfg)           # saved as PNGs in cfg.out, parameters inside
"""

from __future__ import annotations

from collections.abc import Callable

from studio.core.devices import pick_device_dtype
from studio.core.errors import StudioError
from studio.core.model_paths import resolve_model
from studio.core.models import load_base
from studio.generation.config import GenerateConfig
from studio.generation.engine import GeneratedImage, GenerationEngine
from studio.generation.records import save_png


class GenerationService:
    """Generation for the CLI and the UI: keeps the last base model and its LoRA adapters loaded."""

    def __init__(self, max_adapters: int = 8):
        self.max_adapters = max_adapters
        self._generator: GenerationEngine | None = None
        self._key: tuple | None = None

    def generator_for(self, cfg: GenerateConfig) -> GenerationEngine:
        """The engine for cfg's base model, device and dtype: reused when they match the last call's."""

        path, label = resolve_model(cfg.model)
        device, dtype = pick_device_dtype(
            None if cfg.device == "auto" else cfg.device, None if cfg.dtype == "auto" else cfg.dtype
        )
        stamp = path.stat().st_mtime_ns if path.exists() else None
        key = (str(path.resolve()), stamp, str(device), dtype, cfg.allow_pickle)
        if key != self._key:
            self._generator = self._key = None  # let the previous model go before loading the next
            loaded = load_base(path, device=device, dtype=dtype, allow_pickle=cfg.allow_pickle)
            self._generator = GenerationEngine(
                loaded.pipe,
                loaded.family,
                model_label=label,
                model_hash=loaded.model_hash,
                max_adapters=self.max_adapters,
                allow_pickle=cfg.allow_pickle,
            )
            self._key = key
        if cfg.expect_model_hash and cfg.expect_model_hash != self._generator.model_hash:
            raise StudioError(
                f"{label}: this base model is not the one the image was made with (hash "
                f"{self._generator.model_hash[:10]}, expected {cfg.expect_model_hash[:10]}). "
                "Pass --model with the original model."
            )
        return self._generator

    def generate(
        self, cfg: GenerateConfig, on_image: Callable[[GeneratedImage], None] | None = None, save: bool = True
    ) -> list[GeneratedImage]:
        """Make the images of `cfg`; with save, each is written to cfg.out as soon as it is done."""
        cfg.check()

        def done(result: GeneratedImage) -> None:
            if save:
                result.path = save_png(result.image, result.record, cfg.out)
            if on_image is not None:
                on_image(result)

        return self.generator_for(cfg).generate(cfg, on_image=done)
