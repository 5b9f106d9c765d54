"""Do two LoRAs lean on different input columns? ZipLoRA's premise, measured on two LoRA files.

ZipLoRA learns one merger per input column of each layer and pushes the two LoRAs' mergers apart: it works
when each LoRA's change sits in columns the other barely uses. For every linear layer both files adapt,
each LoRA's share of its change in column j is p(j) = ||dW[:, j]||^2 / ||dW||^2, and

- overlap = sum_j min(p_a(j), p_b(j)): 1 when both spread their change over the columns alike, 0 when disjoint;
- used = 1 / sum_j p(j)^2 / width: the share of the layer's columns a LoRA effectively uses.

    python bench/lora_columns.py subject.safetensors style.safetensors
"""

from __future__ import annotations

import argparse
import statistics
import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from merging.sources import module_factors  # noqa: E402
from studio.core.lora_files import read_lora  # noqa: E402


def column_shares(module, generator: torch.Generator | None = None) -> torch.Tensor:
    """Each input column's share of the module's change (with `generator`: of a random change of the same
    shape and rank, the baseline of two LoRAs that know nothing of each other)."""
    f = module_factors(module)
    if generator is not None:
        f = f._replace(
            up=torch.randn(f.up.shape, generator=generator),
            down=torch.randn(f.down.shape, generator=generator),
        )
    energy = f.delta().double().pow(2).sum(0)
    return energy / energy.sum()


def quartiles(values: list[float]) -> str:
    q = statistics.quantiles(values, n=4)
    return f"{q[1]:.2f} ({q[0]:.2f}-{q[2]:.2f})"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("a", type=Path)
    parser.add_argument("b", type=Path)
    args = parser.parse_args(argv)
    a, b = read_lora(args.a).modules, read_lora(args.b).modules
    paths = [p for p in sorted(set(a) & set(b)) if not (a[p].is_conv or b[p].is_conv)]
    print(f"{len(paths)} linear layers adapted by both; median (quartiles):")
    print(f"| factors | overlap | {args.a.stem}: columns used | {args.b.stem}: columns used |")
    print("|---|---|---|---|")
    generator = torch.Generator().manual_seed(0)
    for label, g in (("the files'", None), ("random, same shapes and ranks", generator)):
        overlap, used_a, used_b = [], [], []
        for path in paths:
            pa, pb = column_shares(a[path], g), column_shares(b[path], g)
            overlap.append(float(torch.minimum(pa, pb).sum()))
            used_a.append(float(1 / pa.pow(2).sum() / pa.numel()))
            used_b.append(float(1 / pb.pow(2).sum() / pb.numel()))
        print(f"| {label} | {quartiles(overlap)} | {quartiles(used_a)} | {quartiles(used_b)} |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
