"""The layers that train, by network_type: injected from a target plan, read back as a LoraSet for saving.

    >>> plan = plan_targets(model_module_shapes(pipe), "sd15", TargetSpec(rank=8))  # doctest: +SKIP
    >>> layers = add_lora(pipe, plan)  # doctest: +SKIP
    >>> lora = extract_lora(layers, plan, "sd15")  # doctest: +SKIP

lora and locon (LoRA on the convs too: conv_rank) are peft's LoRA layers: base(x) + B(A(dropout(x))) * alpha / r,
the same delta kohya files store, so the trained factors are written out unchanged (lora_A = lora_down,
lora_B = lora_up, alpha per module). loha, lokr and dora are lycoris-lora's modules (lycoris_network.py).
"""

from __future__ import annotations

from collections.abc import Mapping

import torch

from studio.core.families import COMPONENTS, Family
from studio.core.lora_files import LoraModule, LoraSet
from studio.core.modules import model_path, resolve_module
from studio.core.peft_glue import inject_lora
from studio.core.targets import ModuleTarget
from trainers.lycoris_network import add_lycoris, extract_module, is_lycoris, lycoris_parameters

ADAPTER = "default"
NETWORK_TYPES = ("lora", "locon", "loha", "lokr", "dora")


def add_lora(
    pipe,
    plan: Mapping[str, ModuleTarget],
    dropout: float = 0.0,
    network_type: str = "lora",
    lokr_factor: int = -1,
) -> dict[str, torch.nn.Module]:
    """Add the trainable layers of `network_type` on the planned modules; returns {canonical path: layer}.

    Every kind starts from the base model (peft: A random, B zero; LyCORIS: one factor zero).
    """
    if network_type in ("loha", "lokr", "dora"):
        return add_lycoris(pipe, plan, network_type, dropout=dropout, lokr_factor=lokr_factor)
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


def _layer_parameters(path: str, layer: torch.nn.Module) -> dict[str, torch.nn.Parameter]:
    if is_lycoris(layer):
        return lycoris_parameters(path, layer)
    return {f"{path}.{part}": getattr(layer, part)[ADAPTER].weight for part in ("lora_A", "lora_B")}


def trainable_parameters(layers: Mapping[str, torch.nn.Module]) -> dict[str, torch.nn.Parameter]:
    """{"<path>.lora_A" / "<path>.lora_B" / "<path>.hada_w1_a" ...: parameter} of the factors that train
    (frozen ones are left out)."""
    return {name: p for path, layer in layers.items() for name, p in _layer_parameters(path, layer).items()
            if p.requires_grad}  # fmt: skip


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
        for param in _layer_parameters(path, layer).values():
            if param.requires_grad:
                groups.setdefault(key, []).append(param)
    return [
        {"params": params, "lr": (unet_lr if is_unet else text_encoder_lr) * scale}
        for (is_unet, scale), params in sorted(groups.items())
    ]


@torch.no_grad()
def extract_lora(
    layers: Mapping[str, torch.nn.Module],
    plan: Mapping[str, ModuleTarget],
    family: Family,
    dtype: torch.dtype = torch.float32,
) -> LoraSet:
    """The trained layers as a LoraSet (factors copied to the CPU in `dtype`)."""
    modules = {}
    for path, layer in layers.items():
        if is_lycoris(layer):
            modules[path] = extract_module(layer, dtype)
            if hasattr(modules[path], "path"):
                modules[path].path = path
            continue
        down = layer.lora_A[ADAPTER].weight.detach().to("cpu", dtype).clone()
        up = layer.lora_B[ADAPTER].weight.detach().to("cpu", dtype).clone()
        modules[path] = LoraModule(down, up, float(plan[path].alpha))
    return LoraSet(modules, family)
