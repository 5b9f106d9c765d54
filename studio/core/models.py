"""Base models: detect SD1.5 / SDXL, load them offline, and write single-file checkpoints.

A base model is either a diffusers folder (model_index.json, unet/, vae/, ...) or one single-file
checkpoint in the original ("ldm"/"sgm") key layout that A1111, Forge and ComfyUI use
(model.diffusion_model.*, first_stage_model.*, cond_stage_model.* / conditioner.embedders.*).
Single files are loaded with diffusers' `from_single_file`, fed with the configs we ship in
studio/core/configs/<family> so that nothing is fetched from the Hugging Face hub.

>>> model = load_base("sd_xl_base_1.0.safetensors")  # doctest: +SKIP
>>> model.family, model.kind  # doctest: +SKIP
('sdxl', 'single_file')
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import sys
import warnings
from collections.abc import Callable, Iterable, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass
from itertools import chain
from pathlib import Path
from typing import Any, Literal

import torch
from diffusers import DiffusionPipeline, StableDiffusionPipeline, StableDiffusionXLPipeline

from studio.core.checkpoints import empty_components, pipe_family, to_ldm_state_dict
from studio.core.devices import pick_device_dtype
from studio.core.errors import BadFileError, FamilyMismatchError, StudioError
from studio.core.families import FAMILY_NAMES, Family
from studio.core.io import cached_folder, is_pickle, load_pickle_tensors, pickle_refused, read_header
from studio.core.keys import TEXT_PREFIXES, UNET_PREFIX, VAE_PREFIX
from studio.core.model_paths import demo_model_path, resolve_model
from studio.core.tokenizers import EOS, SDXL_PAD_2, cache_root, write_tokenizer_files

CONFIGS = Path(__file__).resolve().parent / "configs"
PIPELINES: dict[str, type[DiffusionPipeline]] = {
    "sd15": StableDiffusionPipeline,
    "sdxl": StableDiffusionXLPipeline,
}
SUPPORTED = (
    "LoRA Studio supports Stable Diffusion 1.5 and SDXL base models: a diffusers folder, or a single-file "
    ".safetensors checkpoint as used by A1111/ComfyUI."
)
UNET, VAE = UNET_PREFIX, VAE_PREFIX

__all__ = ["LoadedModel", "demo_model_path", "detect_family", "load_base", "model_hash", "pick_device_dtype",
           "pipe_family", "resolve_model", "shipped_config_dir"]  # fmt: skip


@dataclass
class LoadedModel:
    """A loaded base model.

    model_hash is a cheap fingerprint, not a full-file hash: sha256 over the size and three 1 MiB samples
    (start, middle, end) of the checkpoint file, or for a diffusers folder of unet/config.json plus the same
    samples of each UNet weights file. It tells models apart in metadata and caches in milliseconds, even
    for 7 GB files; it is not the AutoV2/sha256 hash that model sites show.
    """

    pipe: DiffusionPipeline
    family: Family
    path: Path
    kind: Literal["diffusers", "single_file"]
    model_hash: str
    device: torch.device
    dtype: torch.dtype


# --------------------------------------------------------------------------------------------------
# family detection


def _unsupported(where: str, what: str) -> StudioError:
    return StudioError(f"{where}: this looks like {what}, which is not supported. {SUPPORTED}")


def _shape(info: Any) -> tuple[int, ...] | None:
    if hasattr(info, "shape"):
        return tuple(info.shape)
    if isinstance(info, Mapping) and "shape" in info:
        return tuple(info["shape"])
    return None


def _family_of_keys(source: Mapping[str, Any] | Iterable[str], where: str) -> Family:
    """Family of a checkpoint from its keys (and shapes, when `source` maps keys to tensors/header entries)."""
    entries = dict(source) if isinstance(source, Mapping) else dict.fromkeys(source)
    keys = list(entries)

    def has(prefix: str) -> bool:
        return any(k.startswith(prefix) for k in keys)

    if any(k.startswith(("lora_unet", "lora_te")) or ".lora_down." in k or ".lora_A." in k for k in keys):
        raise StudioError(f"{where}: this is a LoRA file, not a base model. {SUPPORTED}")
    if has("conditioner.embedders.1.model."):
        family: Family = "sdxl"
    elif has("conditioner.embedders.0.model."):
        raise _unsupported(where, "an SDXL refiner (OpenCLIP-G is its only text encoder)")
    elif has("cond_stage_model.model."):
        raise _unsupported(where, "Stable Diffusion 2.x (OpenCLIP-H text encoder)")
    elif has("cond_stage_model.transformer.") or has(UNET):
        family = "sdxl" if has(UNET + "label_emb.") else "sd15"
    else:
        sample = ", ".join(sorted(keys)[:3]) or "no tensors at all"
        raise StudioError(
            f"{where}: not a Stable Diffusion checkpoint (found keys like {sample}). {SUPPORTED}"
        )

    in_shape = _shape(entries.get(UNET + "input_blocks.0.0.weight"))
    if in_shape and len(in_shape) == 4 and in_shape[1] != 4:
        raise _unsupported(
            where, f"an inpainting or instruct-pix2pix model (its UNet takes {in_shape[1]} channels)"
        )
    if family == "sdxl" and has(UNET + "input_blocks.11."):
        raise _unsupported(where, "an SDXL refiner (its UNet has four levels)")
    if family == "sd15":
        context = _shape(entries.get(UNET + "input_blocks.1.1.transformer_blocks.0.attn2.to_k.weight"))
        proj_in = _shape(entries.get(UNET + "input_blocks.1.1.proj_in.weight"))
        if (context and context[-1] == 1024) or (proj_in and len(proj_in) == 2):
            raise _unsupported(where, "Stable Diffusion 2.x (1024-wide cross-attention, linear projections)")
    return family


def _read_json(path: Path) -> dict:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise BadFileError(f"{path}: cannot read this config file ({exc}).") from None


def _family_of_folder(folder: Path) -> Family:
    """Family of a diffusers folder from model_index.json and unet/config.json."""
    if not (folder / "unet" / "config.json").is_file():
        raise BadFileError(f"{folder}: not a diffusers model folder (no unet/config.json). {SUPPORTED}")
    unet = _read_json(folder / "unet" / "config.json")
    index = _read_json(folder / "model_index.json") if (folder / "model_index.json").is_file() else {}
    if unet.get("_class_name", "UNet2DConditionModel") != "UNet2DConditionModel":
        raise _unsupported(str(folder), f"a {unet.get('_class_name')} model")
    if unet.get("in_channels", 4) != 4:
        raise _unsupported(
            str(folder), f"an inpainting/instruct model (UNet in_channels={unet['in_channels']})"
        )
    if unet.get("addition_embed_type") == "text_time" or unet.get("cross_attention_dim") == 2048:
        if unet.get("cross_attention_dim") == 1280 or (
            index and not (index.get("text_encoder") or [None])[0]
        ):
            raise _unsupported(str(folder), "an SDXL refiner (no CLIP-L text encoder)")
        return "sdxl"
    if unet.get("addition_embed_type") or unet.get("class_embed_type") or unet.get("num_class_embeds"):
        raise _unsupported(str(folder), "a UNet with extra conditioning (upscaler or similar)")
    if unet.get("cross_attention_dim") == 1024 or unet.get("use_linear_projection"):
        raise _unsupported(
            str(folder), "Stable Diffusion 2.x (1024-wide cross-attention, linear projections)"
        )
    return "sd15"


def detect_family(source: str | os.PathLike | Mapping[str, Any] | Iterable[str]) -> Family:
    """Return "sd15" or "sdxl" for a diffusers folder, a .safetensors file, or a checkpoint's keys.

    Keys may come with shapes (a state dict, or the index from `read_header`); shapes let SD2.x and
    inpainting models be told apart from SD1.5. Anything else raises a StudioError saying what was found.

    >>> detect_family(["conditioner.embedders.1.model.positional_embedding"])
    'sdxl'
    """
    if isinstance(source, str | os.PathLike):
        path = Path(source).expanduser()
        if path.is_dir():
            return _family_of_folder(path)
        index, _ = read_header(path)  # missing / pickle / truncated -> BadFileError naming the file
        return _family_of_keys(index, str(path))
    return _family_of_keys(source, "checkpoint")


def _check_forced(found: Family, forced: str | None, where: Path) -> None:
    if forced is not None and forced not in FAMILY_NAMES:
        raise StudioError(f"unknown model family {forced!r}; use one of {', '.join(FAMILY_NAMES)}.")
    if forced is not None and forced != found:
        raise FamilyMismatchError(
            f"{where}: you asked for {FAMILY_NAMES[forced]} but this is a {FAMILY_NAMES[found]} model. "
            "Pick the right family, or leave it out to detect it."
        )


# --------------------------------------------------------------------------------------------------
# loading


def shipped_config_dir(family: Family) -> Path:
    """A complete diffusers config folder (no weights) for `family`: our shipped configs plus tokenizers.

    Built once in the cache (see studio.core.tokenizers.cache_root) by copying studio/core/configs/<family> and
    writing the tokenizer files; a temporary folder is used if the cache is not writable.
    """
    source = CONFIGS / family
    digest = hashlib.sha256()
    for f in sorted(source.rglob("*.json")):
        digest.update(f.relative_to(source).as_posix().encode() + f.read_bytes())
    final = cache_root() / "configs" / f"{family}-{digest.hexdigest()[:16]}"

    def build(folder: Path) -> None:
        shutil.copytree(source, folder, dirs_exist_ok=True)
        write_tokenizer_files(folder / "tokenizer", EOS)
        if family == "sdxl":
            write_tokenizer_files(folder / "tokenizer_2", SDXL_PAD_2)

    return cached_folder(final, "model_index.json", build)


def _checkpoint_entries(path: Path, allow_pickle: bool) -> Mapping[str, Any]:
    """Keys (with shapes) of a checkpoint file, without loading safetensors data."""
    if not is_pickle(path):
        return read_header(path)[0]
    if not allow_pickle:
        raise pickle_refused(path, "checkpoint")
    state = load_pickle_tensors(path)
    while isinstance(state, Mapping) and "state_dict" in state:
        state = state["state_dict"]
    if not isinstance(state, Mapping):
        raise BadFileError(f"{path}: this pickle file does not hold a state dict.")
    return state


def _check_complete(entries: Mapping[str, Any], family: Family, path: Path) -> None:
    needed = {"UNet": UNET, "VAE": VAE} | {name: p for name, p in TEXT_PREFIXES[family].items()}
    absent = [name for name, prefix in needed.items() if not any(k.startswith(prefix) for k in entries)]
    if absent:
        raise BadFileError(
            f"{path}: this checkpoint has no {' / '.join(absent)} weights. LoRA Studio needs a full "
            f"{FAMILY_NAMES[family]} checkpoint (UNet, VAE and text encoders in one file), or a diffusers folder."
        )


def _explain_mismatch(entries: Mapping[str, Any], family: Family, config_dir: Path) -> str | None:
    """Why a checkpoint does not fit its configuration: missing tensors or wrong shapes (None if it fits)."""
    try:
        expected = {
            k: tuple(v.shape)
            for k, v in to_ldm_state_dict(empty_components(config_dir, family), family).items()
        }
    except Exception:  # a broken config folder: nothing more precise to say
        return None
    for key, shape in expected.items():
        if key in entries and (found := _shape(entries[key])) is not None and found != shape:
            return (
                f"{key} has shape {list(found)} but the model configuration in {config_dir} expects "
                f"{list(shape)}. The file is a different architecture, or is damaged."
            )
    missing = [k for k in expected if k not in entries]
    if missing:
        return (
            f"{len(missing)} tensors are missing from the file (e.g. {missing[0]}). The file is incomplete "
            f"or is not a standard {FAMILY_NAMES[family]} checkpoint."
        )
    return None


def _has_meta(pipe: DiffusionPipeline) -> bool:
    """diffusers leaves weights a file lacks on the meta device instead of failing."""
    modules = [c for c in pipe.components.values() if isinstance(c, torch.nn.Module)]
    return any(t.is_meta for m in modules for t in chain(m.parameters(), m.buffers()))


class _DropEmptyFp32Warning(logging.Filter):
    """diffusers 0.42 warns on every model.to(dtype) that modules "should be kept in float32: []", even
    when that list is empty; the message is noise for SD models."""

    def filter(self, record: logging.LogRecord) -> bool:
        return "should be kept in float32: []" not in record.getMessage()


@contextmanager
def _quiet_dtype_warning() -> Iterator[None]:
    logger, drop = logging.getLogger("diffusers.models.modeling_utils"), _DropEmptyFp32Warning()
    logger.addFilter(drop)
    try:
        yield
    finally:
        logger.removeFilter(drop)


def _own_memory(pipe: DiffusionPipeline) -> None:
    """On the CPU, diffusers leaves weights as views into the memory-mapped file, often at unaligned offsets;
    BLAS then takes other code paths whose rounding differs from the same weights in ordinary memory. Each
    such tensor is copied into ordinary, aligned memory, one at a time, and the file pages it was read from
    are handed back at once (madvise): copying them all first would hold the file and the copies together,
    twice the model's size, at the load's peak."""
    release = _page_releaser()
    for component in pipe.components.values():
        if isinstance(component, torch.nn.Module):
            for tensor in chain(component.parameters(), component.buffers()):
                if tensor.device.type == "cpu" and tensor.data_ptr() % 64:
                    view = tensor.data
                    tensor.data = view.clone()
                    release(view.data_ptr(), view.numel() * view.element_size())


def _page_releaser() -> Callable[[int, int], None]:
    """release(address, length): drop the pages of a read-only file mapping from this process (Linux's
    madvise MADV_DONTNEED; a later read would fetch them from the file again). A no-op elsewhere."""
    if sys.platform != "linux":
        return lambda address, length: None
    import ctypes
    import mmap

    libc = ctypes.CDLL(None, use_errno=True)
    libc.madvise.argtypes = (ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int)
    page = mmap.PAGESIZE

    def release(address: int, length: int) -> None:
        start, end = -(-address // page) * page, (address + length) // page * page  # whole pages inside
        if end > start:
            libc.madvise(start, end - start, 4)  # MADV_DONTNEED

    return release


@contextmanager
def _no_progress_bars() -> Iterator[None]:
    """diffusers' and transformers' loading bars (a second each on a big model) only clutter the studio's
    own output: a command prints what it did, a job's log its events."""
    from diffusers.utils import logging as diffusers_logging
    from transformers.utils import logging as transformers_logging

    diffusers_logging.disable_progress_bar()
    transformers_logging.disable_progress_bar()
    try:
        yield
    finally:
        diffusers_logging.enable_progress_bar()
        transformers_logging.enable_progress_bar()


