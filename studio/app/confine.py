"""Every path a job will use, from any field, preset or "more options" TOML, kept inside the workspace.

Called once, on the finished config (after the form, the preset and the TOML are merged), so no source of
options can point a job elsewhere: each path is resolved inside the workspace (symlinks followed) and written
back absolute, so the worker uses exactly what was checked. Pickle loading stays off unless the studio was
started with --allow-pickle.

    >>> cfg = confine(workspace, cfg, allow_pickle=False)  # doctest: +SKIP
"""

from __future__ import annotations

import dataclasses
from typing import Any

from studio.app.workspace import Workspace
from studio.core.errors import ConfigError
from studio.core.lora_ref import parse_lora_ref

# field -> what it holds: "path" (a file or folder), "model" (a path, or demo:NAME / "" for a built-in
# model), "resume" (a checkpoint folder, or "" / "latest"), "refs" (FILE[:WEIGHT[:BLOCKS]] texts),
# "folders" (a list of folders, "" allowed), "stack" (LoraSpecs), "lora_text" (FILE[:WEIGHT] or empty),
# "regions" (Regions, each with an optional LoraSpec)
PATH_FIELDS: dict[str, dict[str, str]] = {
    "TrainConfig": {"model": "model", "data_dir": "path", "output_dir": "path", "class_data_dir": "path",
                    "reg_data_dir": "path", "resume": "resume", "logging_dir": "path"},
    "MergeConfig": {"model": "model", "sources": "refs", "out": "path", "into_base": "path",
                    "references": "folders"},
    "GenerateConfig": {"model": "model", "loras": "stack", "b_lora_content": "lora_text",
                       "b_lora_style": "lora_text", "out": "path", "regions": "regions"},
}  # fmt: skip


def confine(ws: Workspace, cfg: Any, *, allow_pickle: bool = False) -> Any:
    """`cfg` with every path inside the workspace (absolute), or a ConfigError naming the field."""
    kind = type(cfg).__name__
    if kind not in PATH_FIELDS:
        raise ConfigError(f"no path rules for {kind}")
    if getattr(cfg, "allow_pickle", False) and not allow_pickle:
        raise ConfigError(
            "allow_pickle: pickle files can run code when loaded, so the page accepts them only when the "
            "studio was started with `lora-studio ui --allow-pickle`."
        )
    changes = {}
    for name, what in PATH_FIELDS[kind].items():
        value = getattr(cfg, name)
        try:
            changes[name] = _confined(ws, what, value)
        except ConfigError as exc:
            raise ConfigError(f"{name}: {exc}") from None
    return dataclasses.replace(cfg, **changes)


def _confined(ws: Workspace, what: str, value: Any) -> Any:
    if what == "model":
        return value if not value or str(value).startswith("demo:") else str(ws.resolve(value))
    if what == "resume":
        return value if value in ("", "latest") else str(ws.resolve(value))
    if what == "path":
        if value in ("", None):
            return value
        resolved = ws.resolve(value)
        return resolved if not isinstance(value, str) else str(resolved)
    if what == "folders":
        return [str(ws.resolve(v)) if v else "" for v in value]
    if what == "refs":
        return [_ref_text(ws, text) for text in value]
    if what == "lora_text":
        return _ref_text(ws, value) if value else value
    if what == "stack":
        return [dataclasses.replace(spec, path=ws.resolve(spec.path)) for spec in value]
    if what == "regions":
        return [
            dataclasses.replace(r, lora=_confined(ws, "stack", [r.lora])[0]) if r.lora else r for r in value
        ]
    raise ValueError(what)


def _ref_text(ws: Workspace, text: str) -> str:
    ref = parse_lora_ref(text)
    parts = [str(ws.resolve(ref.path)), str(ref.weight)]
    return ":".join(parts + ([ref.blocks] if ref.blocks else []))
