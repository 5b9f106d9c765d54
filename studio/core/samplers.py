"""Samplers by the names A1111 shows, built from a model's own scheduler config.

    >>> make_sampler("DPM++ 2M Karras", pipe.scheduler.config)  # doctest: +SKIP
    DPMSolverMultistepScheduler {... "use_karras_sigmas": true ...}

Each name maps to a diffusers scheduler class and the options that make it behave like A1111's sampler
(the mapping diffusers documents for A1111 users). The model's own config supplies the noise schedule
(betas, prediction type, timestep spacing), so a fine-tune's schedule is kept.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from studio.core.errors import ConfigError

_DPM = {"algorithm_type": "dpmsolver++", "solver_order": 2}
# name -> (diffusers scheduler class name, options); classes are imported when a sampler is made, so
# checking a name costs no diffusers import
SCHEDULERS: dict[str, tuple[str, dict[str, Any]]] = {
    "Euler": ("EulerDiscreteScheduler", {"use_karras_sigmas": False}),
    "Euler a": ("EulerAncestralDiscreteScheduler", {}),
    "DPM++ 2M": ("DPMSolverMultistepScheduler", _DPM | {"use_karras_sigmas": False}),
    "DPM++ 2M Karras": ("DPMSolverMultistepScheduler", _DPM | {"use_karras_sigmas": True}),
    "DPM++ 2M SDE Karras": (
        "DPMSolverMultistepScheduler",
        _DPM | {"algorithm_type": "sde-dpmsolver++", "use_karras_sigmas": True},
    ),
    "DDIM": ("DDIMScheduler", {}),
    "UniPC": ("UniPCMultistepScheduler", {"use_karras_sigmas": False}),
}


def scheduler_name(name: str) -> str:
    """The canonical spelling of a sampler name (case and spaces are forgiven), or a ConfigError.

    >>> scheduler_name("dpm++ 2m  karras")
    'DPM++ 2M Karras'
    """
    wanted = " ".join(str(name).split()).lower()
    for known in SCHEDULERS:
        if known.lower() == wanted:
            return known
    raise ConfigError(f"unknown scheduler {name!r}; choose one of: {', '.join(SCHEDULERS)}")


def make_sampler(name: str, base_config: Mapping[str, Any]):
    """A fresh scheduler of kind `name` with the noise schedule of `base_config` (a model's scheduler config)."""
    import diffusers

    class_name, options = SCHEDULERS[scheduler_name(name)]
    cls = getattr(diffusers, class_name)
    config = {k: v for k, v in base_config.items() if not k.startswith("_")}
    config.pop("use_karras_sigmas", None)
    if class_name == "DDIMScheduler":
        config["clip_sample"] = False  # latent diffusion never clips; DDIM's own default would
    return cls.from_config({**config, **options})