def _from_diffusers(
    family: Family, path: Path, dtype: torch.dtype, config_dir: Path | None
) -> DiffusionPipeline:
    extra: dict[str, Any] = (
        {"safety_checker": None, "feature_extractor": None, "requires_safety_checker": False}
        if family == "sd15"
        else {"add_watermarker": False}
    )
    cls = PIPELINES[family]
    with warnings.catch_warnings(), _quiet_dtype_warning(), _no_progress_bars():
        warnings.simplefilter("ignore", FutureWarning)
        if config_dir is None:
            return cls.from_pretrained(str(path), torch_dtype=dtype, local_files_only=True, **extra)
        return cls.from_single_file(
            str(path), config=str(config_dir), torch_dtype=dtype, local_files_only=True, **extra
        )


def model_hash(path: str | Path) -> str:
    """The cheap fingerprint described in `LoadedModel` (sha256 hex digest)."""
    path = Path(path)
    files = [path]
    if path.is_dir():
        unet = path / "unet"
        files = [unet / "config.json", *sorted(unet.glob("*.safetensors")), *sorted(unet.glob("*.bin"))]
    digest, chunk = hashlib.sha256(), 1 << 20
    for f in files:
        size = f.stat().st_size
        digest.update(f"{f.name}:{size}".encode())
        with open(f, "rb") as fh:
            for offset in sorted({0, max(0, size // 2 - chunk // 2), max(0, size - chunk)}):
                fh.seek(offset)
                digest.update(fh.read(chunk))
    return digest.hexdigest()


def load_base(
    path: str | Path,
    *,
    family: Family | None = None,
    device: str | torch.device | None = None,
    dtype: str | torch.dtype | None = None,
    allow_pickle: bool = False,
    config_dir: str | Path | None = None,
) -> LoadedModel:
    """Load an SD1.5 / SDXL base model from a diffusers folder or a single-file checkpoint, offline.

    family:       check the model is this family (detected either way).
    allow_pickle: also accept .ckpt/.pt/.bin files (they can run code when loaded; off by default).
    config_dir:   diffusers config folder for a single file (ignored for folders); defaults to the
                  SD1.5/SDXL configs shipped in studio/core/configs.

    >>> model = load_base("v1-5-pruned-emaonly.safetensors", device="cpu")  # doctest: +SKIP
    """
    path = Path(path).expanduser()
    if not path.exists():
        raise BadFileError(
            f"{path}: no such file or folder. Give a diffusers model folder or a .safetensors file."
        )
    dev, dt = pick_device_dtype(device, dtype)
    entries: Mapping[str, Any] = {}
    if path.is_dir():
        kind, found, config = "diffusers", _family_of_folder(path), None
        _check_forced(found, family, path)
    else:
        entries = _checkpoint_entries(path, allow_pickle)
        kind, found = "single_file", _family_of_keys(entries, str(path))
        _check_forced(found, family, path)
        _check_complete(entries, found, path)
        config = Path(config_dir) if config_dir is not None else shipped_config_dir(found)
        if config_dir is not None and _family_of_folder(config) != found:
            raise FamilyMismatchError(
                f"{config}: this config folder is not for a {FAMILY_NAMES[found]} model."
            )
    try:
        pipe = _from_diffusers(found, path, dt, config)
        if _has_meta(pipe):
            raise ValueError("some weights were not in the file")
    except StudioError:
        raise
    except Exception as exc:  # diffusers/transformers/torch errors: explain, and drop the deep traceback
        message = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        reason = _explain_mismatch(entries, found, config) if kind == "single_file" else None
        raise BadFileError(
            f"{path}: could not load this {FAMILY_NAMES[found]} model: {reason or message}"
        ) from None
    pipe.to(dev)
    _own_memory(pipe)
    return LoadedModel(
        pipe=pipe, family=found, path=path, kind=kind, model_hash=model_hash(path), device=dev, dtype=dt
    )
