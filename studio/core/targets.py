"""Block-wise targeting: which modules get a LoRA, with which rank, alpha and learning-rate multiplier.

Training, inference block weights and merges share the block ids of studio.core.blocks (BASE, IN00.., M00, OUT00..).
A TargetSpec says what the user asked for; plan_targets() turns it into one ModuleTarget per module:

    >>> spec = TargetSpec(rank=8, blocks=["OUT00", "OUT01"], layers=["to_q", "to_k", "to_v", "to_out.0"])
    >>> plan = plan_targets(model_module_shapes(pipe), "sdxl", spec)  # doctest: +SKIP
    >>> sorted({t.block for t in plan.values()})  # doctest: +SKIP
    ['OUT00', 'OUT01']

Default modules are kohya's: Linear and 1x1 conv inside the transformer blocks (attention, ff, proj_in/out) and,
when the text encoder is trained, its attention and MLP layers. LoCon (conv_rank > 0) adds every module of the
resnets and samplers: 3x3 convs get conv_rank, Linear/1x1 ones (time_emb_proj, conv_shortcut) get rank.

kohya's training-side vectors are accepted as they are typed in kohya:
- block_dims / block_alphas / conv_block_dims / conv_block_alphas: 25 values for SD1.x (kohya index k = block
  IN00..IN11, M00, OUT00..OUT11, i.e. the 26-id index k+1; IN00 never has a LoRA) or 23 values for SDXL
  (kohya's SDXL layout: 0 = time/label embedding, 1-9 = IN00..IN08, 10-12 = the three parts of the middle
  block (resnets.0, attentions.0, resnets.1), 13-21 = OUT00..OUT08, 22 = output layers; the studio never
  adapts the embedding or output layers, so their values must be 0 or are ignored).
- down_lr_weight / up_lr_weight: 12 values (SD1.x) or 9 (SDXL), or a shape name sine, cosine, linear,
  reverse_linear, zeros with an optional "+offset" (e.g. "cosine+0.2"); mid_lr_weight: 1 value (SD1.x) or 3 (SDXL).
- block_lr_zero_threshold: a block whose learning-rate weight is at or under it gets no module at all.
"""

from __future__ import annotations

import math
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

from studio.core.blocks import FAMILY_BLOCK_IDS, block_of, check_block_id
from studio.core.errors import ConfigError
from studio.core.families import FAMILY_NAMES, Family
from studio.core.keys import kohya_index

_UNET_ATTN = ".attentions."
_UNET_CONV_PARTS = (".resnets.", ".downsamplers.", ".upsamplers.")
_TE_PARTS = (".self_attn.", ".mlp.")
LR_SHAPES = ("sine", "cosine", "linear", "reverse_linear", "zeros")

# Vector lengths per family: (block_dims, down/up lr weights, mid lr weights).
DIMS_LEN = {"sd15": 25, "sdxl": 23}
UPDOWN_LEN = {"sd15": 12, "sdxl": 9}
MID_LEN = {"sd15": 1, "sdxl": 3}


@dataclass(frozen=True)
class ModuleTarget:
    """How one module is adapted: delta = (alpha / rank) * up @ down, trained at lr x lr_scale."""

    rank: int
    alpha: float
    lr_scale: float
    block: str
    conv: bool = False


@dataclass
class TargetSpec:
    """What the user asked for. Empty/None fields mean "kohya's default"."""

    rank: int = 16
    alpha: float | None = None  # None: alpha = rank (scale 1)
    conv_rank: int = 0  # > 0: LoCon, also adapt resnets and samplers
    conv_alpha: float | None = None
    text_encoder: bool = False
    blocks: Sequence[str] = ()  # only these block ids ("BASE" = text encoders); empty = all
    layers: Sequence[str] = ()  # only modules whose path ends with one of these names, e.g. "to_q"
    block_rank: Mapping[str, int] = field(default_factory=dict)  # by block id; 0 = no module
    block_alpha: Mapping[str, float] = field(default_factory=dict)
    block_lr: Mapping[str, float] = field(default_factory=dict)  # learning-rate multiplier by block id
    block_dims: Sequence[int] | None = None
    block_alphas: Sequence[float] | None = None
    conv_block_dims: Sequence[int] | None = None
    conv_block_alphas: Sequence[float] | None = None
    down_lr_weight: str | Sequence[float] | None = None
    mid_lr_weight: str | Sequence[float] | None = None
    up_lr_weight: str | Sequence[float] | None = None
    block_lr_zero_threshold: float = 0.0


# --------------------------------------------------------------------------------------------------
# kohya indices and vectors


