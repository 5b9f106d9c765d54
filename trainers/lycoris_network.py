"""LoHa, LoKr and DoRA layers for training: lycoris-lora's own modules, attached to the planned modules.

LyCORIS is the reference implementation of these formats, and its modules write exactly the tensors A1111,
ComfyUI and kohya's tools load (hada_w1_a ..., lokr_w1 ..., dora_scale). peft has LoHa and LoKr layers
too, but its DoRA normalises per output row, while kohya / A1111 DoRA files normalise per input column
(A1111 reads no other way), so DoRA trains as LyCORIS' LoCon with weight decomposition on the input axis.

Each module hooks its target's forward (lycoris' `apply_to`) and is registered under the component's
`lycoris` child, so accelerate, DDP and mixed precision see its parameters with the model's own.

    >>> layers = add_lycoris(pipe, plan, "loha")  # doctest: +SKIP
    >>> modules = {path: extract_module(layer, torch.float16) for path, layer in layers.items()}  # doctest: +SKIP
"""

from __future__ import annotations

from collections.abc import Mapping

import torch

from studio.core.keys import kohya_module_name
from studio.core.lora_files import LoraModule, LycorisModule
from studio.core.modules import resolve_module
from studio.core.targets import ModuleTarget

CHILD = "lycoris"  # the ModuleDict each component model holds its LyCORIS modules in
# network_type -> (lycoris module class, options)
KINDS = {
    "loha": ("LohaModule", {}),
    "lokr": ("LokrModule", {}),
    "dora": ("LoConModule", {"weight_decompose": True, "wd_on_out": False}),
}


def add_lycoris(
    pipe, plan: Mapping[str, ModuleTarget], network_type: str, *, dropout: float = 0.0, lokr_factor: int = -1
) -> dict[str, torch.nn.Module]:
    """Attach one LyCORIS module of `network_type` to every planned module; {canonical path: module}."""
    import lycoris

    class_name, options = KINDS[network_type]
    cls = getattr(lycoris, class_name)
    if network_type == "lokr":
        options = options | {"factor": lokr_factor}
    family = "sdxl" if getattr(pipe, "text_encoder_2", None) is not None else "sd15"
    layers: dict[str, torch.nn.Module] = {}
    for path, target in plan.items():
        org = resolve_module(pipe, path)
        name = kohya_module_name(path, family)  # type: ignore[arg-type]
        module = cls(name, getattr(org, "base_layer", org), multiplier=1.0, lora_dim=int(target.rank),
                     alpha=float(target.alpha), dropout=dropout, **options)  # fmt: skip
        module.to(next(org.parameters()).device)
        module.apply_to()
        layers[path] = module
    for component in {p.partition(".")[0] for p in plan}:
        model = getattr(pipe, component)
        held = {m.lora_name: m for p, m in layers.items() if p.startswith(component + ".")}
        model.add_module(CHILD, torch.nn.ModuleDict(held))
    return layers


def is_lycoris(layer: torch.nn.Module) -> bool:
    return hasattr(layer, "custom_state_dict") and hasattr(layer, "lora_name")


def lycoris_parameters(path: str, layer: torch.nn.Module) -> dict[str, torch.nn.Parameter]:
    return {f"{path}.{name}": p for name, p in layer.named_parameters() if p.requires_grad}


@torch.no_grad()
def extract_module(layer: torch.nn.Module, dtype: torch.dtype):
    """A trained LyCORIS module as the studio's module (the factors the file will hold, in `dtype`)."""
    state = {k: v.detach().to("cpu", torch.float32).clone() for k, v in layer.custom_state_dict().items()}
    alpha = float(state.pop("alpha"))
    dora = state.pop("dora_scale", None)
    cast = {k: v.to(dtype) for k, v in state.items()}
    if "lora_down.weight" in cast:
        return LoraModule(cast["lora_down.weight"], cast["lora_up.weight"], alpha, cast.get("lora_mid.weight"),
                          None if dora is None else dora.to(dtype))  # fmt: skip
    kind = "loha" if "hada_w1_a" in cast else "lokr"
    return LycorisModule(kind, cast, alpha, None if dora is None else dora.to(dtype), layer.lora_name)
