"""The adaptable modules of a loaded pipeline, found by canonical path (see studio.core.keys).

>>> shapes = model_module_shapes(pipe)  # doctest: +SKIP
>>> shapes["unet.mid_block.attentions.0.proj_in"]  # doctest: +SKIP
(1280, 1280)
"""

from __future__ import annotations

import torch

from studio.core.blocks import block_of
from studio.core.errors import KeyMismatchError
from studio.core.families import COMPONENTS
from studio.core.keys import canonical_path
from studio.core.lora_files import LoraSet


def model_module_shapes(pipe) -> dict[str, tuple[int, ...]]:
    """Canonical module path -> weight shape for every Linear/Conv2d of a pipeline's UNet and text encoders."""
    shapes: dict[str, tuple[int, ...]] = {}
    for component in COMPONENTS:
        model = getattr(pipe, component, None)
        if model is None:
            continue
        for name, module in model.named_modules():
            base = getattr(module, "base_layer", module)  # modules already wrapped by peft
            if isinstance(base, (torch.nn.Linear, torch.nn.Conv2d)) and ".lora_" not in name:
                shapes[canonical_path(component, name.replace(".base_layer", ""))] = tuple(base.weight.shape)
    return shapes


def resolve_module(pipe, path: str) -> torch.nn.Module:
    """The module of `pipe` a canonical path names (whichever text-encoder layout transformers uses)."""
    component, _, name = path.partition(".")
    model = getattr(pipe, component, None)
    if model is None:
        raise KeyMismatchError(f"the model has no {component} for module {path}.")
    try:
        return model.get_submodule(name)
    except AttributeError:
        if name.startswith("text_model."):
            try:
                return model.get_submodule(name[len("text_model.") :])
            except AttributeError:
                pass
    raise KeyMismatchError(f"the model has no module {path}.")


def model_path(pipe, path: str) -> str:
    """The module name inside its component for a canonical path (e.g. for peft target_modules)."""
    component, _, name = path.partition(".")
    model = getattr(pipe, component)
    try:
        model.get_submodule(name)
        return name
    except AttributeError:
        return name[len("text_model.") :] if name.startswith("text_model.") else name


def base_weight(pipe, path: str) -> torch.Tensor:
    """The base weight of a module (under a peft wrapper when there is one)."""
    module = resolve_module(pipe, path)
    return getattr(module, "base_layer", module).weight


@torch.no_grad()
def apply_to_pipeline(
    lora: LoraSet, pipe, weight: float = 1.0, block_weights: dict[str, float] | None = None
) -> None:
    """Add weight * delta of every module to the pipeline's weights in place (what 'merge into base' does).

    Every delta is taken against the weights as they were (DoRA's depends on them), then all are added."""
    for path, m in lora.modules.items():
        scale = weight * (block_weights.get(block_of(path) or "", 1.0) if block_weights else 1.0)
        if scale == 0:
            continue
        target = base_weight(pipe, path)
        delta = m.delta(target.detach() if m.needs_base else None).to(target.device)
        target.add_((scale * delta).reshape(target.shape).to(target.dtype))
