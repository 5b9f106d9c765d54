"""The UI's workspace: one folder that holds datasets, trained and merged LoRAs, images and the job queue.

Every path the UI accepts from a user is resolved inside it (`Workspace.resolve`), so a browser can never
read or write elsewhere on the machine.

    >>> ws = Workspace.create("studio-work")        # doctest: +SKIP
    >>> ws.resolve("datasets/dog")                  # doctest: +SKIP
    PosixPath('/home/me/studio-work/datasets/dog')
    >>> ws.resolve("../../etc/passwd")              # doctest: +SKIP
    ConfigError: ../../etc/passwd is outside the workspace ...
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

from studio.core.errors import ConfigError
from studio.core.io import MERGERS_SUFFIX

_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$")


@dataclass(frozen=True)
class Workspace:
    """Folders under `root`: datasets/<name>/, loras/, outputs/, runs/<job>/ and jobs.sqlite."""

    root: Path

    @classmethod
    def create(cls, root: str | Path) -> Workspace:
        """The workspace at `root`, with its folders made if missing."""
        ws = cls(Path(root).expanduser().resolve())
        for folder in (ws.datasets, ws.loras, ws.outputs, ws.runs):
            folder.mkdir(parents=True, exist_ok=True)
        return ws

    @property
    def datasets(self) -> Path:
        return self.root / "datasets"

    @property
    def loras(self) -> Path:
        return self.root / "loras"

    @property
    def outputs(self) -> Path:
        return self.root / "outputs"

    @property
    def runs(self) -> Path:
        return self.root / "runs"

    @property
    def jobs_db(self) -> Path:
        return self.root / "jobs.sqlite"

    def gone(self) -> str | None:
        """What to do when the folder or its job queue was deleted or moved while the studio ran (None while
        both are there). The studio makes neither again by itself: a half-remade workspace would hide the loss."""
        if self.root.is_dir() and self.jobs_db.is_file():
            return None
        lost = "folder" if not self.root.is_dir() else "job queue (jobs.sqlite)"
        return (
            f"The workspace {lost} at {self.root} is gone (deleted or moved while the studio ran): put it back, "
            f"or restart the studio (lora-studio ui --workspace {self.root}) to make a new one."
        )

    def resolve(self, path: str | Path) -> Path:
        """`path` (relative to the workspace, or absolute) as an absolute path that must lie inside it."""
        text = str(path).strip()
        if not text:
            raise ConfigError("empty path: choose a file or folder inside the workspace")
        candidate = Path(text).expanduser()
        full = (candidate if candidate.is_absolute() else self.root / candidate).resolve()
        if full != self.root and self.root not in full.parents:
            raise ConfigError(f"{text} is outside the workspace {self.root}; use a path inside it.")
        return full

    def check_name(self, name: str, what: str = "name") -> str:
        """A dataset, LoRA or job name: letters, digits, '_', '-', '.'; no folders."""
        name = str(name or "").strip()
        if not _NAME.match(name):
            raise ConfigError(
                f"{what} {name!r}: use 1-64 letters, digits, '_', '-' or '.', starting with a letter or digit."
            )
        return name

    def dataset_folder(
        self,
        name: str,
        what: str = "dataset",
        must_exist: bool = True,
        fix: str = "make one in the Dataset tab first",
    ) -> Path:
        """datasets/<name>, the name checked; with must_exist, a ConfigError naming `fix` when it is missing."""
        folder = self.resolve(self.datasets / self.check_name(name or "", what))
        if must_exist and not folder.is_dir():
            raise ConfigError(f"no dataset {name!r}: {fix}")
        return folder

    def dataset_names(self) -> list[str]:
        return sorted(p.name for p in self.datasets.iterdir() if p.is_dir())

    def lora_files(self) -> list[str]:
        """LoRA files (merged ones in loras/, trained ones in runs/<name>/), as workspace-relative paths; a
        ZipLoRA merge's mergers file beside it is not one."""
        found = [*self.loras.glob("*.safetensors"), *self.runs.glob("*/*.safetensors")]
        return sorted(str(p.relative_to(self.root)) for p in found if not p.name.endswith(MERGERS_SUFFIX))
