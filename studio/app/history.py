"""Every image this workspace made, newest first, with its settings read back from the PNG's record; and
those settings as the Generate tab's fields again ("reuse these settings").

    >>> items = history(workspace)                    # doctest: +SKIP
    >>> items[0].caption                              # doctest: +SKIP
    'seed 1234 · a red circle · dog.safetensors 0.8'
    >>> reuse(workspace, items[0].name)["seed"]       # doctest: +SKIP
    1234
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from studio.app.workspace import Workspace
from studio.core.errors import ConfigError, StudioError


@dataclass
class HistoryItem:
    path: str  # absolute, for the gallery
    name: str
    record: dict[str, Any] | None  # None: an image without a LoRA Studio record

    @property
    def caption(self) -> str:
        if not self.record:
            return self.name
        r = self.record
        loras = ", ".join(f"{Path(x['path']).name} {x['weight']:g}" for x in r.get("loras", []))
        text = f"seed {r.get('seed')} · {r.get('prompt', '')[:60]}"
        return text + (f" · {loras}" if loras else "")


def history(ws: Workspace, limit: int = 60) -> list[HistoryItem]:
    """The newest `limit` images of outputs/ (grids included), each with its record when it has one."""
    from studio.generation.records import read_record

    files = sorted(ws.outputs.rglob("*.png"), key=lambda p: p.stat().st_mtime, reverse=True)[:limit]
    items = []
    for path in files:
        try:
            record = read_record(path)
        except StudioError:
            record = None
        items.append(HistoryItem(str(path), str(path.relative_to(ws.outputs)), record))
    return items


def reuse(ws: Workspace, name: str) -> dict[str, Any]:
    """The Generate tab's field values that make an image of the history again."""
    from studio.app.regions import rows_from_record
    from studio.generation.records import read_record

    path = ws.resolve(ws.outputs / name)
    if ws.outputs not in path.parents or not path.is_file():
        raise ConfigError(f"no image {name!r} in outputs/")
    r = read_record(path)
    loras = [_relative(ws, x["path"]) for x in r.get("loras", [])]
    model = r.get("model", {}).get("path") or "demo:sd15"
    return {
        "prompt": r.get("prompt", ""),
        "negative_prompt": r.get("negative_prompt", ""),
        "model": model if model.startswith("demo:") else _relative(ws, model),
        "loras": loras,
        "weights": ", ".join(f"{x['weight']:g}" for x in r.get("loras", [])),
        "mode": r.get("mode", "merge"),
        "steps": r.get("steps", 20),
        "cfg": r.get("cfg", 7.0),
        "seed": r.get("seed", -1),
        "size": r.get("width") or 0,
        "regions": rows_from_record(r.get("regions", []), lambda p: _relative(ws, p)),
        "region_base": r.get("region_base", 0.2),
        "region_mode": r.get("region_mode", "mask"),
    }


def _relative(ws: Workspace, path: str) -> str:
    full = Path(path)
    try:
        return str(full.resolve().relative_to(ws.root))
    except ValueError:
        return str(full)
