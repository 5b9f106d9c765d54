"""The model families the studio knows and the names of their adaptable components.

>>> check_family("sdxl")
'sdxl'
>>> FAMILY_NAMES["sd15"]
'Stable Diffusion 1.5'
"""

from __future__ import annotations

from typing import Literal

from studio.core.errors import ConfigError

Family = Literal["sd15", "sdxl"]
FAMILIES: tuple[Family, ...] = ("sd15", "sdxl")
FAMILY_NAMES: dict[str, str] = {"sd15": "Stable Diffusion 1.5", "sdxl": "SDXL"}

TEXT_ENCODERS: tuple[str, ...] = ("text_encoder", "text_encoder_2")
# The pipeline components a LoRA can adapt, in the order files list them.
COMPONENTS: tuple[str, ...] = ("unet", *TEXT_ENCODERS)


def check_family(family: str) -> Family:
    """`family` if it is one the studio knows, else a ConfigError naming the choices."""
    if family not in FAMILIES:
        raise ConfigError(f"unknown model family {family!r}; choose one of {', '.join(FAMILIES)}.")
    return family  # type: ignore[return-value]
