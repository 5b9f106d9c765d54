"""What a merge kept and what it lost: per-source preservation, interference between sources, size.

For every module and every source i acting on it, with dW_i the source's weighted delta and M the merged one:
- preservation error  ||(M - dW_i) X|| / ||dW_i X||  on random inputs X = A_i^T z (inputs source i responds
  to: its down-projection's row space) and, where the merge recorded them, on the real inputs the layer
  saw while source i ran (ZipLoRA);
- interference of j on i  ||dW_j X|| / ||dW_i X||  on the same inputs (0 = j does not disturb i);
- exactness  ||(M - sum_i dW_i) X|| / ||sum_i dW_i X||  on isotropic random inputs: 0 for concat,
  the truncation loss for SVD, the pruning + truncation loss for TIES/DARE, the deliberate change for ZipLoRA.
Numbers are means over modules (the worst module is named). Everything is computed from the factors:
no dense matrix is formed.

    >>> report = build_report("svd", sources, merged)  # doctest: +SKIP
    >>> print(report.table())  # doctest: +SKIP
"""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass, field

import torch

from merging.sources import Factors, MergeSource
from studio.core.blocks import BLOCK_IDS, block_of


@dataclass
class SourceRow:
    """How one source came through the merge."""

    label: str
    weight: float
    modules: int
    preservation: float
    worst: float
    worst_module: str
    recorded: float | None = None
    interference: dict[str, float] = field(default_factory=dict)
    model_error: float | None = None  # whole-model noise-prediction error (ZipLoRA), merged
    model_error_sum: float | None = None  # the same for the plain sum


@dataclass
class MergeReport:
    method: str
    sources: list[SourceRow]
    modules: int
    ranks: list[int]
    parameters: int
    exactness: float
    exactness_worst: float
    exactness_worst_module: str
    blocks: dict[str, dict[str, float]]
    interference_inputs: str = "random"
    tensor_bytes: int | None = None
    file_bytes: int | None = None
    details: dict = field(default_factory=dict)
    warnings: list[str] = field(default_factory=list)

    def to_json(self) -> str:
        """Compact JSON (4 significant digits) for the output file's metadata."""
        return json.dumps(_rounded(asdict(self)), separators=(",", ":"))

    def table(self) -> str:
        rank = (
            "-".join(map(str, (self.ranks[0], self.ranks[-1]))) if len(self.ranks) > 1 else str(self.ranks[0])
        )
        size = (
            f", {_human(self.file_bytes or self.tensor_bytes)}"
            if (self.file_bytes or self.tensor_bytes)
            else ""
        )
        lines = [
            f"merge ({self.method}): {len(self.sources)} sources -> {self.modules} modules, rank {rank}, "
            f"{self.parameters:,} parameters{size}",
            f"difference from the exact weighted sum: mean {self.exactness:.3g}, "
            f"worst {self.exactness_worst:.3g} "
            f"({self.exactness_worst_module})",
        ]
        zip_cols = any(s.model_error is not None for s in self.sources)
        header = f"{'source':28s} {'weight':>6s} {'modules':>7s} {'preserve err':>12s} {'worst':>7s}"
        header += f" {'recorded':>8s}"
        if zip_cols:
            header += f" {'model err: sum -> merged':>24s}"
        where = "recorded inputs" if self.interference_inputs == "recorded" else "random inputs it reads"
        header += f"  interference from others (on the source's {where})"
        lines += ["", header]
        for s in self.sources:
            rec = f"{s.recorded:8.3g}" if s.recorded is not None else f"{'-':>8s}"
            row = f"{_cut(s.label, 28):28s} {s.weight:6.3g} {s.modules:7d} {s.preservation:12.3g}"
            row += f" {s.worst:7.3g} {rec}"
            if zip_cols:
                both = f"{s.model_error_sum:.3g} -> {s.model_error:.3g}" if s.model_error is not None else "-"
                row += f" {both:>24s}"
            row += "  " + (", ".join(f"{_cut(k, 20)} {v:.3g}" for k, v in s.interference.items()) or "-")
            lines.append(row)
        lines += [f"warning: {w}" for w in self.warnings]
        return "\n".join(lines)


