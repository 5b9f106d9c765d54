"""Where base models are: a user's path, or the built-in demo models, named without loading anything.

>>> resolve_model("demo:sdxl")[1]
'demo:sdxl'
"""

from __future__ import annotations

from pathlib import Path

from studio.core.errors import ConfigError, StudioError
from studio.core.families import check_family

# The built-in demo models (trained on the demo world, see studio.demo) ship as diffusers folders here.
DEMO_WEIGHTS = Path(__file__).resolve().parents[1] / "demo" / "weights"


# name after "demo:" -> (family, image size); the 128 px models are the larger world of `lora-studio eval`
DEMO_MODELS = {
    "sd15": ("sd15", 64),
    "sdxl": ("sdxl", 64),
    "sd15-128": ("sd15", 128),
    "sdxl-128": ("sdxl", 128),
}


def demo_model_name(family: str, image_size: int = 64) -> str:
    """The demo model of a family and world size: ("sd15", 128) -> "sd15-128"."""
    for name, key in DEMO_MODELS.items():
        if key == (family, image_size):
            return name
    check_family(family)
    sizes = sorted({size for _, size in DEMO_MODELS.values()})
    raise ConfigError(f"no {family} demo model at {image_size} px; choose {' or '.join(map(str, sizes))}")


def demo_model_path(name: str = "sd15") -> Path:
    """The diffusers folder of a built-in demo model: "sd15", "sdxl" (64 px), "sd15-128" or "sdxl-128".

    >>> demo_model_path("sd15").name
    'sd15'

    Raises StudioError if the weights are not in the installed package.
    """
    if name not in DEMO_MODELS:
        check_family(name)  # the family names' own message for a misspelt family
        raise ConfigError(f"unknown demo model {name!r}; choose one of {', '.join(DEMO_MODELS)}")
    folder = DEMO_WEIGHTS / name
    if not (folder / "model_index.json").is_file():
        family, size = DEMO_MODELS[name]
        raise StudioError(
            f"The built-in {name} demo model is missing from {folder}. Reinstall LoRA Studio, or train it with "
            f"`python -m studio.demo.train_base --family {family} --image-size {size} --out {folder} "
            "--work <scratch folder>`."
        )
    return folder


def resolve_model(model: str | None) -> tuple[Path, str]:
    """(path, label) of a base model argument; None, "" or "demo:<name>" mean a built-in demo model."""
    if model and not model.startswith("demo:"):
        return Path(model).expanduser(), model
    name = model.removeprefix("demo:") if model else "sd15"
    try:
        return demo_model_path(name), f"demo:{name}"
    except StudioError as exc:
        if name in DEMO_MODELS:
            raise ConfigError(
                f"the built-in {name} demo model is not installed; "
                "pass --model with a diffusers folder or a .safetensors checkpoint."
            ) from None
        raise exc from None
