"""The LoRA library: every LoRA in the workspace with what it is, how it was trained and what it draws;
delete to a trash folder and restore from it.

Files are described from their headers (studio.core.lora_summary: no torch), cached by path, size and time,
so the page can list a large library at once.

    >>> lib = Library(workspace)                      # doctest: +SKIP
    >>> [e.name for e in lib.entries()]               # doctest: +SKIP
    ['dog', 'merged-style']
    >>> lib.delete("runs/dog/dog.safetensors")        # doctest: +SKIP
"""

from __future__ import annotations

import json
import shutil
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from studio.app.workspace import Workspace
from studio.core.errors import ConfigError, StudioError
from studio.core.families import FAMILY_NAMES
from studio.core.images import image_files
from studio.core.lora_summary import LoraSummary, summarize_lora

TRAINING_KEYS = ("method", "network_type", "max_steps", "rank", "alpha", "learning_rate", "resolution",
                 "extra_resolutions", "batch_size", "data_dir", "model")  # fmt: skip


@dataclass
class LibraryEntry:
    """One LoRA file of the workspace as the library shows it."""

    path: str  # workspace-relative
    name: str
    size_bytes: int
    modified: float
    family: str = "?"
    format: str = "?"
    kinds: list[str] = field(default_factory=list)
    ranks: list[int] = field(default_factory=list)
    blocks: list[str] = field(default_factory=list)
    modules: int = 0
    trigger: str = ""  # the instance prompt or the most frequent caption tags
    words: dict[str, int] = field(default_factory=dict)  # learnt trigger words it bundles: {word: vectors}
    tags: list[tuple[str, int]] = field(default_factory=list)
    training: dict[str, Any] = field(default_factory=dict)
    samples: list[str] = field(default_factory=list)  # newest first (absolute paths)
    error: str | None = None  # why the file cannot be read

    def row(self) -> list:
        """The library table's row."""
        rank = "-".join(map(str, (self.ranks[0], self.ranks[-1]))) if len(self.ranks) > 1 else (
            str(self.ranks[0]) if self.ranks else "-")  # fmt: skip
        return [self.name, self.path, self.family, ", ".join(self.kinds) or self.format, rank,
                ", ".join(self.blocks), self.trigger, f"{self.size_bytes / 2**20:.1f} MB",
                time.strftime("%Y-%m-%d %H:%M", time.localtime(self.modified))]  # fmt: skip


COLUMNS = ["name", "file", "family", "kind", "rank", "blocks", "trigger / tags", "size", "modified"]


