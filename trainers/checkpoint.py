"""Resumable checkpoints: <output_dir>/checkpoints/step-000120/ holding everything needed to continue exactly.

A checkpoint holds the LoRA factors (lora_params.safetensors), the optimizer, LR scheduler and every
process's RNG state (saved by accelerate's save_state), and trainer_state.json (step and config). It is
written to a hidden temporary folder and renamed into place, so a crash mid-save never leaves a checkpoint
that looks complete. The frozen base model is never written.

    >>> path = save_checkpoint(accelerator, out_dir, step=120, params=params, config=cfg_dict, keep=3)  # doctest: +SKIP
    >>> step = load_checkpoint(accelerator, path, params)  # doctest: +SKIP
"""

from __future__ import annotations

import json
import shutil
from collections.abc import Mapping
from pathlib import Path

import torch

from studio.core.errors import ConfigError, StudioError
from studio.core.io import atomic_save_safetensors, atomic_write_text, read_safetensors

STATE_FILE = "trainer_state.json"
PARAMS_FILE = "lora_params.safetensors"
# Options that may change between an interrupted run and its resumption without changing the result.
RESUMABLE_CHANGES = {
    "resume", "output_dir", "output_name", "overwrite", "save_dtype", "split", "progress_bar", "sample_every",
    "sample_prompts", "sample_seed", "sample_steps", "sample_guidance", "checkpoint_every", "checkpoints_keep",
    "max_steps", "model",
}  # fmt: skip


def checkpoints_dir(output_dir: str | Path) -> Path:
    return Path(output_dir) / "checkpoints"


def install_state_hooks(accelerator) -> None:
    """Keep accelerate from saving or loading the full (frozen) models: only LoRA factors are ours to keep."""

    def drop_weights(models, weights, output_dir):
        weights.clear()

    def drop_models(models, input_dir):
        models.clear()

    accelerator.register_save_state_pre_hook(drop_weights)
    accelerator.register_load_state_pre_hook(drop_models)


def save_checkpoint(
    accelerator,
    output_dir: str | Path,
    step: int,
    params: Mapping[str, torch.Tensor],
    config: dict,
    keep: int = 0,
) -> Path:
    """Write checkpoint `step` atomically (all processes must call this); returns its folder.

    A checkpoint that cannot be written (disk full, folder gone read-only) is removed again and the run
    stops with a StudioError; the checkpoints written before it stay as they were.
    """
    final = checkpoints_dir(output_dir) / f"step-{step:06d}"
    tmp = final.with_name(f".{final.name}.tmp")
    if accelerator.is_main_process and tmp.exists():
        shutil.rmtree(tmp)
    accelerator.wait_for_everyone()
    try:
        accelerator.save_state(str(tmp))
        if accelerator.is_main_process:
            atomic_save_safetensors({k: v.detach().float() for k, v in params.items()}, tmp / PARAMS_FILE)
            state = {"step": step, "config": config}
            atomic_write_text(tmp / STATE_FILE, json.dumps(state, indent=1, default=str))
            if final.exists():
                shutil.rmtree(final)
            tmp.rename(final)
            _prune(checkpoints_dir(output_dir), keep)
    except Exception as exc:  # torch / accelerate raise OSError or RuntimeError for a full disk
        shutil.rmtree(tmp, ignore_errors=True)
        reason = (
            exc.strerror
            if isinstance(exc, OSError) and exc.strerror
            else str(exc).strip().splitlines()[0][:200]
        )
        raise StudioError(
            f"could not save the checkpoint of step {step} in {final.parent} ({reason}); the checkpoints "
            "saved before it are kept. Free some space, then continue with resume = latest."
        ) from None
    accelerator.wait_for_everyone()
    return final


def _prune(folder: Path, keep: int) -> None:
    if keep <= 0:
        return
    for old in list_checkpoints(folder)[:-keep]:
        shutil.rmtree(old, ignore_errors=True)


def list_checkpoints(folder: Path) -> list[Path]:
    """Complete checkpoints in a checkpoints folder, oldest first."""
    if not folder.is_dir():
        return []
    done = [p for p in folder.glob("step-*") if (p / STATE_FILE).is_file() and (p / PARAMS_FILE).is_file()]
    return sorted(done, key=lambda p: p.name)


def find_checkpoint(resume: str, output_dir: str | Path) -> Path:
    """'latest' -> newest complete checkpoint of output_dir; else the given folder (checked)."""
    if resume == "latest":
        found = list_checkpoints(checkpoints_dir(output_dir))
        if not found:
            raise ConfigError(
                f"resume = 'latest' but {checkpoints_dir(output_dir)} has no complete checkpoint. "
                "Start without resume, or give a checkpoint folder."
            )
        return found[-1]
    path = Path(resume).expanduser()
    if not (path / STATE_FILE).is_file() or not (path / PARAMS_FILE).is_file():
        raise ConfigError(
            f"resume: {path} is not a complete checkpoint (it needs {STATE_FILE} and {PARAMS_FILE}). "
            f"Checkpoints are the step-NNNNNN folders under <output_dir>/checkpoints."
        )
    return path


def read_checkpoint_state(path: Path) -> dict:
    try:
        return json.loads((path / STATE_FILE).read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError) as exc:
        raise ConfigError(f"{path / STATE_FILE}: cannot read the checkpoint state ({exc}).") from None


def check_same_run(saved: dict, current: dict, path: Path) -> list[str]:
    """Refuse to resume with options that change training; return the harmless options that changed."""
    changed = sorted(k for k in set(saved) | set(current) if saved.get(k) != current.get(k))
    blocking = [k for k in changed if k not in RESUMABLE_CHANGES]
    if blocking:
        details = ", ".join(f"{k}: {saved.get(k)!r} -> {current.get(k)!r}" for k in blocking[:6])
        raise ConfigError(
            f"cannot resume from {path}: these options differ from the interrupted run ({details}). "
            "Resume with the same settings, or start a new run."
        )
    return changed


def load_checkpoint(accelerator, path: Path, params: Mapping[str, torch.nn.Parameter]) -> int:
    """Restore LoRA factors, optimizer, scheduler and RNG states; returns the step the checkpoint was taken at."""
    state = read_checkpoint_state(path)
    saved, _ = read_safetensors(path / PARAMS_FILE)
    missing = sorted(set(params) - set(saved))
    if missing or set(saved) - set(params):
        raise ConfigError(
            f"cannot resume from {path}: its LoRA modules differ from this run's (e.g. {(missing or sorted(saved))[0]})."
        )
    with torch.no_grad():
        for name, param in params.items():
            param.copy_(saved[name].to(param.device, param.dtype))
    accelerator.load_state(str(path))
    return int(state["step"])
