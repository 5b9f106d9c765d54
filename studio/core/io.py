"""File I/O the whole studio shares: safetensors headers read safely, the one pickle gate, atomic writes.

safetensors' own loader raises terse errors for truncated files or bad headers; we check the header
ourselves first so the user learns which file is broken and how. Every file the studio writes goes through
`atomic_write`: a temporary file in the same folder, renamed into place, so a crash or a full disk never
leaves a half-written file under the real name.

    >>> index, metadata = read_header("my_lora.safetensors")  # doctest: +SKIP
    >>> with atomic_write("out/notes.txt") as tmp:  # doctest: +SKIP
    ...     tmp.write_text("done")
"""

from __future__ import annotations

import io
import json
import math
import os
import shutil
import struct
import tempfile
import zipfile
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING

from studio.core.errors import BadFileError, StudioError

if TYPE_CHECKING:  # torch is imported where tensors are read or written: header reading stays light
    import torch

# A real header is a few hundred KB at most (SDXL checkpoints with many keys); 100 MB is
# the limit safetensors itself enforces, anything bigger is malformed or hostile.
MAX_HEADER_BYTES = 100 * 1024 * 1024
PICKLE_SUFFIXES = (".ckpt", ".pt", ".pth", ".bin")
# bytes per element of the dtypes safetensors writes
DTYPE_BYTES = {
    "BOOL": 1, "U8": 1, "I8": 1, "F8_E5M2": 1, "F8_E4M3": 1, "I16": 2, "U16": 2, "F16": 2, "BF16": 2,
    "I32": 4, "U32": 4, "F32": 4, "I64": 8, "U64": 8, "F64": 8, "C64": 8,
}  # fmt: skip


# A ZipLoRA merge's mergers, beside the merged OUT.safetensors as OUT.mergers.safetensors: not a LoRA.
MERGERS_SUFFIX = ".mergers.safetensors"


def is_pickle(path: str | Path) -> bool:
    """True for the pickle file kinds (.ckpt, .pt, .pth, .bin), which are refused unless allowed."""
    return Path(path).suffix.lower() in PICKLE_SUFFIXES


def pickle_refused(path: str | Path, what: str = "file") -> BadFileError:
    """The one message for a pickle file nobody allowed."""
    path = Path(path)
    return BadFileError(
        f"{path}: this is a pickle {what} ({path.suffix}). Pickle files can run arbitrary code when loaded, "
        "so LoRA Studio reads only .safetensors by default. Convert it to .safetensors, or pass "
        "--allow-pickle if you trust where it came from."
    )


def load_pickle_tensors(path: str | Path) -> object:
    """The one place the studio unpickles: tensors and plain containers only (`weights_only=True`).

    Even with --allow-pickle, a file that tries to construct any other object is refused, so no code in it
    runs. Zip-format files are memory-mapped.
    """
    import torch

    path = Path(path)
    try:
        return torch.load(path, map_location="cpu", weights_only=True, mmap=zipfile.is_zipfile(path))
    except Exception as exc:  # UnpicklingError for anything but tensors, or a damaged file
        reason = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise BadFileError(
            f"{path}: cannot read this pickle file as tensors ({type(exc).__name__}: {reason[:200]})."
        ) from None


# --------------------------------------------------------------------------------------------------
# reading safetensors


def read_header(path: str | Path) -> tuple[dict, dict[str, str]]:
    """Return (tensor index, metadata) of a safetensors file without reading its tensors.

    >>> index, meta = read_header("my_lora.safetensors")  # doctest: +SKIP
    """
    path = Path(path)
    if not path.is_file():
        raise BadFileError(f"{path}: no such file.")
    if is_pickle(path):
        raise pickle_refused(path)
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
    except (UnicodeDecodeError, json.JSONDecodeError, RecursionError) as exc:
        reason = "nested too deeply" if isinstance(exc, RecursionError) else str(exc)[:200]
        raise BadFileError(f"{path}: malformed safetensors header ({reason}). The file is damaged.") from None
    if not isinstance(header, dict):
        raise BadFileError(f"{path}: malformed safetensors header (not a JSON object).")
    metadata = header.pop("__metadata__", None) or {}
    if not isinstance(metadata, dict) or not all(isinstance(v, str) for v in metadata.values()):
        raise BadFileError(f"{path}: malformed safetensors metadata (values must be strings).")
    _check_entries(path, header, size - 8 - header_len)
    return header, metadata


def _check_entries(path: Path, header: dict, data_len: int) -> None:
    """Every tensor entry names a known dtype, a shape of whole numbers and byte offsets that lie inside the
    file, match the shape's size and do not overlap: what safetensors itself would trust."""
    spans = []
    for name, info in header.items():
        try:
            dtype, shape, (start, end) = info["dtype"], info["shape"], info["data_offsets"]
            ok = (
                dtype in DTYPE_BYTES
                and isinstance(shape, list)
                and all(type(d) is int and d >= 0 for d in shape)
            )
            ok = ok and type(start) is int and type(end) is int and 0 <= start <= end
        except (TypeError, KeyError, ValueError):
            ok = False
        if not ok:
            raise BadFileError(
                f"{path}: malformed entry for tensor {str(name)[:80]!r} in the header. The file is damaged."
            )
        if end > data_len:
            raise BadFileError(
                f"{path}: file is truncated (tensor {name!r} ends at byte {end} of {data_len}). Download it again."
            )
        if math.prod(shape) * DTYPE_BYTES[dtype] != end - start:
            raise BadFileError(
                f"{path}: tensor {name!r} claims shape {shape} of {dtype} but holds {end - start} bytes. "
                "The file is damaged."
            )
        spans.append((start, end, name))
    spans.sort()
    for (_, end_a, a), (start_b, _, b) in zip(spans, spans[1:]):
        if start_b < end_a:
            raise BadFileError(f"{path}: tensors {a!r} and {b!r} overlap in the file. The file is damaged.")


