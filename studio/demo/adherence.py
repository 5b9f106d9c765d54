"""Prompt adherence of a pipeline on the demo world, judged by the world judges.

    >>> from studio.demo.adherence import measure_adherence
    >>> from studio.demo.pipelines import load_demo_pipeline
    >>> report = measure_adherence(load_demo_pipeline("sd15"), n=64, seed=1000)
    >>> report["accuracy"]["shape"], report["chance"]["shape"]

Prompts are canonical captions of world specs drawn with `seed` (choose a seed the model was not trained
with: the demo models use seeds 0 and 1). The same specs are also rendered exactly, and the judges'
accuracy on those real images is reported as the ceiling.
"""

from __future__ import annotations

import time
from collections.abc import Sequence

import torch
from PIL import Image

from studio.demo.classifiers import Judges, load_judges
from studio.demo.world import IMAGE_SIZE, Spec, world_for

JUDGED = ("shape", "colour", "background", "style")


def chance_levels(specs: Sequence[Spec]) -> dict[str, float]:
    """Accuracy of guessing the most common value of each attribute among `specs`."""
    levels = {}
    for name in JUDGED:
        values = [getattr(s, name) for s in specs]
        levels[name] = max(values.count(v) for v in set(values)) / len(values)
    return levels


def accuracy(judges: Judges, images: Sequence[Image.Image], specs: Sequence[Spec]) -> dict[str, float]:
    """Share of images whose judged attribute equals the spec's, per attribute, plus all three of
    shape/colour/background at once ("all")."""
    verdict = judges.judge(images)
    hits = {name: [p == getattr(s, name) for p, s in zip(verdict[name].labels, specs)] for name in JUDGED}
    result = {name: sum(h) / len(h) for name, h in hits.items()}
    result["all"] = sum(
        a and b and c for a, b, c in zip(hits["shape"], hits["colour"], hits["background"])
    ) / len(specs)
    return result


@torch.no_grad()
def generate(
    pipe,
    prompts: Sequence[str],
    seed: int,
    steps: int = 20,
    guidance: float = 7.5,
    batch: int = 8,
    size: int = IMAGE_SIZE,
) -> list[Image.Image]:
    """`size` px images for `prompts`, batch by batch, each batch with its own seeded generator."""
    images: list[Image.Image] = []
    for i in range(0, len(prompts), batch):
        gen = torch.Generator().manual_seed(seed + i)
        out = pipe(
            prompt=list(prompts[i : i + batch]),
            height=size,
            width=size,
            num_inference_steps=steps,
            guidance_scale=guidance,
            generator=gen,
        )
        images.extend(out.images)
    return images


def measure_adherence(
    pipe,
    n: int = 64,
    seed: int = 1000,
    split: str = "base",
    steps: int = 20,
    guidance: float = 7.5,
    judges: Judges | None = None,
    return_images: bool = False,
    image_size: int = IMAGE_SIZE,
) -> dict:
    """Generate `n` images for one-shape captions of the `image_size` px world drawn with `seed` and judge
    them.

    Returns {"accuracy": {...}, "chance": {...}, "real_accuracy": {...}, "seconds_per_image", settings};
    with `return_images` also "images" and "prompts".
    """
    judges = judges or load_judges(image_size=image_size)
    world = world_for(image_size).singles()
    specs = world.sample(seed, n, split)
    prompts = [world.caption(s) for s in specs]
    started = time.time()
    images = generate(pipe, prompts, seed, steps=steps, guidance=guidance, size=image_size)
    seconds = (time.time() - started) / n
    report = {
        "n": n,
        "seed": seed,
        "split": split,
        "steps": steps,
        "guidance": guidance,
        "scheduler": type(pipe.scheduler).__name__,
        "accuracy": accuracy(judges, images, specs),
        "chance": chance_levels(specs),
        "real_accuracy": accuracy(judges, [world.render(s) for s in specs], specs),
        "seconds_per_image": round(seconds, 3),
    }
    if return_images:
        report |= {"images": images, "prompts": prompts}
    return report


def image_grid(images: Sequence[Image.Image], columns: int = 8) -> Image.Image:
    """Paste images into one grid image (for looking at samples)."""
    w, h = images[0].size
    rows = (len(images) + columns - 1) // columns
    grid = Image.new("RGB", (columns * w, rows * h), (128, 128, 128))
    for i, im in enumerate(images):
        grid.paste(im, ((i % columns) * w, (i // columns) * h))
    return grid
