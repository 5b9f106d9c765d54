"""The key layouts of LoRA files: which format a state dict is in, reading each into LoraModules, writing.

Read: kohya / A1111 / ComfyUI keys (lora_unet_, lora_te_, lora_te1_, lora_te2_; SD1.5 diffusers or original
paths, SDXL original paths; with or without .alpha), diffusers / PEFT keys (lora_A / lora_B, with alphas
from .alpha keys or diffusers' lora_adapter_metadata), the old diffusers keys (.lora.down,
.lora_linear_layer.down, .processor.to_q_lora.down). Write: kohya keys with alpha, or PEFT keys with
alpha/rank folded into lora_B.

Everything a file claims is checked as it is read (studio.core.lora_checks): a hostile or damaged file
ends in a BadFileError / KeyMismatchError naming what is wrong, never in a traceback.
"""

from __future__ import annotations

import json
import re
from datetime import UTC, datetime

import torch

from studio.core.errors import BadFileError, KeyMismatchError
from studio.core.families import Family
from studio.core.keys import canonical_peft_path, is_kohya_name, kohya_module_name, parse_kohya_module
from studio.core.lora_checks import metadata_number, scalar_alpha
from studio.core.lora_set import LoraFormat, LoraModule, LoraSet

# --------------------------------------------------------------------------------------------------
# reading


def read_modules(
    state: dict[str, torch.Tensor], metadata: dict[str, str]
) -> tuple[dict[str, LoraModule], LoraFormat]:
    """The modules of a state dict, and the key format they were read from."""
    _refuse_unsupported(state)
    fmt = detect_format(state)
    if fmt == "kohya":
        return _read_kohya(state), fmt
    if fmt == "peft":
        return _read_peft(state, metadata), fmt
    return _read_old_diffusers(state), fmt


def detect_format(state: dict[str, torch.Tensor]) -> LoraFormat:
    keys = list(state)
    if any(is_kohya_name(k) for k in keys):
        return "kohya"
    if any(".lora_A." in k or ".lora_B." in k for k in keys):
        return "peft"
    if any(re.search(r"(\.lora\.|_lora\.|\.lora_linear_layer\.)(down|up)\.", k) for k in keys):
        return "diffusers_old"
    sample = ", ".join(keys[:3])
    raise KeyMismatchError(
        f"no LoRA keys found (first keys: {sample}). Is this a full model checkpoint rather than a LoRA? "
        "Supported: kohya/A1111 (lora_unet_...), diffusers/PEFT (lora_A/lora_B) and old diffusers (.lora.down)."
    )


def _refuse_unsupported(state: dict[str, torch.Tensor]) -> None:
    markers = (
        (".hada_w1", "LyCORIS LoHa"),
        (".lokr_w1", "LyCORIS LoKr"),
        (".lora_mid.", "LyCORIS LoCon with Tucker decomposition"),
        (".dora_scale", "DoRA"),
        (".lora_magnitude_vector", "DoRA"),
        (".diff", "full weight-difference"),
    )
    for key in state:
        for marker, kind in markers:
            if marker in key and (marker != ".diff" or key.endswith((".diff", ".diff_b"))):
                raise KeyMismatchError(
                    f"this is a {kind} file; LoRA Studio reads plain LoRA (and LoCon) files only. "
                    "Convert it to a plain LoRA first (for example by extracting a LoRA from the merged model)."
                )


def _read_kohya(state: dict[str, torch.Tensor]) -> dict[str, LoraModule]:
    names = {k.split(".", 1)[0] for k in state}
    modules: dict[str, LoraModule] = {}
    for name in sorted(names):
        down, up = state.get(f"{name}.lora_down.weight"), state.get(f"{name}.lora_up.weight")
        if down is None or up is None:
            if down is None and up is None:
                continue  # e.g. a stray alpha or an embedding stored alongside
            raise BadFileError(f"module {name} has a lora_{'up' if down is None else 'down'} weight only.")
        try:
            path = parse_kohya_module(name)
        except ValueError as exc:
            raise KeyMismatchError(str(exc)) from None
        alpha = state.get(f"{name}.alpha")
        modules[path] = LoraModule(down, up, None if alpha is None else scalar_alpha(alpha, path))
    return modules


_PEFT_KEY = re.compile(r"^(?:base_model\.model\.)?(.*)\.lora_([AB])(?:\.default)?\.weight$")


def _read_peft(state: dict[str, torch.Tensor], metadata: dict[str, str]) -> dict[str, LoraModule]:
    factors: dict[str, dict[str, torch.Tensor]] = {}
    alphas: dict[str, float] = {}
    for key, tensor in state.items():
        if key.endswith(".alpha"):
            path = canonical_peft_path(key[: -len(".alpha")])
            alphas[path] = scalar_alpha(tensor, path)
            continue
        m = _PEFT_KEY.match(key)
        if not m:
            continue
        factors.setdefault(canonical_peft_path(m[1]), {})[m[2]] = tensor
    adapter_meta = _peft_adapter_metadata(metadata)
    modules = {}
    for path, ab in sorted(factors.items()):
        if set(ab) != {"A", "B"}:
            raise BadFileError(f"module {path} has lora_{'B' if 'A' in ab else 'A'} missing.")
        alpha = alphas.get(path, _alpha_from_metadata(path, adapter_meta))
        modules[path] = LoraModule(ab["A"], ab["B"], alpha)
    return modules