class Library:
    """The workspace's LoRAs (see the module docstring)."""

    def __init__(self, workspace: Workspace) -> None:
        self.ws = workspace
        self._cache: dict[tuple[str, int, int], LibraryEntry] = {}

    @property
    def trash(self) -> Path:
        return self.ws.root / "trash"

    def entries(self) -> list[LibraryEntry]:
        """Every LoRA of the workspace, newest first."""
        out = [self.entry(rel) for rel in self.ws.lora_files()]
        return sorted(out, key=lambda e: e.modified, reverse=True)

    def entry(self, rel: str) -> LibraryEntry:
        path = self._inside(rel)
        st = path.stat()
        key = (str(path), st.st_mtime_ns, st.st_size)
        if key not in self._cache:
            self._cache[key] = self._describe(path, st.st_size, st.st_mtime)
        return self._cache[key]

    def _describe(self, path: Path, size: int, modified: float) -> LibraryEntry:
        rel = str(path.relative_to(self.ws.root))
        entry = LibraryEntry(rel, path.stem, size, modified)
        samples = path.parent / "samples"  # a trained LoRA's sample images (runs/<name>/samples)
        if path.parent != self.ws.loras and samples.is_dir():
            entry.samples = [str(p) for p in reversed(image_files(samples))]
        try:
            summary = summarize_lora(path)
        except StudioError as exc:
            entry.error = str(exc)
            return entry
        fill_entry(entry, summary)
        return entry

    def _inside(self, rel: str) -> Path:
        path = self.ws.resolve(rel)
        if path.suffix != ".safetensors" or not path.is_file():
            raise ConfigError(f"{rel}: no such LoRA in the workspace")
        if self.ws.loras not in path.parents and self.ws.runs not in path.parents:
            raise ConfigError(f"{rel}: LoRAs live in loras/ or runs/<name>/")
        return path

    # ------------------------------------------------------------------------------------ trash
    def delete(self, rel: str) -> str:
        """Move a LoRA to the workspace's trash (restorable); returns the trash item's name."""
        path = self._inside(rel)
        item = f"{time.strftime('%Y%m%d-%H%M%S')}-{path.stem}"
        target = self.trash / item / path.relative_to(self.ws.root)
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.move(str(path), str(target))
        return item

    def trash_items(self) -> list[tuple[str, str]]:
        """(item, original workspace-relative path) of everything in the trash, newest first."""
        if not self.trash.is_dir():
            return []
        items = []
        for folder in sorted(self.trash.iterdir(), reverse=True):
            files = [p for p in folder.rglob("*.safetensors")]
            if files:
                items.append((folder.name, str(files[0].relative_to(folder))))
        return items

    def restore(self, item: str) -> str:
        """Put a trashed LoRA back where it was; returns its workspace-relative path."""
        folder = self.trash / self.ws.check_name(item, "trash item")
        files = list(folder.rglob("*.safetensors")) if folder.is_dir() else []
        if not files:
            raise ConfigError(f"nothing named {item!r} in the trash")
        rel = files[0].relative_to(folder)
        target = self.ws.resolve(rel)
        if target.exists():
            raise ConfigError(f"{rel} exists again; rename or delete it before restoring")
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.move(str(files[0]), str(target))
        shutil.rmtree(folder, ignore_errors=True)
        return str(rel)


def fill_entry(entry: LibraryEntry, summary: LoraSummary) -> None:
    """What the header says: kind, rank, blocks, and from kohya / studio metadata, triggers and training."""
    meta = summary.metadata
    entry.family = FAMILY_NAMES.get(summary.family or "", "?")
    entry.format, entry.kinds, entry.ranks = summary.format, summary.kinds, summary.ranks
    entry.blocks, entry.modules = summary.blocks, len(summary.modules)
    entry.tags = top_tags(meta.get("ss_tag_frequency", ""))
    entry.trigger = meta.get("studio_instance_prompt") or ", ".join(t for t, _ in entry.tags[:5])
    entry.words = dict(summary.embeddings)
    entry.training = training_settings(meta)


def top_tags(raw: str, n: int = 12) -> list[tuple[str, int]]:
    """The most frequent caption tags of kohya's ss_tag_frequency ({dataset: {tag: count}})."""
    try:
        data = json.loads(raw) if raw else {}
    except (ValueError, RecursionError):
        return []
    counts: Counter[str] = Counter()
    if isinstance(data, dict):
        for tags in data.values():
            if isinstance(tags, dict):
                counts.update({str(k): int(v) for k, v in tags.items() if isinstance(v, (int, float))})
    return counts.most_common(n)


def training_settings(meta: dict[str, str]) -> dict[str, Any]:
    """The settings a LoRA was trained with: the studio's own record, else kohya's ss_* fields."""
    try:
        config = json.loads(meta.get("studio_train_config", "") or "{}")
    except (ValueError, RecursionError):
        config = {}
    if isinstance(config, dict) and config:
        out = {k: config[k] for k in TRAINING_KEYS if config.get(k, []) != []}  # an empty list says nothing
        if "data_dir" in out:
            out["data_dir"] = Path(str(out["data_dir"])).name
        return out
    kohya = {"ss_network_dim": "rank", "ss_network_alpha": "alpha", "ss_learning_rate": "learning_rate",
             "ss_max_train_steps": "max_steps", "ss_resolution": "resolution", "ss_network_module": "network"}  # fmt: skip
    return {name: meta[key] for key, name in kohya.items() if meta.get(key)}
