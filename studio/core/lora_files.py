"""LoRA files in every common format, read into one in-memory form and written back.

One representation whatever the source: a LoraSet maps canonical module paths
("unet.down_blocks.0.attentions.0.proj_in", "text_encoder.text_model.encoder.layers.0.self_attn.q_proj")
to LoraModule(down, up, alpha). The module's delta is (alpha / rank) * up @ down.

Read: kohya / A1111 / ComfyUI keys (lora_unet_, lora_te_, lora_te1_, lora_te2_; SD1.5 diffusers paths and
SDXL original paths; with or without .alpha), diffusers / PEFT keys (lora_A / lora_B, optional
lora_adapter_metadata for alphas), the old diffusers keys (.lora.down, .lora_linear_layer.down,
.processor.to_q_lora.down), and B-LoRA files (which are PEFT files touching up_blocks.0.attentions.0/1).
Write: kohya format by default (loads in A1111, ComfyUI and diffusers), PEFT format on request.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from datetime import UTC
from pathlib import Path
from typing import Literal

import torch

from studio.core.blocks import BLOCK_IDS, block_of
from studio.core.errors import BadFileError, FamilyMismatchError, KeyMismatchError, StudioError
from studio.core.families import FAMILY_NAMES, Family
from studio.core.io import atomic_save_safetensors, is_pickle, load_pickle_tensors, read_safetensors
from studio.core.keys import canonical_peft_path, is_kohya_name, kohya_module_name, parse_kohya_module

LoraFormat = Literal["kohya", "peft", "diffusers_old"]
B_LORA_CONTENT = "unet.up_blocks.0.attentions.0."
B_LORA_STYLE = "unet.up_blocks.0.attentions.1."


@dataclass
class LoraModule:
    """One adapted module: delta = (alpha / rank) * up @ down.

    down: (rank, in) for Linear, (rank, in, kh, kw) for Conv2d.  up: (out, rank) or (out, rank, 1, 1).
    alpha None means "no alpha stored", which tools read as alpha = rank (scale 1).
    """

    down: torch.Tensor
    up: torch.Tensor
    alpha: float | None = None

    @property
    def rank(self) -> int:
        return int(self.down.shape[0])

    @property
    def scale(self) -> float:
        return 1.0 if self.alpha is None else float(self.alpha) / self.rank

    @property
    def is_conv(self) -> bool:
        return self.down.dim() == 4

    def delta(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """The weight change this module adds, shaped like the target module's weight."""
        up = self.up.to(dtype).flatten(1)
        down = self.down.to(dtype).flatten(1)
        delta = (up @ down) * self.scale
        if self.is_conv:
            return delta.reshape(self.up.shape[0], *self.down.shape[1:])
        return delta


@dataclass
class LoraSet:
    """A LoRA as the studio holds it, whatever file it came from."""

    modules: dict[str, LoraModule]
    family: Family | None = None
    metadata: dict[str, str] = field(default_factory=dict)
    source_format: LoraFormat | None = None
    path: Path | None = None

    @property
    def ranks(self) -> list[int]:
        return sorted({m.rank for m in self.modules.values()})

    @property
    def alphas(self) -> list[float]:
        return sorted({m.alpha if m.alpha is not None else float(m.rank) for m in self.modules.values()})

    @property
    def blocks(self) -> list[str]:
        touched = {block_of(p) for p in self.modules}
        return [b for b in BLOCK_IDS if b in touched]

    @property
    def components(self) -> list[str]:
        return sorted({p.split(".", 1)[0] for p in self.modules})

    @property
    def is_b_lora(self) -> bool:
        """True when every UNet module sits in B-LoRA's content or style block (SDXL up_blocks.0.attentions.0/1)."""
        unet = [p for p in self.modules if p.startswith("unet.")]
        return bool(unet) and all(p.startswith((B_LORA_CONTENT, B_LORA_STYLE)) for p in unet)

    def subset(self, prefixes: tuple[str, ...]) -> LoraSet:
        """A LoraSet with only the modules whose path starts with one of `prefixes` (e.g. B-LoRA halves)."""
        mods = {p: m for p, m in self.modules.items() if p.startswith(prefixes)}
        return LoraSet(mods, self.family, dict(self.metadata), self.source_format, self.path)

    def label(self) -> str:
        return str(self.path) if self.path else "LoRA"


# --------------------------------------------------------------------------------------------------
# reading


