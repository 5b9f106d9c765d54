"""LoRA layers for training: injected with peft from a target plan, read back as a LoraSet for saving.

    >>> plan = plan_targets(model_module_shapes(pipe), "sd15", TargetSpec(rank=8))  # doctest: +SKIP
    >>> layers = add_lora(pipe, plan)  # doctest: +SKIP
    >>> lora = extract_lora(pipe, plan, "sd15")  # doctest: +SKIP

peft's LoRA layers compute base(x) + B(A(dropout(x))) * alpha / r, the same delta kohya files store, so the
trained factors are written out unchanged (lora_A = lora_down, lora_B = lora_up, alpha per module).
"""

from __future__ import annotations

from collections.abc import Mapping

import torch

from studio.core.families import COMPONENTS, Family
from studio.core.lora_files import LoraModule, LoraSet
from studio.core.modules import model_path, resolve_module
from studio.core.peft_glue import inject_lora
from studio.core.targets import ModuleTarget

ADAPTER = "default"


def add_lora(pipe, plan: Mapping[str, ModuleTarget], dropout: float = 0.0) -> dict[str, torch.nn.Module]:
    """Inject one peft adapter per pipeline component that has targets; returns {canonical path: lora layer}.

    peft initialises the factors (A random, B zero), so training starts from the base model.
    """
    for component in COMPONENTS:
        targets = {
            model_path(pipe, p): (t.rank, t.alpha)
            for p, t in plan.items()
            if p.partition(".")[0] == component
        }
        if targets:
            inject_lora(getattr(pipe, component), ADAPTER, targets, dropout=dropout)
    return lora_layers(pipe, plan)


def lora_layers(pipe, plan: Mapping[str, ModuleTarget]) -> dict[str, torch.nn.Module]:
    """The peft LoRA layer of every planned module."""
    out = {}
    for path in plan:
        out[path] = resolve_module(pipe, path)
    return out


def trainable_parameters(layers: Mapping[str, torch.nn.Module]) -> dict[str, torch.nn.Parameter]:
    """{"<path>.lora_A" / "<path>.lora_B": parameter} of the factors that train (frozen ones are left out)."""
    out = {}
    for path, layer in layers.items():
        for part in ("lora_A", "lora_B"):
            param = getattr(layer, part)[ADAPTER].weight
            if param.requires_grad:
                out[f"{path}.{part}"] = param
    return out


def param_groups(
    layers: Mapping[str, torch.nn.Module],
    plan: Mapping[str, ModuleTarget],
    unet_lr: float,
    text_encoder_lr: float,
) -> list[dict]:
    """Optimizer groups: one per (component kind, lr multiplier), lr = base lr x block multiplier."""
    groups: dict[tuple[bool, float], list[torch.nn.Parameter]] = {}
    for path, layer in layers.items():
        key = (path.startswith("unet."), plan[path].lr_scale)
        for part in ("lora_A", "lora_B"):
            param = getattr(layer, part)[ADAPTER].weight
            if param.requires_grad:
                groups.setdefault(key, []).append(param)
    return [
        {"params": params, "lr": (unet_lr if is_unet else text_encoder_lr) * scale}
        for (is_unet, scale), params in sorted(groups.items())
    ]


@torch.no_grad()
def extract_lora(
    pipe, plan: Mapping[str, ModuleTarget], family: Family, dtype: torch.dtype = torch.float32
) -> LoraSet:
    """The trained adapter as a LoraSet (factors copied to the CPU in `dtype`)."""
    modules = {}
    for path, layer in lora_layers(pipe, plan).items():
        down = layer.lora_A[ADAPTER].weight.detach().to("cpu", dtype).clone()
        up = layer.lora_B[ADAPTER].weight.detach().to("cpu", dtype).clone()
        modules[path] = LoraModule(down, up, float(plan[path].alpha))
    return LoraSet(modules, family)
