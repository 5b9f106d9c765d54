"""Reading and writing safetensors files safely.

safetensors' own loader raises terse errors for truncated files or bad headers; we check the header
ourselves first so the user learns which file is broken and how. Writes go to a temporary file in the
same folder and are renamed into place, so a crash or a full disk never leaves a half-written file.
"""

from __future__ import annotations

import json
import os
import struct
import tempfile
from collections.abc import Mapping
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from studio.errors import BadFileError, StudioError

# A real header is a few hundred KB at most (SDXL checkpoints with many keys); 100 MB is
# the limit safetensors itself enforces, anything bigger is malformed or hostile.
MAX_HEADER_BYTES = 100 * 1024 * 1024
PICKLE_SUFFIXES = (".ckpt", ".pt", ".pth", ".bin")


def read_header(path: str | Path) -> tuple[dict, dict[str, str]]:
    """Return (tensor index, metadata) of a safetensors file without reading its tensors.

    >>> index, meta = read_header("my_lora.safetensors")  # doctest: +SKIP
    """
    path = Path(path)
    if not path.is_file():
        raise BadFileError(f"{path}: no such file.")
    if path.suffix.lower() in PICKLE_SUFFIXES:
        raise BadFileError(
            f"{path}: this is a pickle file ({path.suffix}). Pickle files can run arbitrary code when loaded, "
            "so LoRA Studio reads only .safetensors by default. Convert it to safetensors, or pass "
            "--allow-pickle if you trust where it came from."
        )
    size = path.stat().st_size
    with open(path, "rb") as f:
        head = f.read(8)
        if len(head) < 8:
            raise BadFileError(f"{path}: file is empty or truncated ({size} bytes); not a safetensors file.")
        (header_len,) = struct.unpack("<Q", head)
        if header_len > MAX_HEADER_BYTES:
            raise BadFileError(
                f"{path}: not a safetensors file (its header claims {header_len} bytes). "
                "Is it a pickle (.ckpt) file renamed to .safetensors?"
            )
        if 8 + header_len > size:
            raise BadFileError(f"{path}: file is truncated (header runs past the end). Download it again.")
        raw = f.read(header_len)
    try:
        header = json.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise BadFileError(f"{path}: malformed safetensors header ({exc}). The file is damaged.") from None
    if not isinstance(header, dict):
        raise BadFileError(f"{path}: malformed safetensors header (not a JSON object).")
    metadata = header.pop("__metadata__", None) or {}
    if not isinstance(metadata, dict) or not all(isinstance(v, str) for v in metadata.values()):
        raise BadFileError(f"{path}: malformed safetensors metadata (values must be strings).")
    data_len = size - 8 - header_len
    for name, info in header.items():
        try:
            start, end = info["data_offsets"]
        except (TypeError, KeyError, ValueError):
            raise BadFileError(f"{path}: malformed entry for tensor {name!r} in the header.") from None
        if end > data_len:
            raise BadFileError(
                f"{path}: file is truncated (tensor {name!r} ends at byte {end} of {data_len}). Download it again."
            )
    return header, metadata


def read_safetensors(path: str | Path, device: str = "cpu") -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """Load all tensors and the metadata of a safetensors file, with clear errors for damaged files."""
    _, metadata = read_header(path)
    try:
        tensors = load_file(str(path), device=device)
    except Exception as exc:  # safetensors raises its own SafetensorError with terse text
        raise BadFileError(f"{path}: cannot read tensors ({exc}). The file is damaged.") from None
    return tensors, metadata


def atomic_save_safetensors(
    tensors: Mapping[str, torch.Tensor],
    path: str | Path,
    metadata: Mapping[str, str] | None = None,
    overwrite: bool = False,
) -> Path:
    """Write tensors to `path` atomically (temp file + rename). Refuses to replace a file unless overwrite."""
    path = Path(path)
    if path.exists() and not overwrite:
        raise StudioError(f"{path} already exists; choose another name or pass --overwrite.")
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    try:
        contiguous = {k: v.detach().contiguous().cpu() for k, v in tensors.items()}
        save_file(contiguous, tmp, metadata=dict(metadata or {}))
        os.replace(tmp, path)
    except OSError as exc:
        raise StudioError(f"could not write {path}: {exc.strerror or exc}. Nothing was changed.") from None
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)
    return path


def atomic_write_text(path: str | Path, text: str, overwrite: bool = True) -> Path:
    """Write a small text file atomically."""
    return atomic_write_bytes(path, text.encode("utf-8"), overwrite)


def atomic_write_bytes(path: str | Path, data: bytes, overwrite: bool = True) -> Path:
    """Write a file atomically (temp file in the same folder + rename)."""
    path = Path(path)
    if path.exists() and not overwrite:
        raise StudioError(f"{path} already exists; choose another name or pass --overwrite.")
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
        os.replace(tmp, path)
    except OSError as exc:
        raise StudioError(f"could not write {path}: {exc.strerror or exc}. Nothing was changed.") from None
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)
    return path
