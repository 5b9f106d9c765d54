"""Which tensors of a LoRA file belong to which module, in what role, and what shape of weight they make.

Pure Python (no torch), so `lora-studio inspect` can describe and check a file from its header alone.
Layouts read:
- kohya / A1111 / ComfyUI / LyCORIS: "<kohya module name>.<suffix>" with lora_down.weight, lora_up.weight,
  lora_mid.weight (LoCon with Tucker), alpha, dora_scale (DoRA), hada_w1_a ... hada_t2 (LoHa), lokr_w1 ...
  lokr_t2 (LoKr);
- diffusers / PEFT: "<path>.lora_A.weight", "lora_B", ".alpha", "lora_magnitude_vector" (DoRA), PEFT's LoHa and
  LoKr parameter names, with or without "base_model.model." and the adapter name;
- old diffusers: ".lora.down.weight", ".lora_linear_layer.down.weight", ".processor.to_q_lora.down.weight".

A module's kind is "lora" (LoRA, LoCon, LoCon-Tucker, DoRA: down/up factors), "loha" or "lokr".

    >>> groups = group_keys(["lora_unet_mid_block_attentions_0_proj_in.lora_down.weight",
    ...                      "lora_unet_mid_block_attentions_0_proj_in.lora_up.weight"])
    >>> groups.format, groups.modules
    ('kohya', {'unet.mid_block.attentions.0.proj_in': {'down': 'lora_unet_mid_block_attentions_0_proj_in.lora_down.weight', 'up': 'lora_unet_mid_block_attentions_0_proj_in.lora_up.weight'}})
    >>> weight_shape("lokr", {"lokr_w1": (4, 4), "lokr_w2_a": (80, 8), "lokr_w2_b": (8, 80)})
    (320, 320)
"""

from __future__ import annotations

import math
import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field

from studio.core.blocks import BLOCK_IDS, block_of
from studio.core.errors import BadFileError, KeyMismatchError
from studio.core.keys import canonical_peft_path, is_kohya_name, kohya_family_of_ldm_names, parse_kohya_module

Shape = tuple[int, ...]
LOHA_ROLES = ("hada_w1_a", "hada_w1_b", "hada_w2_a", "hada_w2_b", "hada_t1", "hada_t2")
LOKR_ROLES = ("lokr_w1", "lokr_w1_a", "lokr_w1_b", "lokr_w2", "lokr_w2_a", "lokr_w2_b", "lokr_t2")
# kohya / LyCORIS key suffix -> role
KOHYA_SUFFIXES = {
    "lora_down.weight": "down", "lora_up.weight": "up", "lora_mid.weight": "mid", "alpha": "alpha",
    "dora_scale": "dora_scale", **{r: r for r in LOHA_ROLES + LOKR_ROLES},
}  # fmt: skip
# what other LyCORIS kinds store, for a message that names them
UNSUPPORTED = {
    "diff": "a full weight difference (LyCORIS 'full')", "diff_b": "a full weight difference (LyCORIS 'full')",
    "w_norm": "norm-layer training (LyCORIS)", "b_norm": "norm-layer training (LyCORIS)",
    "oft_blocks": "OFT / BOFT (LyCORIS)", "oft_diag": "OFT (LyCORIS)", "a1.weight": "GLoRA (LyCORIS)",
    "on_input": "IA3 (LyCORIS)",
}  # fmt: skip
_PEFT_KEY = re.compile(
    r"^(?:base_model\.model\.)?(.*)\.(lora_A|lora_B|lora_magnitude_vector|hada_w[12]_[ab]|hada_t[12]|"
    r"lokr_w[12](?:_[ab])?|lokr_t2)(?:\.default)?(?:\.weight)?$"
)
_PEFT_ROLES = {"lora_A": "down", "lora_B": "up", "lora_magnitude_vector": "dora_scale"}
_OLD_KEY = re.compile(r"^(.*?)\.(?:lora|lora_linear_layer)\.(down|up)\.weight$")
_OLD_PROCESSOR_KEY = re.compile(r"^(.*?)\.(?:processor\.)?(to_q|to_k|to_v|to_out)_lora\.(down|up)\.weight$")
KIND_NAMES = {"lora": "LoRA", "locon": "LoCon", "tucker": "LoCon (Tucker)", "dora": "DoRA", "loha": "LoHa",
              "lokr": "LoKr", "loha_dora": "LoHa (DoRA)", "lokr_dora": "LoKr (DoRA)"}  # fmt: skip
