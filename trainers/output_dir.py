"""The output folder of a training run: writable, held by one run at a time, cleared of what a killed run left.

    >>> lock = claim_output_dir(Path("runs/dog"))  # doctest: +SKIP
    >>> ...; lock.release()  # doctest: +SKIP

The lock is a file lock (filelock): the operating system drops it when its process ends, however it ends,
so a run killed with kill -9 never leaves a folder locked, while a run still alive keeps a second writer out.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path

from filelock import FileLock, Timeout

from studio.core.errors import StudioError

LOCK_NAME = ".lora-studio.lock"


def claim_output_dir(folder: Path) -> FileLock:
    """Make `folder`, check it can be written, lock it for this run and remove stale temporary files."""
    try:
        folder.mkdir(parents=True, exist_ok=True)
        probe = folder / f".write-test-{os.getpid()}"
        probe.write_bytes(b"")
        probe.unlink()
    except OSError as exc:
        raise StudioError(
            f"output_dir {folder}: cannot write there ({exc.strerror or exc}); choose a folder you can write to."
        ) from None
    lock = FileLock(str(folder / LOCK_NAME))
    try:
        lock.acquire(timeout=0)
    except Timeout:
        raise StudioError(
            f"output_dir {folder}: another training run is writing there now; wait for it to end, "
            "or choose another output_dir."
        ) from None
    remove_stale_temporaries(folder)
    return lock


def remove_stale_temporaries(folder: Path) -> list[Path]:
    """Temporary files and checkpoint folders a killed run left half-written (".name.tmp", ".step-N.tmp")."""
    stale = [p for p in folder.glob(".*.tmp") if p.is_file()]
    stale += [p for p in (folder / "checkpoints").glob(".step-*.tmp")]
    stale += [p for p in (folder / "samples").glob(".*.tmp")]
    for path in stale:
        if path.is_dir():
            shutil.rmtree(path, ignore_errors=True)
        else:
            path.unlink(missing_ok=True)
    return stale