def _peft_adapter_metadata(metadata: dict[str, str]) -> dict:
    raw = metadata.get("lora_adapter_metadata")
    if not raw:
        return {}
    try:
        meta = json.loads(raw)
    except (json.JSONDecodeError, RecursionError):
        raise BadFileError("malformed lora_adapter_metadata JSON in the file's metadata.") from None
    if not isinstance(meta, dict):
        raise BadFileError("lora_adapter_metadata in the file's metadata is not a JSON object.")
    return meta


def _alpha_from_metadata(path: str, meta: dict) -> float | None:
    """Alpha of a module from diffusers' lora_adapter_metadata ({"unet.lora_alpha": .., "unet.alpha_pattern": ..})."""
    component, _, module = path.partition(".")
    pattern = meta.get(f"{component}.alpha_pattern") or {}
    if not isinstance(pattern, dict):
        raise BadFileError(f"lora_adapter_metadata: {component}.alpha_pattern is not a table of alphas.")
    for key, value in pattern.items():
        if module == key or module.endswith("." + str(key)) or _matches(str(key), module):
            return metadata_number(value, f"{component}.alpha_pattern[{key!r}]")
    if f"{component}.lora_alpha" in meta:
        return metadata_number(meta[f"{component}.lora_alpha"], f"{component}.lora_alpha")
    return None


def _matches(pattern: str, module: str) -> bool:
    """peft reads pattern keys as regexes; one that is not a valid regex is an error in the file."""
    try:
        return re.fullmatch(pattern, module) is not None
    except (re.error, RecursionError):
        raise BadFileError(f"lora_adapter_metadata: {pattern!r} is not a valid module pattern.") from None


_OLD_KEY = re.compile(r"^(.*?)\.(?:lora|lora_linear_layer)\.(down|up)\.weight$")
_OLD_PROCESSOR_KEY = re.compile(r"^(.*?)\.(?:processor\.)?(to_q|to_k|to_v|to_out)_lora\.(down|up)\.weight$")


def _read_old_diffusers(state: dict[str, torch.Tensor]) -> dict[str, LoraModule]:
    factors: dict[str, dict[str, torch.Tensor]] = {}
    for key, tensor in state.items():
        if m := _OLD_PROCESSOR_KEY.match(key):
            proj = "to_out.0" if m[2] == "to_out" else m[2]
            path, which = f"{m[1]}.{proj}", m[3]
        elif m := _OLD_KEY.match(key):
            path, which = m[1], m[2]
        else:
            continue
        factors.setdefault(canonical_peft_path(path), {})[which] = tensor
    modules = {}
    for path, f in sorted(factors.items()):
        if set(f) != {"down", "up"}:
            raise BadFileError(f"module {path} has only one of its two LoRA factors.")
        modules[path] = LoraModule(f["down"], f["up"], None)
    return modules


# --------------------------------------------------------------------------------------------------
# writing


def to_kohya_state_dict(lora: LoraSet, family: Family) -> dict[str, torch.Tensor]:
    """kohya / A1111 / ComfyUI keys; alpha always written (alpha = rank when the source had none)."""
    out: dict[str, torch.Tensor] = {}
    for path, m in lora.modules.items():
        name = kohya_module_name(path, family)
        out[f"{name}.lora_down.weight"] = m.down
        out[f"{name}.lora_up.weight"] = m.up
        out[f"{name}.alpha"] = torch.tensor(float(m.alpha if m.alpha is not None else m.rank))
    return out


def to_peft_state_dict(lora: LoraSet) -> dict[str, torch.Tensor]:
    """diffusers / PEFT keys with each module's alpha/rank folded into lora_B, so every tool gets the same delta."""
    out: dict[str, torch.Tensor] = {}
    for path, m in lora.modules.items():
        out[f"{path}.lora_A.weight"] = m.down
        out[f"{path}.lora_B.weight"] = m.up * m.scale if m.scale != 1.0 else m.up
    return out


def kohya_metadata(lora: LoraSet, family: Family, extra: dict[str, str] | None = None) -> dict[str, str]:
    """ss_* and modelspec.* fields that A1111, ComfyUI and kohya tools read."""
    ranks, alphas = lora.ranks, lora.alphas
    arch = "stable-diffusion-xl-v1-base/lora" if family == "sdxl" else "stable-diffusion-v1/lora"
    meta = {
        "ss_network_module": "networks.lora",
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
    if len(ranks) > 1:
        meta["ss_network_args"] = json.dumps({"ranks": ranks})
    meta.update(
        {k: v for k, v in lora.metadata.items() if not k.startswith(("ss_network_", "modelspec.date"))}
    )
    meta.update(extra or {})
    return meta