# SD UNet convolutions that are 3x3 (the rest are 1x1 or Linear): needed to unflatten the conv factors
# that LoHa / LoKr files store as (rank, in * 3 * 3)
_KXK_CONVS = (".conv1", ".conv2", ".conv", ".conv_in", ".conv_out")


# token embeddings bundled in a LoRA file (A1111 / sd-scripts): bundle_emb.<word>.<vector>; see lora_embeddings
BUNDLE_PREFIX = "bundle_emb."


BUNDLE_SD15_VECTOR = "string_to_param.*"  # SD1.5: A1111's textual-inversion layout; SDXL: clip_l, clip_g
BUNDLE_ENCODERS = ("clip_l", "clip_g")
_BUNDLE_WORD = re.compile(r"^[^\s.]+$")  # one prompt word, no dots (they separate the key's parts)


def is_bundle_word(word: str) -> bool:
    """True for a word a bundled embedding can stand for: one prompt word, without dots."""
    return bool(_BUNDLE_WORD.match(word))


def parse_bundle_key(key: str) -> tuple[str, str]:
    """(word, text encoder) of a bundled embedding's key: bundle_emb.sks.string_to_param.* -> (sks, clip_l)."""
    word, _, vector = key[len(BUNDLE_PREFIX) :].partition(".")
    encoder = "clip_l" if vector == BUNDLE_SD15_VECTOR else vector
    if not is_bundle_word(word) or encoder not in BUNDLE_ENCODERS:
        raise BadFileError(
            f"{key}: not a bundled embedding this studio knows (bundle_emb.<word>.clip_l, ...)"
        )
    return word, encoder


def bundled_words(shapes: Mapping[str, tuple[int, ...]]) -> dict[str, int]:
    """{word: vectors} of the embeddings bundled in a file, from its keys and shapes (keys checked)."""
    words: dict[str, int] = {}
    for key, shape in shapes.items():
        if key.startswith(BUNDLE_PREFIX):
            words[parse_bundle_key(key)[0]] = shape[0] if len(shape) == 2 else 1
    return words


B_LORA_CONTENT = "unet.up_blocks.0.attentions.0."
B_LORA_STYLE = "unet.up_blocks.0.attentions.1."


class ModulePaths:
    """What the module paths of a LoRA say, for any class with a `modules` mapping keyed by canonical path."""

    modules: Mapping[str, object]

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


@dataclass
class KeyGroups:
    """The modules of a file: canonical path -> {role: key}; plus the layout ("kohya", "peft", ...)."""

    format: str
    modules: dict[str, dict[str, str]] = field(default_factory=dict)


def module_kind(roles: Iterable[str]) -> str:
    """lora, loha or lokr, from the roles a module's tensors play (DoRA and Tucker are variants of lora)."""
    roles = set(roles)
    if roles & set(LOHA_ROLES):
        return "loha"
    if roles & set(LOKR_ROLES):
        return "lokr"
    return "lora"


