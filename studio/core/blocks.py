"""The one block map: module paths <-> block ids, and block-weight vectors.

Block ids follow the "LoRA Block Weight" convention of A1111/Forge/ComfyUI users (26 ids):
BASE (the text encoders), IN00..IN11, M00, OUT00..OUT11. The rule is the same for SD1.5 and SDXL:

    IN00          = conv_in
    IN(1+3i+j)    = down_blocks.i.resnets.j / down_blocks.i.attentions.j
    IN(3i+3)      = down_blocks.i.downsamplers.0
    M00           = mid_block
    OUT(3i+j)     = up_blocks.i.resnets.j / up_blocks.i.attentions.j (up_blocks.i.upsamplers -> OUT(3i+2))

Module paths are "canonical": the component name followed by the diffusers module path, e.g.
"unet.up_blocks.0.attentions.1.transformer_blocks.0.attn1.to_q" or
"text_encoder_2.text_model.encoder.layers.3.mlp.fc1" (key names: studio.core.keys). Training targets,
inference block weights, block-weighted merges and B-LoRA all use this module.
"""

from __future__ import annotations

import re
import tomllib
from collections.abc import Iterable, Mapping
from functools import cache
from pathlib import Path

from studio.core.errors import ConfigError
from studio.core.families import FAMILY_NAMES, TEXT_ENCODERS, Family

BLOCK_IDS: tuple[str, ...] = (
    ("BASE",) + tuple(f"IN{i:02d}" for i in range(12)) + ("M00",) + tuple(f"OUT{i:02d}" for i in range(12))
)

# Which ids exist in each family (SDXL has 3 down / 3 up blocks).
FAMILY_BLOCK_IDS: dict[str, tuple[str, ...]] = {
    "sd15": BLOCK_IDS,
    "sdxl": ("BASE",)
    + tuple(f"IN{i:02d}" for i in range(9))
    + ("M00",)
    + tuple(f"OUT{i:02d}" for i in range(9)),
}

# The short vectors users type, and which ids each value stands for.
VECTOR_FORMS: dict[int, tuple[str, ...]] = {
    17: ("BASE", "IN01", "IN02", "IN04", "IN05", "IN07", "IN08", "M00")
    + tuple(f"OUT{i:02d}" for i in range(3, 12)),
    12: ("BASE", "IN04", "IN05", "IN07", "IN08", "M00") + tuple(f"OUT{i:02d}" for i in range(6)),
    20: ("BASE",) + tuple(f"IN{i:02d}" for i in range(9)) + ("M00",) + tuple(f"OUT{i:02d}" for i in range(9)),
    26: BLOCK_IDS,
}
VECTOR_FAMILY = {17: "sd15", 12: "sdxl", 20: "sdxl", 26: None}

PRESETS_FILE = Path(__file__).resolve().parents[2] / "presets" / "block_weights.toml"


# --------------------------------------------------------------------------------------------------
# module path -> block id


_DOWN = re.compile(r"^down_blocks\.(\d+)\.(resnets|attentions|downsamplers)\.(\d+)(\.|$)")
_UP = re.compile(r"^up_blocks\.(\d+)\.(resnets|attentions|upsamplers)\.(\d+)(\.|$)")


def block_of(module_path: str) -> str | None:
    """Block id of a canonical module path, or None for modules outside every block (time embedding, conv_out).

    >>> block_of("unet.up_blocks.0.attentions.1.transformer_blocks.0.attn1.to_q")
    'OUT01'
    >>> block_of("text_encoder.text_model.encoder.layers.0.mlp.fc1")
    'BASE'
    """
    component, _, path = module_path.partition(".")
    if component in TEXT_ENCODERS:
        return "BASE"
    if component != "unet":
        raise ValueError(f"not a canonical module path: {module_path!r}")
    if path.startswith("conv_in"):
        return "IN00"
    if path.startswith("mid_block"):
        return "M00"
    if m := _DOWN.match(path):
        i, kind, j = int(m[1]), m[2], int(m[3])
        return f"IN{3 * i + 3:02d}" if kind == "downsamplers" else f"IN{1 + 3 * i + j:02d}"
    if m := _UP.match(path):
        i, kind, j = int(m[1]), m[2], int(m[3])
        return f"OUT{3 * i + 2:02d}" if kind == "upsamplers" else f"OUT{3 * i + j:02d}"
    return None


def unet_prefix_of_block(block_id: str, family: Family) -> list[str]:
    """The diffusers UNet path prefixes that make up a block (inverse of block_of, for targeting).

    >>> unet_prefix_of_block("OUT01", "sdxl")
    ['up_blocks.0.resnets.1', 'up_blocks.0.attentions.1']
    """
    check_block_id(block_id, family)
    if block_id == "BASE":
        return []
    if block_id == "M00":
        return ["mid_block"]
    n = int(block_id[-2:])
    if block_id.startswith("IN"):
        if n == 0:
            return ["conv_in"]
        if n % 3 == 0:
            return [f"down_blocks.{n // 3 - 1}.downsamplers.0"]
        i, j = (n - 1) // 3, (n - 1) % 3
        return [f"down_blocks.{i}.resnets.{j}", f"down_blocks.{i}.attentions.{j}"]
    i, j = n // 3, n % 3
    prefixes = [f"up_blocks.{i}.resnets.{j}", f"up_blocks.{i}.attentions.{j}"]
    if j == 2:
        prefixes.append(f"up_blocks.{i}.upsamplers.0")
    return prefixes