def lr_weight_vector(spec: str | Sequence[float], length: int, what: str) -> list[float]:
    """A kohya lr-weight vector: explicit values, or a shape name with optional "+offset".

    >>> lr_weight_vector("linear", 3, "down_lr_weight")
    [0.0, 0.5, 1.0]
    >>> lr_weight_vector("zeros+0.5", 2, "up_lr_weight")
    [0.5, 0.5]
    """
    if isinstance(spec, str) and spec.strip().split("+")[0].strip() in LR_SHAPES:
        name, _, offset_text = spec.strip().partition("+")
        try:
            offset = float(offset_text) if offset_text else 0.0
        except ValueError:
            raise ConfigError(f"{what}: cannot read the offset in {spec!r} (e.g. 'cosine+0.2')") from None
        return _shape(name.strip(), length, offset)
    values = _numbers(spec, what)
    if len(values) != length:
        raise ConfigError(
            f"{what} needs {length} values for this model or a shape name ({', '.join(LR_SHAPES)}); "
            f"got {len(values)}"
        )
    return values


def _shape(name: str, n: int, offset: float) -> list[float]:
    span = max(n - 1, 1)
    if name == "zeros":
        return [offset] * n
    if name == "linear":
        return [i / span + offset for i in range(n)]
    if name == "reverse_linear":
        return [i / span + offset for i in reversed(range(n))]
    order = range(n) if name == "sine" else reversed(range(n))
    return [math.sin(math.pi * (i / span) / 2) + offset for i in order]


def _numbers(spec: str | Sequence[float], what: str) -> list[float]:
    if isinstance(spec, str):
        parts = [p for p in re.split(r"[,\s]+", spec.strip()) if p]
    else:
        parts = list(spec)
    try:
        return [float(v) for v in parts]
    except (TypeError, ValueError):
        raise ConfigError(f"{what}: cannot read {spec!r}; give comma-separated numbers") from None


def _dims_vector(values: Sequence[float] | None, family: Family, what: str) -> list[float] | None:
    if values is None:
        return None
    values = _numbers(values, what) if isinstance(values, str) else [float(v) for v in values]
    want = DIMS_LEN[family]
    if len(values) != want:
        other = "sdxl" if family == "sd15" else "sd15"
        hint = (
            f" ({len(values)} is the {FAMILY_NAMES[other]} length)" if len(values) == DIMS_LEN[other] else ""
        )
        raise ConfigError(f"{what} needs {want} values for {FAMILY_NAMES[family]}, got {len(values)}{hint}")
    return values


def parse_block_map(value: str | Mapping[str, float] | None, family: Family, what: str) -> dict[str, float]:
    """'OUT00=8, OUT01=0' or a table {OUT00: 8} -> {block id: number}, ids checked against the family.

    >>> parse_block_map("out00=8, OUT01=0", "sdxl", "block_rank")
    {'OUT00': 8.0, 'OUT01': 0.0}
    """
    if not value:
        return {}
    if isinstance(value, str):
        items = []
        for part in (p for p in re.split(r"[,;]", value) if p.strip()):
            key, sep, num = part.partition("=")
            if not sep:
                raise ConfigError(f"{what}: expected BLOCK=value pairs like 'OUT00=8', got {part.strip()!r}")
            items.append((key, num))
    else:
        items = list(value.items())
    out = {}
    for key, num in items:
        block = check_block_id(str(key).strip().upper(), family)
        try:
            out[block] = float(num)
        except (TypeError, ValueError):
            raise ConfigError(f"{what}: {block} has value {num!r}, which is not a number") from None
    return out


# --------------------------------------------------------------------------------------------------
# planning


def candidate_modules(
    shapes: Mapping[str, tuple[int, ...]], *, text_encoder: bool, conv: bool
) -> dict[str, bool]:
    """Modules kohya would adapt, mapped to whether each is a 3x3 (or larger) conv."""
    out = {}
    for path, shape in shapes.items():
        is_big_conv = len(shape) == 4 and tuple(shape[2:]) != (1, 1)
        if path.startswith("unet."):
            if block_of(path) is None:
                continue
            if _UNET_ATTN in path and not is_big_conv:
                out[path] = False
            elif conv and any(p in path for p in _UNET_CONV_PARTS):
                out[path] = is_big_conv
        elif text_encoder and any(p in path for p in _TE_PARTS):
            out[path] = False
    return out


def _layer_matches(path: str, layers: Sequence[str]) -> bool:
    return not layers or any(path.endswith("." + name.strip(".")) for name in layers)