def detect_format(keys: list[str]) -> str:
    if any(is_kohya_name(k) for k in keys):
        return "kohya"
    if any(_PEFT_KEY.match(k) for k in keys):
        return "peft"
    if any(_OLD_KEY.match(k) or _OLD_PROCESSOR_KEY.match(k) for k in keys):
        return "diffusers_old"
    sample = ", ".join(keys[:3])
    raise KeyMismatchError(
        f"no LoRA keys found (first keys: {sample}). Is this a full model checkpoint rather than a LoRA? "
        "Supported: kohya/A1111/LyCORIS (lora_unet_...), diffusers/PEFT (lora_A/lora_B) and old diffusers (.lora.down)."
    )


def group_keys(keys: Iterable[str]) -> KeyGroups:
    """Group the tensor keys of a LoRA file by module (see the module docstring)."""
    keys = [k for k in keys if isinstance(k, str)]
    fmt = detect_format(keys)
    reader = {"kohya": _kohya, "peft": _peft, "diffusers_old": _old}[fmt]
    groups = KeyGroups(fmt)
    for path, role, key in reader(keys):
        groups.modules.setdefault(path, {})[role] = key
    groups.modules = {p: roles for p, roles in sorted(groups.modules.items()) if set(roles) - {"alpha"}}
    for path, roles in groups.modules.items():
        _check_complete(path, roles)
    return groups


def _kohya(keys: list[str]):
    names = sorted({k.partition(".")[0] for k in keys if is_kohya_name(k)})
    # a file names its UNet modules in one layout: SD1.5 and SDXL original (LDM) names share most paths,
    # so the family is decided once for the whole file
    family = kohya_family_of_ldm_names(names)
    for key in keys:
        name, _, suffix = key.partition(".")
        if not is_kohya_name(name):
            continue
        role = KOHYA_SUFFIXES.get(suffix)
        if role is None:
            if suffix in UNSUPPORTED:
                raise KeyMismatchError(
                    f"{key}: this file stores {UNSUPPORTED[suffix]}, which LoRA Studio does not read; it reads "
                    "LoRA, LoCon (with Tucker), LoHa, LoKr and DoRA. Convert it to one of those first."
                )
            continue  # e.g. an embedding bundled alongside
        try:
            yield parse_kohya_module(name, family), role, key
        except ValueError as exc:
            raise KeyMismatchError(str(exc)) from None


def _peft(keys: list[str]):
    for key in keys:
        if key.endswith(".alpha"):
            yield canonical_peft_path(key.removeprefix("base_model.model.")[: -len(".alpha")]), "alpha", key
        elif m := _PEFT_KEY.match(key):
            yield canonical_peft_path(m[1]), _PEFT_ROLES.get(m[2], m[2]), key


def _old(keys: list[str]):
    for key in keys:
        if m := _OLD_PROCESSOR_KEY.match(key):
            proj = "to_out.0" if m[2] == "to_out" else m[2]
            yield canonical_peft_path(f"{m[1]}.{proj}"), m[3], key
        elif m := _OLD_KEY.match(key):
            yield canonical_peft_path(m[1]), m[2], key


def _check_complete(path: str, roles: dict[str, str]) -> None:
    """Each kind's factors come in sets; a set with a part missing is a damaged file."""
    kind = module_kind(roles)
    if kind == "lora":
        needed: tuple[str, ...] = ("down", "up")
    elif kind == "loha":
        needed = ("hada_w1_a", "hada_w1_b", "hada_w2_a", "hada_w2_b")
        if ("hada_t1" in roles) != ("hada_t2" in roles):
            raise BadFileError(f"module {path}: a LoHa with Tucker factors needs both hada_t1 and hada_t2.")
    else:
        has_w1 = "lokr_w1" in roles or {"lokr_w1_a", "lokr_w1_b"} <= set(roles)
        has_w2 = "lokr_w2" in roles or {"lokr_w2_a", "lokr_w2_b"} <= set(roles)
        if not (has_w1 and has_w2):
            raise BadFileError(
                f"module {path}: a LoKr needs lokr_w1 (or lokr_w1_a and _b) and lokr_w2 (or lokr_w2_a and _b)."
            )
        needed = ()
    missing = [r for r in needed if r not in roles]
    if missing:
        present = ", ".join(sorted(set(roles) - {"alpha"}))
        raise BadFileError(f"module {path} has {present} but no {', '.join(missing)}.")


