"""Image generation with a stack of LoRAs for SD1.5 and SDXL: merge, switch and composite.

The base model stays loaded between calls and every LoRA file becomes a cached peft adapter
(adapters.py), so changing weights or block weights between images re-reads nothing. Modes: `merge` adds
all LoRAs (weighted); `switch` and `composite` are the multi-LoRA methods of Zhong et al. (composition.py).
B-LoRA halves are picked with the CONTENT / STYLE block presets. Every image carries the record that makes
it again (records.py).

    from studio.generation import GenerateConfig, GenerationService
    images = GenerationService().generate(GenerateConfig(prompt="a red circle on a blue background"))
"""

from studio.generation.config import GenerateConfig, LoraSpec, config_from_record
from studio.generation.engine import GeneratedImage, GenerationEngine
from studio.generation.service import GenerationService

__all__ = [
    "GenerateConfig", "GeneratedImage", "GenerationEngine", "GenerationService", "LoraSpec", "config_from_record",
]  # fmt: skip
