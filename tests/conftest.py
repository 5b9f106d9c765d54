"""Shared fixtures: tiny SD1.5 / SDXL pipelines built from configs, saved as folders and single files.

The session-scoped pipelines are shared by many tests: never change them (no adapters, no .to(dtype),
no scheduler swaps). Ask for `fresh_sd15` / `fresh_sdxl` for a private copy you may modify.
"""

from __future__ import annotations

import os

# Before anything imports huggingface_hub: any attempt to reach the hub fails instead of downloading.
os.environ["HF_HUB_OFFLINE"] = "1"

import copy  # noqa: E402
from pathlib import Path  # noqa: E402

import pytest  # noqa: E402
import torch  # noqa: E402

from studio.core.checkpoints import save_single_file  # noqa: E402
from studio.core.tokenizers import SDXL_PAD_2, clip_tokenizer  # noqa: E402
from tests.fixtures.tiny import save_tiny, tiny_config_dir, tiny_sd15_pipeline, tiny_sdxl_pipeline  # noqa: E402

# Tiny models are dominated by per-op overhead: extra threads only contend on a shared 2-core machine
# (measured: a 2-step tiny generation takes ~0.2 s with one thread, often >1 s with two under load).
torch.set_num_threads(int(os.environ.get("LORA_STUDIO_TEST_THREADS", "1")))


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """Slow tests first (with two workers, the other one runs everything else meanwhile); skip tests marked
    `gpu` when no CUDA device is present."""
    items.sort(key=lambda item: "slow" not in item.keywords)
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(autouse=True)
def _seed() -> None:
    """Every test starts from the same global RNG state."""
    torch.manual_seed(0)


def fresh_copy(pipe):
    """A deep copy of a tiny pipeline; tokenizers are reloaded (5x faster than deep-copying them)."""
    memo = {id(pipe.tokenizer): clip_tokenizer()}
    if getattr(pipe, "tokenizer_2", None) is not None:
        memo[id(pipe.tokenizer_2)] = clip_tokenizer(SDXL_PAD_2)
    return copy.deepcopy(pipe, memo)


# --- pipelines ------------------------------------------------------------------------------------


@pytest.fixture(scope="session")
def tiny_sd15():
    """Shared tiny SD1.5 pipeline (seed 0). Read-only."""
    return tiny_sd15_pipeline(seed=0)


@pytest.fixture(scope="session")
def tiny_sdxl():
    """Shared tiny SDXL pipeline (seed 0). Read-only."""
    return tiny_sdxl_pipeline(seed=0)


@pytest.fixture
def fresh_sd15(tiny_sd15):
    """A private copy of the tiny SD1.5 pipeline, same weights; modify freely."""
    return fresh_copy(tiny_sd15)


@pytest.fixture
def fresh_sdxl(tiny_sdxl):
    """A private copy of the tiny SDXL pipeline, same weights; modify freely."""
    return fresh_copy(tiny_sdxl)


# --- files on disk ---------------------------------------------------------------------------------


@pytest.fixture(scope="session")
def tiny_sd15_dir(tiny_sd15, tmp_path_factory) -> Path:
    """The tiny SD1.5 pipeline saved as a diffusers folder."""
    return save_tiny(tiny_sd15, tmp_path_factory.mktemp("tiny_sd15") / "model")


@pytest.fixture(scope="session")
def tiny_sdxl_dir(tiny_sdxl, tmp_path_factory) -> Path:
    """The tiny SDXL pipeline saved as a diffusers folder."""
    return save_tiny(tiny_sdxl, tmp_path_factory.mktemp("tiny_sdxl") / "model")


@pytest.fixture(scope="session")
def tiny_sd15_config(tmp_path_factory) -> Path:
    """Config-only folder of the tiny SD1.5 model: pass as load_base(..., config_dir=)."""
    return tiny_config_dir("sd15", tmp_path_factory.mktemp("tiny_sd15_config"))


@pytest.fixture(scope="session")
def tiny_sdxl_config(tmp_path_factory) -> Path:
    """Config-only folder of the tiny SDXL model: pass as load_base(..., config_dir=)."""
    return tiny_config_dir("sdxl", tmp_path_factory.mktemp("tiny_sdxl_config"))


@pytest.fixture(scope="session")
def tiny_sd15_file(tiny_sd15, tmp_path_factory) -> Path:
    """The tiny SD1.5 pipeline as a single-file checkpoint in the original (A1111/ComfyUI) layout."""
    return save_single_file(
        tiny_sd15, tmp_path_factory.mktemp("tiny_sd15_file") / "tiny_sd15.safetensors", "sd15"
    )


@pytest.fixture(scope="session")
def tiny_sdxl_file(tiny_sdxl, tmp_path_factory) -> Path:
    """The tiny SDXL pipeline as a single-file checkpoint in the original (A1111/ComfyUI) layout."""
    return save_single_file(
        tiny_sdxl, tmp_path_factory.mktemp("tiny_sdxl_file") / "tiny_sdxl.safetensors", "sdxl"
    )
