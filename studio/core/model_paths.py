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


def demo_model_path(family: str = "sd15") -> Path:
    """The diffusers folder of the built-in demo model of `family` ("sd15" or "sdxl").

    >>> demo_model_path("sd15").name
    'sd15'

    Raises StudioError if the weights are not in the installed package.
    """
    folder = DEMO_WEIGHTS / check_family(family)
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
