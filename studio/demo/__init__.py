"""The built-in demo world and the small base models trained on it.

`demo_model_path("sd15")` / `demo_model_path("sdxl")` give the shipped diffusers folders; `WORLD` draws the
images they were trained on; `studio.demo.classifiers` judges what an image shows.
"""

from typing import Any

from studio.core.families import FAMILIES
from studio.core.model_paths import demo_model_path
from studio.demo.world import (
    ATTRIBUTES,
    BACKGROUNDS,
    BASE_SHAPES,
    BASE_STYLES,
    COLOURS,
    HOLDOUT_SHAPES,
    HOLDOUT_STYLES,
    SHAPES,
    SPLITS,
    STYLES,
    WORLD,
    Sample,
    Spec,
    World,
)

__all__ = [
    "ATTRIBUTES",
    "BACKGROUNDS",
    "BASE_SHAPES",
    "BASE_STYLES",
    "COLOURS",
    "HOLDOUT_SHAPES",
    "HOLDOUT_STYLES",
    "SHAPES",
    "SPLITS",
    "STYLES",
    "WORLD",
    "Sample",
    "Spec",
    "World",
    "FAMILIES",
    "demo_model_path",
    "load_demo_pipeline",
]


def __getattr__(name: str) -> Any:
    # load_demo_pipeline needs diffusers; import it only when asked so the world stays a light import
    if name == "load_demo_pipeline":
        from studio.demo.pipelines import load_demo_pipeline

        return load_demo_pipeline
    raise AttributeError(name)