def read_safetensors(path: str | Path, device: str = "cpu") -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """Load all tensors and the metadata of a safetensors file, with clear errors for damaged files."""
    from safetensors.torch import load_file

    _, metadata = read_header(path)
    try:
        tensors = load_file(str(path), device=device)
    except Exception as exc:  # safetensors raises its own SafetensorError with terse text
        raise BadFileError(f"{path}: cannot read tensors ({exc}). The file is damaged.") from None
    return tensors, metadata


# --------------------------------------------------------------------------------------------------
# writing


@contextmanager
def atomic_write(path: str | Path, overwrite: bool = True) -> Iterator[Path]:
    """Yield a temporary path next to `path`; when the block ends without error it is renamed onto `path`.

    Refuses to replace an existing file unless `overwrite`. Whatever happens, no temporary file is left
    behind, and an OSError (full disk, read-only folder) becomes a StudioError saying nothing was changed.
    """
    path = Path(path)
    if path.exists() and not overwrite:
        raise StudioError(f"{path} already exists; choose another name or pass --overwrite.")
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, name = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
        os.close(fd)
    except OSError as exc:
        raise StudioError(f"could not write {path}: {exc.strerror or exc}. Nothing was changed.") from None
    tmp = Path(name)
    try:
        yield tmp
        os.replace(tmp, path)
    except OSError as exc:
        raise StudioError(f"could not write {path}: {exc.strerror or exc}. Nothing was changed.") from None
    finally:
        if tmp.exists():
            tmp.unlink()


def cached_folder(final: Path, complete: str, build: Callable[[Path], None]) -> Path:
    """A folder made once and reused: `final` when its `complete` marker file exists, else built by
    `build(folder)` in a hidden sibling and renamed into place, so concurrent processes never see a
    half-built folder. If the cache is not writable, a fresh temporary folder is built and returned."""
    final = Path(final)
    if (final / complete).is_file():
        return final
    try:
        final.parent.mkdir(parents=True, exist_ok=True)
        staging = Path(tempfile.mkdtemp(prefix=f".{final.name}.", dir=final.parent))
    except OSError:
        staging = Path(tempfile.mkdtemp(prefix=f"lora-studio-{final.name}-"))
        build(staging)
        return staging
    build(staging)
    try:
        os.replace(staging, final)
    except OSError:  # another process won the race with an identical folder (or left a broken one)
        if not (final / complete).is_file():
            return staging
        shutil.rmtree(staging, ignore_errors=True)
    return final


def atomic_write_bytes(path: str | Path, data: bytes, overwrite: bool = True) -> Path:
    """Write a file atomically (temp file in the same folder + rename)."""
    with atomic_write(path, overwrite) as tmp:
        tmp.write_bytes(data)
    return Path(path)


def atomic_write_text(path: str | Path, text: str, overwrite: bool = True) -> Path:
    """Write a small text file atomically."""
    return atomic_write_bytes(path, text.encode("utf-8"), overwrite)


def atomic_save_safetensors(
    tensors: Mapping[str, torch.Tensor],
    path: str | Path,
    metadata: Mapping[str, str] | None = None,
    overwrite: bool = False,
) -> Path:
    """Write tensors to `path` atomically. Refuses to replace a file unless overwrite."""
    from safetensors.torch import save_file

    contiguous = {k: v.detach().contiguous().cpu() for k, v in tensors.items()}
    with atomic_write(path, overwrite) as tmp:
        try:
            save_file(contiguous, str(tmp), metadata=dict(metadata or {}))
        except OSError:
            raise
        except Exception as exc:  # safetensors reports a full disk as its own error, not an OSError
            reason = str(exc).strip().splitlines()[0][:200] if str(exc).strip() else type(exc).__name__
            raise StudioError(f"could not write {path}: {reason}. Nothing was changed.") from None
    return Path(path)


def png_bytes(image, text: Mapping[str, str] | None = None) -> bytes:
    """A PIL image encoded as PNG, with optional tEXt chunks."""
    from PIL import PngImagePlugin

    info = PngImagePlugin.PngInfo()
    for key, value in (text or {}).items():
        info.add_text(key, value)
    buffer = io.BytesIO()
    image.save(buffer, format="PNG", pnginfo=info)
    return buffer.getvalue()


def write_png(image, path: str | Path, text: Mapping[str, str] | None = None, overwrite: bool = True) -> Path:
    """Write a PIL image as PNG atomically, with optional tEXt chunks (generation parameters)."""
    return atomic_write_bytes(path, png_bytes(image, text), overwrite)
