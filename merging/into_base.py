"""Add a LoRA (or a merge result) into a base model's weights and save a single-file checkpoint.

The arithmetic is studio.core.lora_files.apply_to_pipeline (W += delta for every module, in float32, then cast
to the weight's dtype); the file is written by studio.core.models.save_single_file in the original layout that
A1111, ComfyUI and diffusers' from_single_file read.

    >>> merge_into_base(lora, model.pipe, "sd15", "my_model.safetensors")  # doctest: +SKIP
"""

from __future__ import annotations

from pathlib import Path

import torch

from studio.core.checkpoints import save_single_file
from studio.core.families import Family
from studio.core.lora_files import LoraSet
from studio.core.modules import apply_to_pipeline, resolve_module


def merge_into_base(
    lora: LoraSet,
    pipe,
    family: Family,
    path: str | Path,
    *,
    dtype: str | None = None,
    overwrite: bool = False,
    restore: bool = True,
) -> Path:
    """Save pipe + lora as one .safetensors file; with restore, the pipeline's weights are put back exactly.

    restore keeps a copy of only the weights the LoRA touches, so a pipeline shared with other work
    (the UI's loaded model) is unchanged afterwards, bit for bit.
    """
    backup = {}
    if restore:
        for module_path in lora.modules:
            weight = _weight(pipe, module_path)
            backup[module_path] = weight.detach().clone()
    try:
        apply_to_pipeline(lora, pipe)
        return save_single_file(pipe, path, family, dtype=dtype, overwrite=overwrite)
    finally:
        with torch.no_grad():
            for module_path, saved in backup.items():
                _weight(pipe, module_path).copy_(saved)


def _weight(pipe, module_path: str) -> torch.Tensor:
    module = resolve_module(pipe, module_path)
    return getattr(module, "base_layer", module).weight
