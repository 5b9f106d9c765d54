"""Fixtures for training tests: tiny real pipelines (fresh per test: training adds adapters) and image folders."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from PIL import Image

from tests.fixtures.tiny import save_tiny, tiny_sd15_pipeline, tiny_sdxl_pipeline

# Tiny models are dominated by per-op overhead; extra threads only contend on a shared 2-core machine.
torch.set_num_threads(1)

TINY = {
    "resolution": 64,
    "bucket_step": 64,
    "min_bucket_reso": 64,
    "max_bucket_reso": 128,
    "progress_bar": False,
}


def make_images(folder: Path, n: int = 3, captions: dict[int, str] | None = None, size=(64, 64)) -> Path:
    """Small coloured images with a shape, so the VAE sees structure; optional caption files."""
    folder.mkdir(parents=True, exist_ok=True)
    for i in range(n):
        img = Image.new("RGB", size, (30 + 70 * i % 255, 90, 200 - 40 * i % 200))
        for x in range(8 + 4 * i, 40 + 4 * i):
            for y in range(16, 48):
                img.putpixel((x % size[0], y % size[1]), (240, 220, 30))
        img.save(folder / f"img_{i}.png")
    for i, text in (captions or {}).items():
        (folder / f"img_{i}.txt").write_text(text)
    return folder


@pytest.fixture
def images(tmp_path: Path) -> Path:
    return make_images(tmp_path / "images", 3, {0: "sks, dog, grass", 1: "sks, dog, sofa"})


@pytest.fixture
def fresh_sd15_pipe():
    return tiny_sd15_pipeline(seed=0)


@pytest.fixture
def fresh_sdxl_pipe():
    return tiny_sdxl_pipeline(seed=0)


@pytest.fixture(scope="session")
def sd15_dir(tmp_path_factory) -> Path:
    return save_tiny(tiny_sd15_pipeline(seed=0), tmp_path_factory.mktemp("tiny") / "sd15")


@pytest.fixture(scope="session")
def sdxl_dir(tmp_path_factory) -> Path:
    return save_tiny(tiny_sdxl_pipeline(seed=0), tmp_path_factory.mktemp("tiny") / "sdxl")