# --------------------------------------------------------------------------------------------------
# shapes: what weight a module's factors make, and its rank


def weight_shape(kind: str, shapes: Mapping[str, Shape], path: str = "") -> Shape:
    """(out, in, *kernel) of the weight a module adapts, from its factor shapes alone.

    LoHa / LoKr files may store a conv's factors flattened to (rank, in * kh * kw); the kernel is then
    recovered from the module's name (3x3 for SD's conv1 / conv2 / conv, 1x1 otherwise).
    """
    s = {r: tuple(v) for r, v in shapes.items()}
    if kind == "lora":
        out, k = s["up"][0], (s["mid"][2:] if "mid" in s else s["down"][2:])
        return (out, s["down"][1], *k)
    if kind == "loha":
        if "hada_t1" in s:  # Tucker: w1_a (r, out), w1_b (r, in), t1 (r, r, kh, kw)
            return (s["hada_w1_a"][1], s["hada_w1_b"][1], *s["hada_t1"][2:])
        return _unflatten(path, s["hada_w1_a"][0], s["hada_w1_b"][1:])
    w1 = s["lokr_w1"] if "lokr_w1" in s else (s["lokr_w1_a"][0], s["lokr_w1_b"][1])
    if "lokr_w2" in s:
        w2 = s["lokr_w2"]
    elif "lokr_t2" in s:  # Tucker: w2_a (r, b), w2_b (r, d), t2 (r, r, kh, kw)
        w2 = (s["lokr_w2_a"][1], s["lokr_w2_b"][1], *s["lokr_t2"][2:])
    else:
        w2 = (s["lokr_w2_a"][0], *s["lokr_w2_b"][1:])
    if len(w2) == 2 and len(w1) == 2:
        inner = _unflatten(path, w2[0], w2[1:])
        return (w1[0] * inner[0], w1[1] * inner[1], *inner[2:])
    return (w1[0] * w2[0], w1[1] * w2[1], *w2[2:])


