"""The key layouts of LoRA files: reading a file's tensors into modules, and writing modules back.

Which key is which (kohya / A1111 / ComfyUI / LyCORIS, diffusers / PEFT, old diffusers) is
studio.core.lora_keys; the checks are studio.core.lora_checks; alphas kept outside the tensors (PEFT's
adapter_config.json, diffusers' lora_adapter_metadata) are studio.core.adapter_config.
Write: kohya keys (LoRA / LoCon / Tucker / DoRA / LoHa / LoKr in the layout A1111, ComfyUI and LyCORIS
load), or PEFT keys (plain LoRA only) with alpha / rank folded into lora_B.
"""

from __future__ import annotations

import json
from datetime import UTC, datetime

import torch

from studio.core.adapter_config import AdapterConfig, metadata_configs
from studio.core.errors import StudioError
from studio.core.families import Family
from studio.core.keys import kohya_module_name
from studio.core.lora_checks import check_layout, check_tensor_values, scalar_alpha
from studio.core.lora_keys import group_keys
from studio.core.lora_set import AnyModule, LoraFormat, LoraModule, LoraSet, LycorisModule

# --------------------------------------------------------------------------------------------------
# reading


def read_modules(
    state: dict[str, torch.Tensor], metadata: dict[str, str], config: AdapterConfig | None = None
) -> tuple[dict[str, AnyModule], LoraFormat]:
    """The checked modules of a state dict, and the key format they were read from.

    `config`: a PEFT folder's adapter_config.json, which holds the alphas its tensors lack.
    """
    groups = group_keys(state)
    layouts = check_layout(
        groups, {k: str(t.dtype) for k, t in state.items()}, {k: tuple(t.shape) for k, t in state.items()}
    )
    configs = metadata_configs(metadata) if groups.format == "peft" else {}
    modules: dict[str, AnyModule] = {}
    for path, roles in groups.modules.items():
        tensors = {role: state[key] for role, key in roles.items() if role != "alpha"}
        for role, tensor in tensors.items():
            check_tensor_values(path, role, tensor)
        alpha = _alpha(path, roles, state, layouts[path].rank, config or configs.get(path.partition(".")[0]))
        modules[path] = build_module(path, layouts[path].kind, tensors, alpha)
    return modules, groups.format  # type: ignore[return-value]


def _alpha(path, roles, state, rank, config: AdapterConfig | None) -> float | None:
    if "alpha" in roles:
        return scalar_alpha(float(state[roles["alpha"]].reshape(()).to(torch.float64)), path)
    return config.alpha(path, rank) if config is not None else None


def build_module(path: str, kind: str, tensors: dict[str, torch.Tensor], alpha: float | None) -> AnyModule:
    """A module from its factors by role (see studio.core.lora_keys)."""
    dora = tensors.get("dora_scale")
    if kind == "lora":
        return LoraModule(tensors["down"], tensors["up"], alpha, tensors.get("mid"), dora)
    factors = {r: t for r, t in tensors.items() if r != "dora_scale"}
    return LycorisModule(kind, factors, alpha, dora, path)  # type: ignore[arg-type]


# --------------------------------------------------------------------------------------------------
# writing


def to_kohya_state_dict(lora: LoraSet, family: Family) -> dict[str, torch.Tensor]:
    """kohya / A1111 / ComfyUI / LyCORIS keys; alpha always written (alpha = rank when the source had none)."""
    out: dict[str, torch.Tensor] = {}
    for path, m in lora.modules.items():
        name = kohya_module_name(path, family)
        if isinstance(m, LoraModule):
            out[f"{name}.lora_down.weight"] = m.down
            out[f"{name}.lora_up.weight"] = m.up
            if m.mid is not None:
                out[f"{name}.lora_mid.weight"] = m.mid
        else:
            out.update({f"{name}.{role}": t for role, t in m.factors_.items()})
        if m.dora_scale is not None:
            out[f"{name}.dora_scale"] = m.dora_scale
        out[f"{name}.alpha"] = torch.tensor(float(m.alpha if m.alpha is not None else (m.rank or 1)))
    return out


def to_peft_state_dict(lora: LoraSet) -> dict[str, torch.Tensor]:
    """diffusers / PEFT keys with each module's alpha/rank folded into lora_B, so every tool gets the same delta."""
    out: dict[str, torch.Tensor] = {}
    for path, m in lora.modules.items():
        if not isinstance(m, LoraModule) or not m.is_lowrank:
            raise StudioError(
                f"module {path} is a {m.variant} module, which the PEFT key layout cannot hold; "
                "write the kohya format (the default), which A1111, ComfyUI and LyCORIS read."
            )
        m = m.lowrank()
        out[f"{path}.lora_A.weight"] = m.down
        out[f"{path}.lora_B.weight"] = m.up * m.scale if m.scale != 1.0 else m.up
    return out


def kohya_metadata(lora: LoraSet, family: Family, extra: dict[str, str] | None = None) -> dict[str, str]:
    """ss_* and modelspec.* fields that A1111, ComfyUI and kohya tools read."""
    ranks, alphas = lora.ranks or [1], lora.alphas
    kinds = {m.kind for m in lora.modules.values()}
    lycoris = kinds - {"lora"} or lora.needs_base or any(m.variant == "tucker" for m in lora.modules.values())
    arch = "stable-diffusion-xl-v1-base/lora" if family == "sdxl" else "stable-diffusion-v1/lora"
    meta = {
        "ss_network_module": "lycoris.kohya" if lycoris else "networks.lora",
        "ss_network_dim": str(ranks[0] if len(ranks) == 1 else max(ranks)),
        "ss_network_alpha": f"{alphas[0] if len(alphas) == 1 else max(alphas):g}",
        "ss_base_model_version": "sdxl_base_v1-0" if family == "sdxl" else "sd_v1",
        "ss_v2": "False",
        "modelspec.sai_model_spec": "1.0.0",
        "modelspec.architecture": arch,
        "modelspec.implementation": "https://github.com/Stability-AI/generative-models"
        if family == "sdxl"
        else "diffusers",
        "modelspec.date": datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%S"),
        "modelspec.title": (lora.path.stem if lora.path else "lora"),
        "studio_blocks": ",".join(lora.blocks),
    }
    args = {}
    if len(ranks) > 1:
        args["ranks"] = ranks
    if lycoris:  # what LyCORIS' own kohya network writes, which A1111 and kohya tools show
        args["algo"] = next(
            (k for k in ("loha", "lokr") if k in kinds), "locon" if not lora.needs_base else "lora"
        )
        if lora.needs_base:
            args["dora_wd"] = True
    if args:
        meta["ss_network_args"] = json.dumps(args)
    meta.update(
        {k: v for k, v in lora.metadata.items() if not k.startswith(("ss_network_", "modelspec.date"))}
    )
    meta.update(extra or {})
    return meta