def check_block_id(block_id: str, family: Family) -> str:
    """Return block_id if it exists in `family`, else raise ConfigError listing the valid ids."""
    if block_id not in FAMILY_BLOCK_IDS[family]:
        valid = ", ".join(FAMILY_BLOCK_IDS[family])
        raise ConfigError(f"unknown block id {block_id!r} for {FAMILY_NAMES[family]}; valid ids: {valid}")
    return block_id


# --------------------------------------------------------------------------------------------------
# block-weight vectors


@cache
def load_presets() -> dict[str, dict[str, tuple[float, ...]]]:
    """Named block-weight vectors from presets/block_weights.toml, per family."""
    with open(PRESETS_FILE, "rb") as f:
        raw = tomllib.load(f)
    return {
        fam: {name: tuple(float(v) for v in vec) for name, vec in table.items()} for fam, table in raw.items()
    }


def parse_block_weights(
    spec: str | Iterable[float] | Mapping[str, float], family: Family
) -> dict[str, float]:
    """Turn what a user typed into {block id: weight} for every block of `family`.

    Accepts a preset name ("OUTALL"), a comma-separated vector of 12/17/20/26 values, a list of floats,
    or a mapping {block id: weight} (ids not given keep weight 1). Ids that a short vector does not
    cover get weight 0, as in the popular extension; a vector made for the other family is refused
    rather than silently zeroing blocks (a 17-value SD1.x vector would zero SDXL's OUT00-OUT02).

    >>> parse_block_weights("OUTALL", "sd15")["OUT05"]
    1.0
    >>> parse_block_weights({"OUT01": 0.0}, "sdxl")["OUT01"]
    0.0
    """
    ids = FAMILY_BLOCK_IDS[family]
    if isinstance(spec, Mapping):
        weights = dict.fromkeys(ids, 1.0)
        for key, value in spec.items():
            weights[check_block_id(str(key).upper(), family)] = float(value)
        return weights
    if isinstance(spec, str):
        text = spec.strip()
        presets = load_presets().get(family, {})
        if text.upper() in presets or text in presets:
            values: list[float] = list(presets.get(text.upper(), presets.get(text)))
        elif re.fullmatch(r"[A-Za-z_][\w.]*", text):
            names = ", ".join(presets)
            raise ConfigError(
                f"unknown block-weight preset {text!r} for {FAMILY_NAMES[family]}; known: {names}"
            )
        else:
            try:
                values = [float(v) for v in re.split(r"[,\s]+", text) if v]
            except ValueError:
                raise ConfigError(
                    f"cannot read block weights {text!r}: give a preset name or comma-separated numbers"
                ) from None
    else:
        values = [float(v) for v in spec]
    return _vector_to_weights(values, family)


def _vector_to_weights(values: list[float], family: Family) -> dict[str, float]:
    n = len(values)
    if n not in VECTOR_FORMS:
        raise ConfigError(
            f"a block-weight vector has 12 (SDXL), 17 (SD1.x), 20 (SDXL, all blocks) or 26 values; got {n}"
        )
    made_for = VECTOR_FAMILY[n]
    if made_for is not None and made_for != family:
        hint = " (it would zero OUT00-OUT02 of an SDXL model)" if n == 17 else ""
        raise ConfigError(
            f"a {n}-value block-weight vector is the {FAMILY_NAMES[made_for]} form, but the model is "
            f"{FAMILY_NAMES[family]}{hint}; use the {len(_default_form(family))}-value form or a preset"
        )
    weights = dict.fromkeys(FAMILY_BLOCK_IDS[family], 0.0)
    for block_id, value in zip(VECTOR_FORMS[n], values):
        if block_id in weights:
            weights[block_id] = value
        elif value != 0:
            raise ConfigError(
                f"block {block_id} does not exist in {FAMILY_NAMES[family]} but has weight {value}"
            )
    return weights


def _default_form(family: Family) -> tuple[str, ...]:
    return VECTOR_FORMS[17] if family == "sd15" else VECTOR_FORMS[12]


def format_block_weights(weights: Mapping[str, float], family: Family) -> str:
    """Write weights back in the family's short form when it covers every non-zero block, else 26 values."""
    form = _default_form(family)
    if all(weights.get(b, 0.0) == 0.0 for b in weights if b not in form):
        return ",".join(f"{weights.get(b, 0.0):g}" for b in form)
    return ",".join(f"{weights.get(b, 0.0):g}" for b in BLOCK_IDS)