def _unflatten(path: str, out: int, rest: Shape) -> Shape:
    if len(rest) > 1:
        return (out, *rest)
    flat = rest[0]
    if path.endswith(_KXK_CONVS) and path.startswith("unet.") and flat % 9 == 0:
        return (out, flat // 9, 3, 3)
    return (out, flat)


def module_rank(kind: str, shapes: Mapping[str, Shape]) -> int | None:
    """The rank that alpha is divided by (None: a LoKr of full matrices, whose scale is 1)."""
    if kind == "lora":
        return shapes["down"][0]
    if kind == "loha":
        return shapes["hada_w1_b"][0]
    for role in ("lokr_w2_b", "lokr_w1_b"):  # ComfyUI's and LyCORIS' choice when both are decomposed
        if role in shapes:
            return shapes[role][0]
    return None


def variant(kind: str, roles: Iterable[str], shapes: Mapping[str, Shape]) -> str:
    """The name a user knows: lora, locon (conv factors), tucker, dora, loha, lokr, loha_dora, lokr_dora."""
    roles = set(roles)
    if kind != "lora":
        return f"{kind}_dora" if "dora_scale" in roles else kind
    if "dora_scale" in roles:
        return "dora"
    if "mid" in roles:
        return "tucker"
    return "locon" if len(shapes["down"]) == 4 and tuple(shapes["down"][2:]) != (1, 1) else "lora"


def check_shapes(path: str, kind: str, shapes: Mapping[str, Shape]) -> None:
    """Refuse factors that do not fit together or are empty: every shape lie a damaged file can tell."""
    s = {r: tuple(v) for r, v in shapes.items()}
    for role, shape in s.items():
        if role == "alpha":
            continue
        if 0 in shape or not shape:
            raise BadFileError(
                f"module {path}: its {role} factor is empty (shape {shape}); rank 0 is not a LoRA."
            )
    ok = {"lora": _lora_fits, "loha": _loha_fits, "lokr": _lokr_fits}[kind](s)
    if not ok:
        detail = ", ".join(f"{r} {v}" for r, v in sorted(s.items()) if r != "alpha")
        raise KeyMismatchError(f"module {path}: its factors do not fit together ({detail}).")
    if "dora_scale" in s:
        out, inp = weight_shape(kind, s, path)[:2]
        if math.prod(s["dora_scale"]) not in (out, inp):
            raise KeyMismatchError(
                f"module {path}: its dora_scale {s['dora_scale']} matches neither the {out} outputs nor "
                f"the {inp} inputs of the layer."
            )


def _lora_fits(s: dict[str, Shape]) -> bool:
    down, up = s["down"], s["up"]
    if len(down) not in (2, 4) or len(up) != len(down) or up[1] != down[0]:
        return False
    if len(up) == 4 and up[2:] != (1, 1):
        return False
    if "mid" in s:
        mid = s["mid"]
        return len(down) == 4 and down[2:] == (1, 1) and len(mid) == 4 and mid[:2] == (down[0], down[0])
    return True


def _loha_fits(s: dict[str, Shape]) -> bool:
    w1a, w1b, w2a, w2b = (s[f"hada_w{i}_{x}"] for i in (1, 2) for x in "ab")
    if "hada_t1" in s:
        t1, t2 = s["hada_t1"], s["hada_t2"]
        return (
            all(len(x) == 2 for x in (w1a, w1b, w2a, w2b))
            and len(t1) == len(t2) >= 3
            and t1[:2] == (w1a[0], w1b[0]) and t2[:2] == (w2a[0], w2b[0])
            and w1a[1] == w2a[1] and w1b[1] == w2b[1] and t1[2:] == t2[2:]
        )  # fmt: skip
    return (
        len(w1a) == len(w2a) == 2
        and w1a[1] == w1b[0] and w2a[1] == w2b[0]
        and w1a[0] == w2a[0] and w1b[1:] == w2b[1:]
    )  # fmt: skip


def _lokr_fits(s: dict[str, Shape]) -> bool:
    if "lokr_w1" not in s and s["lokr_w1_a"][1] != s["lokr_w1_b"][0]:
        return False
    if "lokr_w1" in s and len(s["lokr_w1"]) != 2:
        return False
    if "lokr_w2" in s:
        return len(s["lokr_w2"]) in (2, 4)
    w2a, w2b = s["lokr_w2_a"], s["lokr_w2_b"]
    if "lokr_t2" in s:
        t2 = s["lokr_t2"]
        return len(w2a) == len(w2b) == 2 and len(t2) >= 3 and t2[:2] == (w2a[0], w2b[0])
    return len(w2a) == 2 and w2a[1] == w2b[0]


# --------------------------------------------------------------------------------------------------
# which family a file is for


def detect_lora_family(
    weight_shapes: dict[str, tuple[int, ...]], metadata: dict[str, str] | None = None
) -> str | None:
    """sd15 / sdxl from metadata, then key structure, then cross-attention widths; None if it cannot tell.

    `weight_shapes` maps each module path to the shape of the weight it adapts.
    """
    metadata = metadata or {}
    version = (
        metadata.get("ss_base_model_version", "") + " " + metadata.get("modelspec.architecture", "")
    ).lower()
    if "xl" in version:
        return "sdxl"
    if "v1" in version or "sd_v1" in version:
        return "sd15"
    paths = list(weight_shapes)
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
    for path, shape in weight_shapes.items():  # real widths of cross-attention keys
        if path.endswith("attn2.to_k") and len(shape) == 2:
            return {768: "sd15", 2048: "sdxl"}.get(int(shape[1]))
    return None
