"""LoRA layers for training: injected with peft from a target plan, read back as a LoraSet for saving.

    >>> plan = plan_targets(model_module_shapes(pipe), "sd15", TargetSpec(rank=8))  # doctest: +SKIP
    >>> layers = add_lora(pipe, plan)  # doctest: +SKIP
    >>> lora = extract_lora(pipe, plan, "sd15")  # doctest: +SKIP

peft's LoRA layers compute base(x) + B(A(dropout(x))) * alpha / r, the same delta kohya files store, so the
trained factors are written out unchanged (lora_A = lora_down, lora_B = lora_up, alpha per module).
"""

from __future__ import annotations

import re
from collections.abc import Mapping

import torch
from peft import LoraConfig

from studio.blocks import Family
from studio.lora_files import LoraModule, LoraSet, model_path, resolve_module
from studio.targets import ModuleTarget

ADAPTER = "default"
COMPONENTS = ("unet", "text_encoder", "text_encoder_2")


def add_lora(pipe, plan: Mapping[str, ModuleTarget], dropout: float = 0.0) -> dict[str, torch.nn.Module]:
    """Inject one peft adapter per pipeline component that has targets; returns {canonical path: lora layer}."""
    for component in COMPONENTS:
        names = {model_path(pipe, p): t for p, t in plan.items() if p.partition(".")[0] == component}
        if not names:
            continue
        getattr(pipe, component).add_adapter(_lora_config(names, dropout), adapter_name=ADAPTER)
    return lora_layers(pipe, plan)


def _lora_config(targets: Mapping[str, ModuleTarget], dropout: float) -> LoraConfig:
    """A LoraConfig targeting exactly these module names, with per-module rank and alpha as patterns."""
    common_rank = _most_common([t.rank for t in targets.values()])
    common_alpha = _most_common([t.alpha for t in targets.values()])
    # peft treats pattern keys as regexes matched at the end of a module name: escape the exact names.
    rank_pattern = {re.escape(n): t.rank for n, t in targets.items() if t.rank != common_rank}
    alpha_pattern = {re.escape(n): t.alpha for n, t in targets.items() if t.alpha != common_alpha}
    return LoraConfig(
        r=common_rank,
        lora_alpha=common_alpha,
        target_modules=sorted(targets),
        rank_pattern=rank_pattern,
        alpha_pattern=alpha_pattern,
        lora_dropout=dropout,
        init_lora_weights=True,  # A random (kaiming), B zero: training starts from the base model
    )


def _most_common(values: list):
    return max(set(values), key=values.count)


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
