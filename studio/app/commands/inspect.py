"""`lora-studio inspect FILE`: family, format, ranks, alphas, blocks, text-encoder parts, metadata, size."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from studio.core.blocks import block_of
from studio.core.errors import StudioError
from studio.core.families import FAMILY_NAMES
from studio.core.io import is_pickle
from studio.core.lora_summary import LoraSummary, ModuleSummary, summarize_lora
from studio.core.text import escape_controls


def register(sub: argparse._SubParsersAction) -> argparse.ArgumentParser:
    p = sub.add_parser("inspect", help="show what is inside a LoRA file", description=__doc__)
    p.add_argument("files", nargs="+", type=Path, help="LoRA files (.safetensors) or PEFT adapter folders")
    p.add_argument("--json", action="store_true", help="print JSON for scripts")
    p.add_argument(
        "--allow-pickle",
        action="store_true",
        help="also read pickle files (.pt/.ckpt/.bin), as tensors only",
    )
    p.add_argument("--modules", action="store_true", help="list every module with its kind, rank and alpha")
    return p


def summarize(path: Path, allow_pickle: bool) -> LoraSummary:
    """A checked summary: from the header and bytes (no torch), or through torch for an allowed pickle."""
    if not (allow_pickle and is_pickle(path)):
        return summarize_lora(path)
    from studio.core.lora_checks import ModuleLayout
    from studio.core.lora_files import read_lora
    from studio.core.lora_set import n_parameters

    lora = read_lora(path, allow_pickle=True)
    modules = {
        p: ModuleSummary(ModuleLayout(m.kind, m.variant, m.rank, m.weight_shape), m.alpha)
        for p, m in lora.modules.items()
    }
    dtypes = sorted(
        {str(t.dtype).removeprefix("torch.") for m in lora.modules.values() for t in m.factors().values()}
    )
    words = {w: next(iter(v.values())).shape[0] for w, v in lora.embeddings.items()}
    return LoraSummary(path, lora.source_format or "?", modules, lora.metadata, dtypes,
                       n_parameters(lora.modules), lora.family, words)  # fmt: skip


def describe(lora: LoraSummary) -> dict:
    """A JSON-friendly summary of a LoRA."""
    per_block: dict[str, int] = {}
    for path in lora.modules:
        block = block_of(path) or "other"
        per_block[block] = per_block.get(block, 0) + 1
    text_parts = [c for c in lora.components if c.startswith("text_encoder")]
    size = _size(lora.path)
    info = {
        "file": str(lora.path),
        "family": lora.family,
        "format": lora.format,
        "kinds": lora.kinds,
        "b_lora": lora.is_b_lora,
        "modules": len(lora.modules),
        "parameters": lora.parameters,
        "dtype": lora.dtypes,
        "ranks": lora.ranks,
        "alphas": lora.alphas,
        "conv_modules": sum(len(m.layout.weight_shape) == 4 for m in lora.modules.values()),
        "blocks": lora.blocks,
        "modules_per_block": per_block,
        "unet": "unet" in lora.components,
        "text_encoders": text_parts,
        "size_bytes": size,
        "metadata": lora.metadata,
        "embeddings": lora.embeddings,
    }
    if lora.is_b_lora:
        info["b_lora_parts"] = {
            "content (OUT00, up_blocks.0.attentions.0)": per_block.get("OUT00", 0),
            "style (OUT01, up_blocks.0.attentions.1)": per_block.get("OUT01", 0),
        }
    return info


def _size(path: Path) -> int | None:
    try:
        return sum(f.stat().st_size for f in path.iterdir()) if path.is_dir() else path.stat().st_size
    except OSError:
        return None


def _human(n: int | None) -> str:
    if n is None:
        return "?"
    for unit in ("B", "KB", "MB", "GB"):
        if n < 1024 or unit == "GB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return str(n)


def print_summary(info: dict, lora: LoraSummary, show_modules: bool) -> None:
    fam = FAMILY_NAMES.get(info["family"], "unknown (could not tell from keys or metadata)")
    te = ", ".join(info["text_encoders"]) or "none"
    print(escape_controls(f"{info['file']}"))
    print(f"  family        {fam}")
    print(f"  format        {info['format']}{'  (B-LoRA)' if info['b_lora'] else ''}")
    print(f"  kind          {', '.join(info['kinds'])}")
    print(
        f"  modules       {info['modules']} ({info['conv_modules']} conv), {info['parameters']:,} parameters, {'/'.join(info['dtype'])}"
    )
    print(f"  rank          {', '.join(map(str, info['ranks']))}")
    print(f"  alpha         {', '.join(f'{a:g}' for a in info['alphas'])}")
    print(f"  unet          {'yes' if info['unet'] else 'no'}")
    print(f"  text encoder  {te}")
    if info["embeddings"]:
        words = ", ".join(f"{w} ({n} vector{'s' * (n != 1)})" for w, n in info["embeddings"].items())
        print(f"  embeddings    {words}")
    blocks = ", ".join(f"{b}({n})" for b, n in info["modules_per_block"].items())
    print(f"  blocks        {blocks}")
    if info.get("b_lora_parts"):
        for part, n in info["b_lora_parts"].items():
            print(f"    {part}: {n} modules")
    print(f"  size          {_human(info['size_bytes'])}")
    if info["metadata"]:
        print("  metadata")
        for key in sorted(info["metadata"]):
            value = info["metadata"][key]
            value = escape_controls(value if len(value) <= 100 else value[:97] + "...")
            print(f"    {escape_controls(key)}: {value}")
    if show_modules:
        print("  modules")
        for path, m in lora.modules.items():
            rank = m.layout.rank if m.layout.rank is not None else "full"
            line = f"    {block_of(path) or '-':6s} {path}  {m.layout.variant}  rank {rank}  alpha {m.shown_alpha:g}"
            print(escape_controls(line))


def run(args: argparse.Namespace) -> int:
    """Describe every file; a file that cannot be read is named with why, and the others are still shown."""
    infos, failed = [], 0
    for path in args.files:
        try:
            lora = summarize(path, args.allow_pickle)
        except StudioError as exc:
            failed += 1
            if len(args.files) == 1:
                raise
            print(f"error: {escape_controls(str(exc))}", file=sys.stderr)
            infos.append({"file": str(path), "error": str(exc)})
            continue
        info = describe(lora)
        if args.json:
            infos.append(info)
        else:
            print_summary(info, lora, args.modules)
    if args.json:
        print(json.dumps(infos if len(infos) > 1 else infos[0], indent=2))
    return 1 if failed else 0
