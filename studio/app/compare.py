"""Comparison grids from the Generate tab's fields: LoRA weight (or each LoRA alone) across, seeds down.

>>> path = compare_grid(services, values, columns="0, 0.5, 1", seeds="1, 2")  # doctest: +SKIP
"""

from __future__ import annotations

import dataclasses
import time
from pathlib import Path
from typing import Any

from studio.app import form_configs
from studio.core.errors import ConfigError
from studio.core.io import write_png

MAX_CELLS = 36


def parse_numbers(text: str, kind: type, what: str) -> list:
    parts = [p.strip() for p in str(text or "").replace(";", ",").split(",") if p.strip()]
    try:
        return [kind(p) for p in parts]
    except ValueError:
        raise ConfigError(f"{what}: write numbers separated by commas, e.g. 0, 0.5, 1") from None


def columns_of(cfg, columns: str) -> list[tuple[str, list]]:
    """(label, stack) per column: every LoRA at each weight, or each LoRA alone ("each")."""
    stack = list(cfg.loras)
    if not stack:
        raise ConfigError("a comparison needs at least one LoRA in the stack")
    if str(columns).strip().lower() == "each":
        return [("no LoRA", [])] + [(f"{s.path.name} {s.weight:g}", [s]) for s in stack]
    weights = parse_numbers(columns, float, "columns (LoRA weights)")
    if not weights:
        raise ConfigError("columns: give LoRA weights (e.g. 0, 0.5, 1) or 'each'")
    return [(f"weight {w:g}", [dataclasses.replace(s, weight=w) for s in stack]) for w in weights]


def compare_grid(services, values: dict[str, Any], columns: str, seeds: str) -> Path:
    """Make every cell with the Generate tab's settings and write the labelled grid into outputs/grids/."""
    from studio.generation.grid import compose_grid

    cfg = form_configs.generate_config(services.workspace, values, services.allow_pickle)
    cols = columns_of(cfg, columns)
    seed_list = parse_numbers(seeds, int, "seeds") or [cfg.seed if cfg.seed >= 0 else 0]
    if len(cols) * len(seed_list) > MAX_CELLS:
        raise ConfigError(f"{len(cols)} x {len(seed_list)} images is more than a grid holds ({MAX_CELLS})")
    rows = []
    for seed in seed_list:
        row = []
        for _, stack in cols:
            cell = dataclasses.replace(cfg, loras=stack, seed=seed, batch_count=1)
            row.append(services.generation.generate(cell, save=False)[0].image)
        rows.append(row)
    grid = compose_grid(rows, [f"seed {s}" for s in seed_list], [label for label, _ in cols])
    target = services.workspace.outputs / "grids" / f"grid-{time.strftime('%Y%m%d-%H%M%S')}.png"
    note = f"{cfg.prompt} | columns {columns} | seeds {', '.join(map(str, seed_list))}"
    return write_png(grid, target, {"studio_grid": note})