def _lr_weights(spec: TargetSpec, family: Family) -> dict[int, float]:
    """kohya index -> lr weight from down/mid/up vectors (indices not covered are absent)."""
    out: dict[int, float] = {}
    n = UPDOWN_LEN[family]
    down_start, up_start = (0, 13) if family == "sd15" else (1, 13)
    mid_start = 12 if family == "sd15" else 10
    if spec.down_lr_weight is not None:
        for i, w in enumerate(lr_weight_vector(spec.down_lr_weight, n, "down_lr_weight")):
            out[down_start + i] = w
    if spec.mid_lr_weight is not None:
        for i, w in enumerate(_mid_vector(spec.mid_lr_weight, family)):
            out[mid_start + i] = w
    if spec.up_lr_weight is not None:
        for i, w in enumerate(lr_weight_vector(spec.up_lr_weight, n, "up_lr_weight")):
            out[up_start + i] = w
    return out


def _mid_vector(spec: str | Sequence[float] | float, family: Family) -> list[float]:
    values = [float(spec)] if isinstance(spec, (int, float)) else _numbers(spec, "mid_lr_weight")
    if len(values) != MID_LEN[family]:
        raise ConfigError(
            f"mid_lr_weight needs {MID_LEN[family]} value(s) for {FAMILY_NAMES[family]}, got {len(values)}"
        )
    return values


def plan_targets(
    shapes: Mapping[str, tuple[int, ...]], family: Family, spec: TargetSpec
) -> dict[str, ModuleTarget]:
    """One ModuleTarget per adapted module (canonical path), after every block/rank/lr rule is applied."""
    for block in spec.blocks:
        check_block_id(block, family)
    dims = _dims_vector(spec.block_dims, family, "block_dims")
    alphas = _dims_vector(spec.block_alphas, family, "block_alphas")
    conv_dims = _dims_vector(spec.conv_block_dims, family, "conv_block_dims")
    conv_alphas = _dims_vector(spec.conv_block_alphas, family, "conv_block_alphas")
    conv = spec.conv_rank > 0 or conv_dims is not None
    lr_by_index = _lr_weights(spec, family)
    plan: dict[str, ModuleTarget] = {}
    for path, is_conv in candidate_modules(shapes, text_encoder=spec.text_encoder, conv=conv).items():
        block = block_of(path)
        if (spec.blocks and block not in spec.blocks) or not _layer_matches(path, spec.layers):
            continue
        k = kohya_index(path, family)
        rank = float(spec.conv_rank if is_conv else spec.rank)
        alpha = spec.conv_alpha if is_conv else spec.alpha
        vec_dims, vec_alphas = (conv_dims, conv_alphas) if is_conv else (dims, alphas)
        if vec_dims is not None and k is not None:
            rank = vec_dims[k]
            alpha = vec_alphas[k] if vec_alphas is not None else alpha
        rank = spec.block_rank.get(block, rank)
        alpha = spec.block_alpha.get(block, alpha)
        lr_scale = spec.block_lr.get(block, lr_by_index.get(k, 1.0) if k is not None else 1.0)
        if int(rank) <= 0 or lr_scale <= spec.block_lr_zero_threshold:
            continue
        plan[path] = ModuleTarget(
            int(rank), float(alpha if alpha is not None else rank), lr_scale, block, is_conv
        )
    if not plan:
        raise ConfigError(_empty_plan_message(spec, family))
    return plan


def _empty_plan_message(spec: TargetSpec, family: Family) -> str:
    chosen = ", ".join(spec.blocks) or "all blocks"
    layers = f" with layers {', '.join(spec.layers)}" if spec.layers else ""
    valid = ", ".join(FAMILY_BLOCK_IDS[family])
    return (
        f"no module of this {FAMILY_NAMES[family]} model gets a LoRA ({chosen}{layers}; ranks, block_dims and "
        f"lr weights at or under block_lr_zero_threshold remove modules). Block ids: {valid}"
    )


def summarize_plan(plan: Mapping[str, ModuleTarget]) -> dict[str, dict[str, object]]:
    """Per block: module count, ranks, alphas and lr multipliers (for logs, events and metadata)."""
    out: dict[str, dict[str, object]] = {}
    for target in plan.values():
        entry = out.setdefault(target.block, {"modules": 0, "ranks": set(), "alphas": set(), "lr": set()})
        entry["modules"] += 1
        entry["ranks"].add(target.rank)
        entry["alphas"].add(target.alpha)
        entry["lr"].add(target.lr_scale)
    from studio.core.blocks import BLOCK_IDS

    return {
        b: {k: sorted(v) if isinstance(v, set) else v for k, v in out[b].items()}
        for b in BLOCK_IDS
        if b in out
    }
