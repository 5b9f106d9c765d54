"""Image generation with a stack of LoRAs for SD1.5 and SDXL: merge, switch and composite.

The base model stays loaded between calls and every LoRA file becomes a cached adapter (adapters.py), so
changing weights or block weights between images re-reads nothing. Modes: `merge` adds all LoRAs
(weighted); `switch` and `composite` are the multi-LoRA methods of Zhong et al. (composition.py). B-LoRA
halves are picked with the CONTENT / STYLE block presets. Every image carries the record that makes it
again (records.py).

    from studio.generation import GenerateConfig, GenerationService
    images = GenerationService().generate(GenerateConfig(prompt="a red circle on a blue background"))

The names are loaded on first use (PEP 562): the options (studio.generation.config) cost no torch import.
"""

from studio.core.lazy import lazy_names

_HOMES = {
    "GenerateConfig": "studio.generation.config", "LoraSpec": "studio.generation.config",
    "config_from_record": "studio.generation.config", "GeneratedImage": "studio.generation.engine",
    "GenerationEngine": "studio.generation.engine", "GenerationService": "studio.generation.service",
}  # fmt: skip
__all__ = sorted(_HOMES)

__getattr__ = lazy_names("studio.generation", _HOMES)