def read_lora(path: str | Path, *, allow_pickle: bool = False) -> LoraSet:
    """Read a LoRA file of any supported format.

    >>> lora = read_lora("my_style.safetensors")  # doctest: +SKIP
    >>> lora.family, lora.source_format, lora.ranks  # doctest: +SKIP
    ('sdxl', 'kohya', [16])
    """
    path = Path(path)
    if allow_pickle and is_pickle(path):
        state = load_pickle_tensors(path)
        state = state.get("state_dict", state) if isinstance(state, dict) else state
        if not isinstance(state, dict):
            raise BadFileError(f"{path}: this pickle file does not hold a dict of tensors.")
        metadata: dict[str, str] = {}
    else:
        state, metadata = read_safetensors(path)
    try:
        lora = lora_from_state_dict(state, metadata)
    except StudioError as exc:
        raise type(exc)(f"{path}: {exc}") from None
    lora.path = path
    return lora


def lora_from_state_dict(state: dict[str, torch.Tensor], metadata: dict[str, str] | None = None) -> LoraSet:
    """Build a LoraSet from the tensors of a LoRA file (format detected from the keys)."""
    metadata = dict(metadata or {})
    if not state:
        raise BadFileError("the file holds no tensors.")
    _refuse_unsupported(state)
    fmt = detect_format(state)
    if fmt == "kohya":
        modules = _read_kohya(state)
    elif fmt == "peft":
        modules = _read_peft(state, metadata)
    else:
        modules = _read_old_diffusers(state)
    _check_factor_shapes(modules)
    family = detect_lora_family(modules, metadata)
    return LoraSet(modules, family, metadata, fmt)


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
        modules[path] = LoraModule(down, up, None if alpha is None else float(alpha))
    return modules


_PEFT_KEY = re.compile(r"^(?:base_model\.model\.)?(.*)\.lora_([AB])(?:\.default)?\.weight$")


def _read_peft(state: dict[str, torch.Tensor], metadata: dict[str, str]) -> dict[str, LoraModule]:
    factors: dict[str, dict[str, torch.Tensor]] = {}
    alphas: dict[str, float] = {}
    for key, tensor in state.items():
        if key.endswith(".alpha"):
            alphas[canonical_peft_path(key[: -len(".alpha")])] = float(tensor)
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
        return json.loads(raw)
    except json.JSONDecodeError:
        raise BadFileError("malformed lora_adapter_metadata JSON in the file's metadata.") from None


def _alpha_from_metadata(path: str, meta: dict) -> float | None:
    """Alpha of a module from diffusers' lora_adapter_metadata ({"unet.lora_alpha": .., "unet.alpha_pattern": ..})."""
    component, _, module = path.partition(".")
    pattern = meta.get(f"{component}.alpha_pattern") or {}
    for key, value in pattern.items():
        if module == key or module.endswith("." + key) or re.fullmatch(key, module):
            return float(value)
    if f"{component}.lora_alpha" in meta:
        return float(meta[f"{component}.lora_alpha"])
    return None


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


def _check_factor_shapes(modules: dict[str, LoraModule]) -> None:
    for path, m in modules.items():
        if m.down.dim() not in (2, 4) or m.up.dim() != m.down.dim() or m.up.shape[1] != m.down.shape[0]:
            raise KeyMismatchError(
                f"module {path}: LoRA factors do not fit together "
                f"(down {tuple(m.down.shape)}, up {tuple(m.up.shape)})."
            )
        if m.is_conv and tuple(m.up.shape[2:]) != (1, 1):
            raise KeyMismatchError(
                f"module {path}: conv LoRA up factor must be 1x1, got {tuple(m.up.shape)}."
            )


def detect_lora_family(
    modules: dict[str, LoraModule], metadata: dict[str, str] | None = None
) -> Family | None:
    """sd15 / sdxl from metadata, then key structure, then cross-attention widths; None if it cannot tell."""
    metadata = metadata or {}
    version = (
        metadata.get("ss_base_model_version", "") + " " + metadata.get("modelspec.architecture", "")
    ).lower()
    if "xl" in version:
        return "sdxl"
    if "v1" in version or "sd_v1" in version:
        return "sd15"
    paths = list(modules)
    if any(p.startswith("text_encoder_2.") for p in paths):
        return "sdxl"
    unet = [p[len("unet.") :] for p in paths if p.startswith("unet.")]
    # Structure: SDXL has attention in up_blocks.0 and none in down_blocks.0; SD1.5 the reverse,
    # and SD1.5 has a 4th down/up block.
    if any(
        p.startswith(("up_blocks.0.attentions", "down_blocks.2.attentions.0.transformer_blocks.1"))
        for p in unet
    ):
        return "sdxl"
    if any(p.startswith(("down_blocks.0.attentions", "down_blocks.3", "up_blocks.3")) for p in unet):
        return "sd15"
    for path, m in modules.items():  # real widths of cross-attention keys
        if path.endswith("attn2.to_k") and m.down.dim() == 2:
            return {768: "sd15", 2048: "sdxl"}.get(int(m.down.shape[1]))
    return None


