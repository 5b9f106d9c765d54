"""Where the built-in demo models live, with no heavy imports (no torch, no diffusers)."""

from __future__ import annotations

from pathlib import Path

from studio.errors import ConfigError, StudioError

FAMILIES: tuple[str, ...] = ("sd15", "sdxl")
WEIGHTS_DIR = Path(__file__).resolve().parent / "weights"


def check_family(family: str) -> str:
    """Return `family` if known, else raise a ConfigError naming the choices."""
    if family not in FAMILIES:
        raise ConfigError(f"Unknown model family {family!r}; choose one of {', '.join(FAMILIES)}.")
    return family


def demo_model_path(family: str = "sd15") -> Path:
    """The diffusers folder of the built-in demo model of `family` ("sd15" or "sdxl").

    >>> demo_model_path("sd15").name
    'sd15'

    Raises StudioError if the weights are not in the installed package.
    """
    folder = WEIGHTS_DIR / check_family(family)
    if not (folder / "model_index.json").is_file():
        raise StudioError(
            f"The built-in {family} demo model is missing from {folder}. Reinstall LoRA Studio, or train it with "
            f"`python -m studio.demo.train_base --family {family} --out {folder} --work <scratch folder>`."
        )
    return folder


def resolve_model(model: str | None) -> tuple[Path, str]:
    """(path, label) of a base model argument; None, "" or "demo:sd15" / "demo:sdxl" mean a built-in demo model."""
    if model and not model.startswith("demo:"):
        return Path(model).expanduser(), model
    family = model.removeprefix("demo:") if model else "sd15"
    try:
        return demo_model_path(family), f"demo:{family}"
    except StudioError:
        raise ConfigError(
            f"no base model given and the built-in {family} demo model is not installed; "
            "pass --model with a diffusers folder or a .safetensors checkpoint."
        ) from None
