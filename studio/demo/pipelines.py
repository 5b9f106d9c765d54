"""Assemble and load the demo models as ordinary diffusers pipelines.

>>> from studio.demo.pipelines import load_demo_pipeline
>>> pipe = load_demo_pipeline("sd15")
>>> image = pipe("a red circle on a blue background", num_inference_steps=20).images[0]   # 64 x 64
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from diffusers import (
    DiffusionPipeline,
    DPMSolverMultistepScheduler,
    EulerDiscreteScheduler,
    StableDiffusionPipeline,
    StableDiffusionXLPipeline,
)

from studio.core.model_paths import demo_model_path
from studio.demo.architectures import train_scheduler


def load_demo_pipeline(name: str = "sd15", dtype: torch.dtype = torch.float32) -> DiffusionPipeline:
    """A demo model ("sd15", "sdxl", "sd15-128", "sdxl-128") as a StableDiffusionPipeline /
    StableDiffusionXLPipeline, loaded offline."""
    cls = StableDiffusionPipeline if name.startswith("sd15") else StableDiffusionXLPipeline
    pipe = cls.from_pretrained(demo_model_path(name), torch_dtype=dtype, local_files_only=True)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def encode_text(
    text_encoders: Sequence[torch.nn.Module], ids: Sequence[torch.Tensor], family: str
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Prompt embeddings exactly as the diffusers pipelines compute them (and SDXL's pooled embedding)."""
    if family == "sd15":
        return text_encoders[0](ids[0])[0], None
    first = text_encoders[0](ids[0], output_hidden_states=True)
    second = text_encoders[1](ids[1], output_hidden_states=True)
    embeds = torch.cat([first.hidden_states[-2], second.hidden_states[-2]], dim=-1)
    return embeds, second.text_embeds


def time_ids(batch: int, size: int | tuple[int, int] = 64) -> torch.Tensor:
    """SDXL size conditioning: (original h, w, crop top, left, target h, w) for uncropped `size` (or
    (width, height)) images."""
    width, height = (size, size) if isinstance(size, int) else size
    return torch.tensor([[height, width, 0, 0, height, width]], dtype=torch.float32).repeat(batch, 1)


def assemble_pipeline(family: str, vae: torch.nn.Module, parts: dict) -> DiffusionPipeline:
    """Put trained parts into the family's pipeline with its usual scheduler (DPM++ 2M / Euler)."""
    config = train_scheduler().config
    tokenizers = parts["tokenizers"]
    if family == "sd15":
        return StableDiffusionPipeline(
            vae=vae,
            text_encoder=parts["text_encoder"],
            tokenizer=tokenizers[0],
            unet=parts["unet"],
            scheduler=DPMSolverMultistepScheduler.from_config(config),
            safety_checker=None,
            feature_extractor=None,
            requires_safety_checker=False,
        )
    return StableDiffusionXLPipeline(
        vae=vae,
        text_encoder=parts["text_encoder"],
        text_encoder_2=parts["text_encoder_2"],
        tokenizer=tokenizers[0],
        tokenizer_2=tokenizers[1],
        unet=parts["unet"],
        scheduler=EulerDiscreteScheduler.from_config(config, timestep_spacing="leading"),
        force_zeros_for_empty_prompt=True,
        add_watermarker=False,
    )
