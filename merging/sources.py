"""The LoRAs going into a merge: read, checked against each other, and reduced to scaled factors.

Every method works on the same form: for each source and module, `Factors(up, down)` with the source's
alpha/rank scale, its weight and its block weight folded into `up`, both flattened to 2-D
(conv kernels flattened into the input axis). The source's contribution to the merge is then exactly
`up @ down`, whatever format, kind (LoRA, LoCon, Tucker, LoHa, LoKr, DoRA), rank or alpha the file had
(`module_factors`). DoRA's change depends on the base weights, so its sources need the base model.

    >>> sources, family = load_sources([parse_lora_ref("a.safetensors:0.7")])  # doctest: +SKIP
    >>> f = sources[0].factors()["unet.mid_block.attentions.0.proj_in"]  # doctest: +SKIP
    >>> f.delta().shape  # doctest: +SKIP
    torch.Size([1280, 1280])
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from functools import cached_property
from typing import NamedTuple

import torch

from studio.core.blocks import block_of, format_block_weights, parse_block_weights
from studio.core.errors import ConfigError, FamilyMismatchError, KeyMismatchError, StudioError
from studio.core.families import FAMILY_NAMES, Family
from studio.core.lora_files import AnyModule, LoraModule, LoraSet, check_against_model, read_lora
from studio.core.lora_ref import LoraRef

Shape = tuple[int, ...]


class Factors(NamedTuple):
    """A module's weight change as up @ down: up (out, r), every scale folded in; down (r, in * kh * kw)."""

    up: torch.Tensor
    down: torch.Tensor

    @property
    def rank(self) -> int:
        return int(self.down.shape[0])

    def delta(self) -> torch.Tensor:
        return self.up @ self.down


def module_factors(m: AnyModule, base: torch.Tensor | None = None) -> Factors:
    """A module's exact delta (alpha / rank folded in, no weight) as up @ down, flattened to 2-D.

    LoRA / LoCon / Tucker: their own factors (a Tucker core folded into down). LoHa:
    (A1 B1) * (A2 B2) = (A1 [row-wise Khatri-Rao] A2) (B1 [column-wise Khatri-Rao] B2), exactly, at rank
    r1 * r2; neither peft nor lycoris-lora exports this form, so it is written here. LoKr, Tucker LoHa and
    DoRA: the dense delta (lycoris-lora's algebra) split by an SVD that keeps every singular value above
    float precision, so the factors are the delta.
    """
    if m.is_lowrank:
        m = m.lowrank()
        return Factors(m.up.to(torch.float32).flatten(1) * m.scale, m.down.to(torch.float32).flatten(1))
    f = getattr(m, "factors_", {})
    if m.kind == "loha" and "hada_t1" not in f and not m.needs_base:
        a1, a2 = f["hada_w1_a"].float(), f["hada_w2_a"].float()
        b1, b2 = f["hada_w1_b"].float().flatten(1), f["hada_w2_b"].float().flatten(1)
        up = (a1[:, :, None] * a2[:, None, :]).flatten(1) * m.scale
        return Factors(up, (b1[:, None, :] * b2[None, :, :]).flatten(0, 1))
    delta = m.delta(base).to(torch.float64).flatten(1)
    u, s, vh = torch.linalg.svd(delta, full_matrices=False)
    keep = max(1, int((s > s[0] * 1e-7).sum())) if s.numel() and s[0] > 0 else 1
    f = balanced_factors(u[:, :keep], s[:keep], vh[:keep])
    return Factors(f.up.float(), f.down.float())


def balanced_factors(u: torch.Tensor, s: torch.Tensor, vh: torch.Tensor) -> Factors:
    """Factors of u diag(s) vh with the singular values split evenly: up = u sqrt(s), down = sqrt(s) vh."""
    root = s.sqrt()
    return Factors(u * root, root[:, None] * vh)


@dataclass
class MergeSource:
    """One LoRA with the weight and block weights the user gave it.

    `base_weights(path)` gives the base model's weight of a module: DoRA modules need it (run_merge sets it
    when the base model is loaded).
    """

    lora: LoraSet
    weight: float = 1.0
    block_weights: dict[str, float] | None = None
    label: str = "LoRA"
    base_weights: Callable[[str], torch.Tensor] | None = None
    _own: dict[str, Factors] = field(default_factory=dict, repr=False)

    def module_weight(self, path: str) -> float:
        """weight x block weight of one module (0 = the module is left out)."""
        if self.block_weights is None:
            return self.weight
        return self.weight * self.block_weights.get(block_of(path) or "", 1.0)

    def own_factors(self, path: str) -> Factors:
        """The module's own delta as factors: alpha / rank folded in, the merge weight not (made once)."""
        if path in self._own:
            return self._own[path]
        m = self.lora.modules[path]
        if m.needs_base and self.base_weights is None:
            raise ConfigError(
                f"{self.label} is a DoRA LoRA: its change depends on the base model's weights. "
                "Pass --model with the base model it was trained on."
            )
        self._own[path] = module_factors(m, self.base_weights(path) if m.needs_base else None)
        return self._own[path]

    @cached_property
    def _factors(self) -> dict[str, Factors]:
        out = {}
        for path in self.lora.modules:
            w = self.module_weight(path)
            if w == 0.0:
                continue
            own = self.own_factors(path)
            out[path] = Factors(own.up * w, own.down)
        return out

    def factors(self) -> dict[str, Factors]:
        """path -> Factors of the modules this source contributes (weight 0 modules left out)."""
        return self._factors

    def describe(self) -> dict:
        return {
            "file": self.label,
            "weight": self.weight,
            "blocks": format_block_weights(self.block_weights, self.lora.family)
            if self.block_weights
            else None,
            "ranks": self.lora.ranks,
            "format": self.lora.source_format,
            "modules": len(self.lora.modules),
        }