def build_report(
    method: str,
    sources: list[MergeSource],
    merged: dict[str, Factors],
    *,
    recorded: dict[str, dict[int, torch.Tensor]] | None = None,
    probes: int = 32,
    seed: int = 0,
    details: dict | None = None,
    warnings: list[str] | None = None,
) -> MergeReport:
    """Measure the merge against its sources (see the module docstring)."""
    stats = _Stats(len(sources))
    for index, (path, m) in enumerate(merged.items()):
        generator = torch.Generator().manual_seed(seed * 7_919 + index)
        present = [i for i, s in enumerate(sources) if path in s.factors()]
        parts = {i: sources[i].factors()[path] for i in present}
        iso = torch.randn(m.down.shape[1], probes, generator=generator)
        exact = sum(_apply(parts[i], iso) for i in present) if present else torch.zeros(m.up.shape[0], probes)
        stats.exactness[path] = _ratio(_apply(m, iso) - exact, exact)
        for i in present:
            own = parts[i].down.T @ torch.randn(parts[i].rank, probes, generator=generator)
            stats.add_source(i, path, m, parts, own, recorded_inputs(recorded, path, i))
    rows = [stats.row(i, sources) for i in range(len(sources))]
    worst = max(stats.exactness, key=stats.exactness.get)
    return MergeReport(
        method=method,
        sources=rows,
        modules=len(merged),
        ranks=sorted({f.rank for f in merged.values()}),
        parameters=sum(f.up.numel() + f.down.numel() for f in merged.values()),
        exactness=_mean(stats.exactness.values()),
        exactness_worst=stats.exactness[worst],
        exactness_worst_module=worst,
        blocks=stats.blocks(sources),
        interference_inputs="recorded" if recorded else "random",
        details=details or {},
        warnings=list(warnings or []),
    )


def recorded_inputs(recorded, path: str, index: int) -> torch.Tensor | None:
    if not recorded or path not in recorded or index not in recorded[path]:
        return None
    return recorded[path][index].T.float().cpu()


class _Stats:
    """Per-module measurements, collected while walking the modules once."""

    def __init__(self, n: int):
        self.exactness: dict[str, float] = {}
        self.preserve: list[dict[str, float]] = [{} for _ in range(n)]
        self.recorded: list[list[float]] = [[] for _ in range(n)]
        self.interference: list[dict[int, list[float]]] = [{} for _ in range(n)]

    def add_source(self, i: int, path: str, merged: Factors, parts: dict[int, Factors], own, rec) -> None:
        target = _apply(parts[i], own)
        self.preserve[i][path] = _ratio(_apply(merged, own) - target, target)
        inputs = own
        if rec is not None and rec.shape[1] > 0:
            rec_target = _apply(parts[i], rec)
            if float(rec_target.norm()) > 0:
                self.recorded[i].append(_ratio(_apply(merged, rec) - rec_target, rec_target))
                inputs, target = rec, rec_target
        for j, other in parts.items():
            if j != i:
                self.interference[i].setdefault(j, []).append(_ratio(_apply(other, inputs), target))

    def row(self, i: int, sources: list[MergeSource]) -> SourceRow:
        source, per_module = sources[i], self.preserve[i]
        worst = max(per_module, key=per_module.get) if per_module else "-"
        return SourceRow(
            label=source.label,
            weight=source.weight,
            modules=len(per_module),
            preservation=_mean(per_module.values()),
            worst=per_module.get(worst, 0.0),
            worst_module=worst,
            recorded=_mean(self.recorded[i]) if self.recorded[i] else None,
            interference={sources[j].label: _mean(v) for j, v in self.interference[i].items()},
        )

    def blocks(self, sources: list[MergeSource]) -> dict[str, dict[str, float]]:
        out: dict[str, dict[str, list[float]]] = {}
        for i, per_module in enumerate(self.preserve):
            for path, value in per_module.items():
                out.setdefault(block_of(path) or "other", {}).setdefault(sources[i].label, []).append(value)
        order = {b: n for n, b in enumerate((*BLOCK_IDS, "other"))}
        return {b: {k: _mean(v) for k, v in out[b].items()} for b in sorted(out, key=order.get)}


def _apply(f: Factors, x: torch.Tensor) -> torch.Tensor:
    return f.up @ (f.down @ x)


def _ratio(diff: torch.Tensor, ref: torch.Tensor) -> float:
    norm = float(ref.norm())
    return float(diff.norm()) / norm if norm > 0 else float(diff.norm() > 0)


def _mean(values) -> float:
    values = list(values)
    return sum(values) / len(values) if values else 0.0


def _rounded(value):
    if isinstance(value, float):
        return float(f"{value:.4g}") if math.isfinite(value) else str(value)
    if isinstance(value, dict):
        return {k: _rounded(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_rounded(v) for v in value]
    return value


def _cut(text: str, n: int) -> str:
    return text if len(text) <= n else "..." + text[-(n - 3) :]


def _human(n: int | None) -> str:
    size = float(n or 0)
    for unit in ("B", "KB", "MB", "GB"):
        if size < 1024 or unit == "GB":
            return f"{size:.0f} {unit}" if unit == "B" else f"{size:.1f} {unit}"
        size /= 1024
    return f"{size:.1f} GB"
