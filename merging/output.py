"""Writing a merge: the LoRA file with its report in the metadata, and ZipLoRA's mergers.

The LoRA is an ordinary file (kohya or PEFT keys) that every tool loads. Its metadata carries:
- "studio_merge_report": the report (merging.report) as compact JSON;
- "studio_merge_method", "studio_merge_sources": what was merged, with which weights and block weights;
- for ZipLoRA, "studio_ziplora_mergers_summary" (per source: mean merger, share of columns switched off)
  and the mergers themselves: as JSON under "studio_ziplora_mergers" when small, otherwise in a sidecar
  OUT.mergers.safetensors (keys "<module path>.merger.<source index>") named by "studio_ziplora_mergers_file".

    >>> mergers = read_mergers("zip.safetensors")  # doctest: +SKIP
    >>> mergers["unet.mid_block.attentions.0.proj_in"][0].shape  # doctest: +SKIP
    torch.Size([1280])
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

from merging.report import MergeReport
from merging.sources import MergeSource
from studio.core.families import Family
from studio.core.io import MERGERS_SUFFIX, atomic_save_safetensors, read_header, read_safetensors
from studio.core.lora_files import LoraSet, write_lora

REPORT_KEY = "studio_merge_report"
MERGERS_KEY = "studio_ziplora_mergers"
MAX_INLINE_MERGERS = 20_000  # merger values kept in the metadata; more go to a sidecar file
SAVE_DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}


def write_merge(
    lora: LoraSet,
    out: str | Path,
    *,
    family: Family,
    method: str,
    sources: list[MergeSource],
    report: MergeReport,
    fmt: str = "kohya",
    save_dtype: str = "auto",
    mergers: dict | None = None,
    overwrite: bool = False,
) -> tuple[Path, Path | None]:
    """Write the merged LoRA (and the mergers' sidecar when needed); returns (lora path, sidecar or None)."""
    out = Path(out)
    dtype = save_dtype_of(save_dtype, sources)
    report.tensor_bytes = sum(
        (m.up.numel() + m.down.numel()) * dtype.itemsize + 4 for m in lora.modules.values()
    )
    metadata = {
        "studio_merge_method": method,
        "studio_merge_sources": json.dumps([s.describe() for s in sources], separators=(",", ":")),
        "modelspec.title": out.stem,
    }
    sidecar = None
    if mergers:
        merger_meta, sidecar = store_mergers(mergers, sources, out, overwrite)
        metadata |= merger_meta
    metadata[REPORT_KEY] = report.to_json()
    path = write_lora(lora, out, fmt=fmt, family=family, metadata=metadata, overwrite=overwrite, dtype=dtype)
    report.file_bytes = path.stat().st_size
    return path, sidecar


MERGER_OFF = 0.1  # a merger under this (in size) switches its column off


def merger_stats(mergers: dict) -> dict[str, dict[str, float]]:
    """{adapter name: {"mean": mean merger, "off": share of its columns switched off}} of mergers
    {module path: {adapter name: (in,) tensor}}."""
    per_adapter: dict[str, list[torch.Tensor]] = {}
    for per in mergers.values():
        for name, m in per.items():
            per_adapter.setdefault(name, []).append(m.detach().float().flatten())
    stats = {}
    for name, values in per_adapter.items():
        flat = torch.cat(values)
        stats[name] = {"mean": float(flat.mean()), "off": float((flat.abs() < MERGER_OFF).float().mean())}
    return stats


def store_mergers(mergers: dict, sources: list[MergeSource], out: Path, overwrite: bool):
    """({metadata}, sidecar path or None) for mergers {module path: {"s<i>": (in,) tensor}}."""
    total = sum(m.numel() for per in mergers.values() for m in per.values())
    stats = merger_stats(mergers)
    summary = {s.label: stats[f"s{i}"] for i, s in enumerate(sources) if f"s{i}" in stats}
    meta = {f"{MERGERS_KEY}_summary": json.dumps(summary, separators=(",", ":"))}
    if total <= MAX_INLINE_MERGERS:
        inline = {
            p: {k[1:]: [round(float(v), 5) for v in m] for k, m in per.items()} for p, per in mergers.items()
        }
        meta[MERGERS_KEY] = json.dumps(inline, separators=(",", ":"))
        return meta, None
    sidecar = out.with_name(out.name.removesuffix(".safetensors") + MERGERS_SUFFIX)
    tensors = {f"{p}.merger.{k[1:]}": m for p, per in mergers.items() for k, m in per.items()}
    atomic_save_safetensors(tensors, sidecar, {"studio_mergers_for": out.name}, overwrite=overwrite)
    meta[f"{MERGERS_KEY}_file"] = sidecar.name
    return meta, sidecar


def read_mergers(path: str | Path) -> dict[str, dict[int, torch.Tensor]]:
    """ZipLoRA mergers of a merged file: {module path: {source index: merger}} (from metadata or sidecar)."""
    path = Path(path)
    _, metadata = read_header(path)
    if MERGERS_KEY in metadata:
        raw = json.loads(metadata[MERGERS_KEY])
        return {p: {int(k): torch.tensor(v) for k, v in per.items()} for p, per in raw.items()}
    if f"{MERGERS_KEY}_file" in metadata:
        tensors, _ = read_safetensors(path.with_name(metadata[f"{MERGERS_KEY}_file"]))
        out: dict[str, dict[int, torch.Tensor]] = {}
        for key, value in tensors.items():
            module, _, index = key.rpartition(".merger.")
            out.setdefault(module, {})[int(index)] = value
        return out
    return {}


def save_dtype_of(name: str, sources: list[MergeSource]) -> torch.dtype:
    """The dtype to save: as asked, or (auto) the most precise dtype among the sources' factors."""
    if name != "auto":
        return SAVE_DTYPES[name]
    dtypes = {t.dtype for s in sources for m in s.lora.modules.values() for t in m.factors().values()}
    if dtypes <= {torch.float16}:
        return torch.float16
    if dtypes <= {torch.bfloat16}:
        return torch.bfloat16
    return torch.float32
