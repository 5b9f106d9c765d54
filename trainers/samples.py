"""Images rendered by the base pipeline during training: sample images and DreamBooth class images.

Sampling never disturbs training: it runs under torch.no_grad with the global RNG forked, and every image
has its own fixed-seed generator, so a resumed run trains exactly like an uninterrupted one.
"""

from __future__ import annotations

from pathlib import Path

import torch
from PIL import Image
from tqdm.auto import tqdm

from studio.core.images import image_files
from studio.core.io import write_png


def render(pipe, prompt: str, *, seed: int, steps: int, guidance: float, size: int) -> Image.Image:
    """One image from the pipeline with a fixed seed (CPU generator: same image on any device)."""
    with torch.random.fork_rng(devices=[]), torch.no_grad():
        generator = torch.Generator("cpu").manual_seed(seed)
        return pipe(
            prompt,
            num_inference_steps=steps,
            guidance_scale=guidance,
            generator=generator,
            height=size,
            width=size,
        ).images[0]


def render_samples(pipe, prompts: list[str], folder: Path, step: int, *, seed: int, steps: int,
                   guidance: float, size: int) -> list[Path]:  # fmt: skip
    """Sample images for `step`: <folder>/step-000100-0.png, one per prompt, seed + prompt index."""
    pipe.set_progress_bar_config(disable=True)
    unet = pipe.unet
    was_training = unet.training
    unet.eval()
    try:
        paths = []
        for i, prompt in enumerate(prompts):
            image = render(pipe, prompt, seed=seed + i, steps=steps, guidance=guidance, size=size)
            text = {"studio_sample": f"step {step}", "prompt": prompt, "seed": str(seed + i)}
            paths.append(write_png(image, folder / f"step-{step:06d}-{i}.png", text))
        return paths
    finally:
        unet.train(was_training)


def generate_class_images(pipe, prompt: str, folder: Path, count: int, *, seed: int, steps: int, size: int,
                          progress: bool = True) -> list[Path]:  # fmt: skip
    """Fill `folder` up to `count` images of `prompt` (images already there count), as DreamBooth does."""
    folder.mkdir(parents=True, exist_ok=True)
    have = len(image_files(folder))
    pipe.set_progress_bar_config(disable=True)
    made = []
    for i in tqdm(range(have, count), desc="class images", disable=not progress or have >= count):
        image = render(pipe, prompt, seed=seed + i, steps=steps, guidance=7.0, size=size)
        made.append(write_png(image, folder / f"class-{i:05d}.png"))
    return made