# --------------------------------------------------------------------------------------------------
# checking against a model


def check_against_model(lora: LoraSet, family: Family, module_shapes: dict[str, tuple[int, ...]]) -> None:
    """Refuse a LoRA made for another family or whose modules/shapes do not match the model.

    module_shapes maps canonical module paths of the model to their weight shapes (see model_module_shapes).
    """
    label = lora.label()
    if lora.family is not None and lora.family != family:
        raise FamilyMismatchError(
            f"{label} is a {FAMILY_NAMES[lora.family]} LoRA but the model is {FAMILY_NAMES[family]}. "
            f"Pick a {FAMILY_NAMES[family]} LoRA or a {FAMILY_NAMES[lora.family]} base model."
        )
    missing = [p for p in lora.modules if p not in module_shapes]
    if len(missing) == len(lora.modules):
        raise KeyMismatchError(
            f"{label}: none of its {len(missing)} modules exist in this {FAMILY_NAMES[family]} model "
            f"(e.g. {missing[0]}). It was made for a different model."
        )
    if missing:
        raise KeyMismatchError(
            f"{label}: {len(missing)} of its modules do not exist in this model (e.g. {missing[0]})."
        )
    for path, m in lora.modules.items():
        if not _fits(m, module_shapes[path]):
            got = (m.up.shape[0], *m.down.shape[1:])
            raise KeyMismatchError(
                f"{label}: module {path} has shape {tuple(got)} but the model's is {module_shapes[path]}. "
                "The LoRA was made for a model with different layer sizes."
            )


def _fits(m: LoraModule, expected: tuple[int, ...]) -> bool:
    """A LoRA module fits a weight when out/in widths and kernel match (Linear == 1x1 conv)."""
    if m.up.shape[0] != expected[0] or m.down.shape[1] != expected[1]:
        return False
    return (tuple(expected[2:]) or (1, 1)) == (tuple(m.down.shape[2:]) or (1, 1))


def fit_to_model(lora: LoraSet, module_shapes: dict[str, tuple[int, ...]]) -> LoraSet:
    """Reshape factors to the kind of module they adapt (2-D for Linear, 4-D for Conv2d).

    Files disagree on 1x1 convs (kohya stores SD1.5's proj_in as 4-D, converters sometimes 2-D);
    peft needs the factors shaped like its own lora_A / lora_B layers.
    """
    check_against_model(lora, lora.family or _family_from_shapes(module_shapes), module_shapes)
    out = {}
    for path, m in lora.modules.items():
        conv = len(module_shapes[path]) == 4
        if conv and m.down.dim() == 2:
            m = LoraModule(m.down[:, :, None, None], m.up[:, :, None, None], m.alpha)
        elif not conv and m.down.dim() == 4:
            m = LoraModule(m.down.flatten(1), m.up.flatten(1), m.alpha)
        out[path] = m
    return LoraSet(out, lora.family, dict(lora.metadata), lora.source_format, lora.path)


def _family_from_shapes(module_shapes: dict[str, tuple[int, ...]]) -> Family:
    return "sdxl" if any(p.startswith("text_encoder_2.") for p in module_shapes) else "sd15"


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
    from datetime import datetime

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


def write_lora(
    lora: LoraSet,
    path: str | Path,
    *,
    fmt: Literal["kohya", "peft"] = "kohya",
    family: Family | None = None,
    metadata: dict[str, str] | None = None,
    overwrite: bool = False,
    dtype: torch.dtype | None = None,
) -> Path:
    """Write a LoRA atomically: kohya format (default) or diffusers/PEFT format.

    >>> write_lora(lora, "out/my_lora.safetensors")  # doctest: +SKIP
    """
    family = family or lora.family
    if family is None:
        raise StudioError("cannot tell whether this LoRA is for SD1.5 or SDXL; pass family='sd15' or 'sdxl'.")
    if fmt == "kohya":
        state = to_kohya_state_dict(lora, family)
    elif fmt == "peft":
        state = to_peft_state_dict(lora)
    else:
        raise StudioError(f"unknown LoRA output format {fmt!r}; use 'kohya' or 'peft'.")
    if dtype is not None:
        state = {k: v.to(dtype) if v.is_floating_point() and v.dim() > 0 else v for k, v in state.items()}
    meta = kohya_metadata(
        LoraSet(lora.modules, family, lora.metadata, lora.source_format, Path(path)), family, metadata
    )
    meta["studio_format"] = fmt
    return atomic_save_safetensors(state, path, meta, overwrite=overwrite)