def load_sources(
    specs: Iterable[LoraRef], family: Family | None = None, *, allow_pickle: bool = False
) -> tuple[list[MergeSource], Family]:
    """Read every source, refuse mixed families and mismatched layer shapes, parse block weights."""
    loras = [(spec, read_lora(spec.path, allow_pickle=allow_pickle)) for spec in specs]
    family = resolve_family([lora for _, lora in loras], family)
    sources = []
    labels = [spec.path.name for spec, _ in loras]
    for n, (spec, lora) in enumerate(loras):
        lora.family = family
        block_weights = None
        if spec.blocks:
            try:
                block_weights = parse_block_weights(spec.blocks, family)
            except ConfigError as exc:
                raise ConfigError(f"{spec.path}: block weights {spec.blocks!r}: {exc}") from None
        label = labels[n] if labels.count(labels[n]) == 1 else f"{labels[n]}#{n + 1}"
        sources.append(MergeSource(lora, spec.weight, block_weights, label))
    check_shapes(sources)
    return sources, family


def resolve_family(loras: list[LoraSet], family: Family | None) -> Family:
    """The one family every LoRA is for; FamilyMismatchError naming the files when they disagree."""
    known = [(lora.label(), lora.family) for lora in loras if lora.family is not None]
    if family is not None:
        for label, fam in known:
            if fam != family:
                raise FamilyMismatchError(
                    f"{label} is a {FAMILY_NAMES[fam]} LoRA but the merge is for {FAMILY_NAMES[family]}. "
                    "Merge only LoRAs made for the same base model family."
                )
        return family
    families = {fam for _, fam in known}
    if len(families) > 1:
        by_family = {fam: next(label for label, f in known if f == fam) for fam in families}
        a, b = sorted(by_family)
        raise FamilyMismatchError(
            f"cannot merge LoRAs for different model families: {by_family[a]} is {FAMILY_NAMES[a]}, "
            f"{by_family[b]} is {FAMILY_NAMES[b]}. Merge only LoRAs made for the same family."
        )
    if not families:
        raise StudioError(
            "cannot tell whether these LoRAs are for SD1.5 or SDXL (no metadata, no telling keys); "
            "pass --family sd15 or --family sdxl."
        )
    return families.pop()


def check_shapes(sources: list[MergeSource]) -> None:
    """Refuse two sources that adapt the same module with different widths or kernels."""
    seen: dict[str, tuple[Shape, str]] = {}
    for source in sources:
        for path, m in source.lora.modules.items():
            shape = module_shape(m)
            if path not in seen:
                seen[path] = (shape, source.label)
                continue
            other, label = seen[path]
            if _same_shape(shape, other):
                continue
            raise KeyMismatchError(
                f"layer {path}: {label} adapts it with shape {other} but {source.label} with {shape}. "
                "These LoRAs were made for models with different layer sizes and cannot be merged."
            )


def module_shape(m: AnyModule) -> Shape:
    """Weight shape the module adapts: (out, in) or (out, in, kh, kw)."""
    return tuple(int(d) for d in m.weight_shape)


def _same_shape(a: Shape, b: Shape) -> bool:
    pad = lambda s: s if len(s) == 4 else (*s, 1, 1)  # noqa: E731 - Linear == 1x1 conv
    return pad(a) == pad(b)


def layouts(sources: list[MergeSource], model_shapes: Mapping[str, Shape] | None = None) -> dict[str, Shape]:
    """Weight shape of every module of the merge: the model's when known, else the sources' (4-D wins).

    Files disagree on 1x1 convs (stored 2-D or 4-D); the model decides when given, otherwise a 4-D form in
    any source shows the module is a conv.
    """
    out: dict[str, Shape] = {}
    for source in sources:
        if model_shapes is not None:
            check_against_model(source.lora, source.lora.family, dict(model_shapes))
        for path, m in source.lora.modules.items():
            shape = tuple(model_shapes[path]) if model_shapes is not None else module_shape(m)
            if path not in out or len(shape) > len(out[path]):
                out[path] = shape
    return out


def union_paths(sources: list[MergeSource]) -> list[str]:
    """Every module some source contributes to, in a stable order."""
    paths: dict[str, None] = {}
    for source in sources:
        paths.update(dict.fromkeys(source.factors()))
    return list(paths)


def lora_from_factors(
    factors: Mapping[str, Factors], shapes: Mapping[str, Shape], family: Family, metadata: dict | None = None
) -> LoraSet:
    """A LoraSet (alpha = rank, i.e. scale 1) from flattened factors, reshaped to each module's kind."""
    modules = {}
    for path, f in factors.items():
        shape = shapes[path]
        down, up = f.down.contiguous(), f.up.contiguous()
        if len(shape) == 4:
            down = down.reshape(f.rank, *shape[1:])
            up = up.reshape(shape[0], f.rank, 1, 1)
        modules[path] = LoraModule(down, up, float(f.rank))
    return LoraSet(modules, family, dict(metadata or {}), None, None)


def require_nonempty(factors: Mapping[str, Factors], sources: list[MergeSource]) -> None:
    if not factors:
        labels = ", ".join(s.label for s in sources)
        raise ConfigError(
            f"nothing to merge: every module of {labels} has weight 0 (check the weights and block weights)."
        )
