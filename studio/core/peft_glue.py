"""The one place that touches peft: LoRA adapters injected into a UNet or text encoder, and driven.

Training and generation inject adapters the same way (`inject_lora`): peft's own LoRA layers, targeted at
exact module names, with per-module rank and alpha as peft patterns. Generation then drives the layers
directly (`set_active`, per-sample adapters, merge / unmerge); the peft internals that needs are used only
here, and tests/studio/core/test_peft_glue.py pins the behaviour relied on, so a peft upgrade that changes
it fails there first.

    >>> inject_lora(pipe.unet, "style", {"mid_block.attentions.0.proj_in": (8, 8.0)})  # doctest: +SKIP
    >>> layers = lora_layers(pipe.unet)  # doctest: +SKIP
"""

from __future__ import annotations

import re
import warnings
from collections import Counter
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager

import torch
from peft import LoraConfig, inject_adapter_in_model, set_peft_model_state_dict
from peft.tuners.lora import LoraLayer
from peft.tuners.tuners_utils import delete_adapter

__all__ = ["LoraLayer", "delete_lora", "inject_lora", "lora_layers", "per_sample_adapters", "set_active"]


def _most_common(values: list):
    return Counter(values).most_common(1)[0][0]


def lora_config(
    targets: Mapping[str, tuple[int, float]], *, dropout: float = 0.0, init: bool = True
) -> LoraConfig:
    """A LoraConfig for exactly these module names {name: (rank, alpha)}; odd ranks/alphas as patterns.

    peft reads pattern keys as regexes matched at the end of a module name, so the names are escaped.
    `init` True starts from peft's initialisation (A random, B zero: the base model); False leaves the
    factors for the caller to load.
    """
    common_rank = _most_common([rank for rank, _ in targets.values()])
    common_alpha = _most_common([alpha for _, alpha in targets.values()])
    return LoraConfig(
        r=common_rank,
        lora_alpha=common_alpha,
        target_modules=sorted(targets),
        rank_pattern={re.escape(n): r for n, (r, _) in targets.items() if r != common_rank},
        alpha_pattern={re.escape(n): a for n, (_, a) in targets.items() if a != common_alpha},
        lora_dropout=dropout,
        init_lora_weights=init,
    )


def inject_lora(
    model: torch.nn.Module,
    adapter: str,
    targets: Mapping[str, tuple[int, float]],
    *,
    state: Mapping[str, torch.Tensor] | None = None,
    dropout: float = 0.0,
    trainable: bool = True,
) -> list[LoraLayer]:
    """Add LoRA adapter `adapter` to `model` on the modules named in `targets` ({name: (rank, alpha)}).

    With `state` ({"<name>.lora_A.weight": ..., "<name>.lora_B.weight": ...}) the factors are loaded
    exactly; otherwise peft initialises them. The adapter acts in its layers at once (next to any adapters
    already acting). Returns the LoRA layers that hold it.
    """
    config = lora_config(targets, dropout=dropout, init=state is None)
    acting = {id(layer): list(layer.active_adapters) for _, layer in lora_layers(model)}  # peft resets them
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # "already found a peft_config": several adapters is the point
        inject_adapter_in_model(config, model, adapter_name=adapter, low_cpu_mem_usage=state is not None)
        if state is not None:
            result = set_peft_model_state_dict(
                model, dict(state), adapter_name=adapter, low_cpu_mem_usage=True
            )
            if result.unexpected_keys:
                raise RuntimeError(f"adapter {adapter}: peft did not take {result.unexpected_keys[:3]}")
    layers = []
    for _, layer in lora_layers(model):
        kept = [n for n in acting.get(id(layer), []) if n in layer.lora_A and n != adapter]
        if adapter in layer.lora_A:
            layer.lora_A[adapter].requires_grad_(trainable)
            layer.lora_B[adapter].requires_grad_(trainable)
            layers.append(layer)
            kept.append(adapter)
        set_active(layer, kept)
    return layers


def lora_layers(model: torch.nn.Module) -> list[tuple[str, LoraLayer]]:
    """(module name, layer) of every peft LoRA layer in `model`."""
    return [(name, module) for name, module in model.named_modules() if isinstance(module, LoraLayer)]


def delete_lora(model: torch.nn.Module, adapter: str) -> None:
    """Remove an adapter from every layer of `model` (layers left with no adapter stay wrapped)."""
    if adapter in getattr(model, "peft_config", {}):
        delete_adapter(model, adapter_name=adapter, prefix="lora_", layer_cls=LoraLayer)
        model.peft_config.pop(adapter, None)


def set_active(layer: LoraLayer, names: Sequence[str]) -> None:
    """Let exactly `names` act in one layer, at their current scales.

    peft's layer.set_adapter also flips requires_grad on every adapter's parameters (~0.25 ms a layer,
    ~50 ms per LoRA switch on SD1.5); inference needs no gradients, so only the active list is set.
    """
    names = list(names)
    if names != layer.active_adapters:
        layer._active_adapter = names


@contextmanager
def per_sample_adapters(layers: Sequence[LoraLayer], names: Sequence[str]) -> Iterator[None]:
    """Run sample i of the next forward passes through adapter names[i] alone, in every one of `layers`.

    peft's layers support this (`adapter_names=` -> LoraLayer._mixed_batch_forward, Linear and Conv2d
    alike), but diffusers' UNet does not pass that argument down, so it is injected with forward pre-hooks
    on the LoRA layers, the way peft's PeftModel._enable_peft_forward_hooks does.
    """
    names = list(names)

    def inject(module, args, kwargs):
        kwargs["adapter_names"] = names
        return args, kwargs

    handles = [layer.register_forward_pre_hook(inject, with_kwargs=True) for layer in layers]
    try:
        yield
    finally:
        for handle in handles:
            handle.remove()
