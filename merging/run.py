"""One entry point for every merge, run_merge(config), for `lora-studio merge` and the page's Merge tab.

    >>> from studio.core.options import build_config
    >>> cfg = build_config(MergeConfig, sources=["a.safetensors:0.7", "b.safetensors:0.5"], method="svd",
    ...                    rank=32, out="merged.safetensors")  # doctest: +SKIP
    >>> result = run_merge(cfg)  # doctest: +SKIP
    >>> print(result.report.table())  # doctest: +SKIP

Every method reads the sources into exact scaled factors (merging.sources), merges them (one file per method),
measures the result against the sources (merging.report) and writes an ordinary LoRA whose metadata holds
the report as JSON under "studio_merge_report".
"""

from __future__ import annotations

from collections.abc import Callable
from contextlib import nullcontext
from dataclasses import dataclass, field
from pathlib import Path

import torch

from merging.config import DENSE_METHODS, MODEL_METHODS, ZIPLORA_METHODS, MergeConfig
from merging.linear import concat_merge, default_rank, svd_merge
from merging.output import read_mergers, write_merge
from merging.report import MergeReport, build_report
from merging.sources import Factors, MergeSource, layouts, load_sources, lora_from_factors
from studio.core.errors import ConfigError, FamilyMismatchError, StudioError
from studio.core.families import FAMILY_NAMES, Family
from studio.core.lora_embeddings import union
from studio.core.lora_files import LoraSet
from studio.core.modules import base_weight, model_module_shapes
from studio.core.pipeline_words import words_loaded

__all__ = [
    "MergeConfig", "MergeResult", "Merged", "merge_factors", "read_mergers", "run_merge",
]  # fmt: skip

Progress = Callable[[dict], None]


@dataclass
class Merged:
    """A merge before it is written: factors per module plus what the method has to say about them."""

    factors: dict[str, Factors]
    details: dict = field(default_factory=dict)
    warnings: list[str] = field(default_factory=list)
    recorded: dict | None = None
    mergers: dict | None = None


@dataclass
class MergeResult:
    lora: LoraSet
    report: MergeReport
    out: Path | None = None
    into_base: Path | None = None
    sidecar: Path | None = None


def run_merge(config: MergeConfig, *, pipe=None, progress: Progress | None = None) -> MergeResult:
    """Run a merge as configured; returns the LoRA, its report and the paths written.

    pipe:     an already-loaded base pipeline to use instead of loading config.model (it is left unchanged).
    progress: called with {"stage": ...} and, for ZipLoRA, {"step", "steps", "loss", ...} events; raising from
              it cancels the merge (nothing is written, the pipeline is put back as it was).
    """
    # 1. check the options, and that no file would be overwritten, before any work
    config.check()
    _check_outputs(config)
    # 2. read the sources: one family, matching layer shapes, block weights parsed
    sources, family = load_sources(config.source_refs(), config.family, allow_pickle=config.allow_pickle)
    embeddings = bundled_embeddings(config, sources)
    # 3. the base model when the method or --into-base needs it
    loaded_here = pipe is None and bool(config.model)
    pipe = _attach_base(config, sources, family, pipe, progress)
    shapes = layouts(sources, model_module_shapes(pipe) if pipe is not None else None)
    # 4. merge (the methods that run the model read the sources' prompts with their bundled words)
    _emit(progress, stage=f"merging ({config.method})")
    with _sources_words(config, sources, family, pipe, embeddings):
        merged = merge_factors(config, sources, pipe, progress)
    lora = lora_from_factors(merged.factors, shapes, family)
    lora.embeddings = embeddings
    # 5. measure
    _emit(progress, stage="measuring")
    report = build_report(
        config.method, sources, merged.factors, recorded=merged.recorded, probes=config.probes,
        seed=config.seed, details=merged.details, warnings=merged.warnings,
    )  # fmt: skip
    _attach_model_errors(report, merged)
    if config.format == "peft" and config.out:
        report.warnings.append(
            "written with PEFT keys, which diffusers and peft read; ComfyUI would drop its attention layers "
            "(it names them processor.to_q in diffusers files): use the default --format kohya for ComfyUI"
        )
    # 6. write
    result = MergeResult(lora, report)
    if config.out:
        result.out, result.sidecar = write_merge(
            lora, config.out, family=family, method=config.method, sources=sources, report=report,
            fmt=config.format, save_dtype=config.save_dtype, mergers=merged.mergers,
            overwrite=config.overwrite,
        )  # fmt: skip
    if config.into_base:
        result.into_base = _into_base(config, lora, family, pipe, loaded_here, progress)
    return result


def bundled_embeddings(config: MergeConfig, sources: list[MergeSource]) -> dict:
    """The token embeddings the sources bundle, for the merged file (a word two sources bundle is refused)."""
    bundled = [(s.label, s.lora.embeddings) for s in sources if s.lora.embeddings]
    if not bundled:
        return {}
    label = bundled[0][0]
    if config.into_base:
        raise ConfigError(
            f"{label} bundles token embeddings, which a checkpoint cannot hold; merge without --into-base"
        )
    return union(bundled)


def _sources_words(config: MergeConfig, sources: list[MergeSource], family: str, pipe, embeddings: dict):
    """While a method runs the model on the sources' prompts (ZipLoRA, fusion), their bundled words are loaded
    into it, as generation loads them; they are unloaded after, leaving a pipeline passed in as it was."""
    if pipe is None or not embeddings or config.method not in MODEL_METHODS:
        return nullcontext()
    labels = {word: s.label for s in sources for word in s.lora.embeddings}
    return words_loaded(pipe, family, embeddings, labels)


def _attach_base(
    config: MergeConfig, sources: list[MergeSource], family: str, pipe, progress: Progress | None
):
    """The base pipeline (given, or loaded from config.model; None when neither), its family checked; DoRA
    sources read their base weights from it (their change depends on them)."""
    if pipe is None and config.model:
        _emit(progress, stage=f"loading {config.model}")
        pipe = _load_model(config.model, family, config)
    if pipe is None:
        _refuse_dora_without_model(sources)
        return None
    _check_pipe_family(pipe, family)
    for source in sources:
        source.base_weights = lambda path, pipe=pipe: base_weight(pipe, path).detach()
    return pipe


def _into_base(config: MergeConfig, lora, family: str, pipe, loaded_here: bool, progress: Progress | None):
    """--into-base: the merge added into a full checkpoint (a pipeline passed in is put back as it was)."""
    from merging.into_base import merge_into_base

    _emit(progress, stage=f"adding the merge into {config.model}")
    base = pipe if _is_fp32(pipe) else _load_model(config.model, family, config, device="cpu", dtype="fp32")
    dtype = None if config.save_dtype == "auto" else config.save_dtype
    return merge_into_base(
        lora, base, family, config.into_base, dtype=dtype, overwrite=config.overwrite, restore=not loaded_here
    )


def merge_factors(
    config: MergeConfig, sources: list[MergeSource], pipe=None, progress: Progress | None = None
) -> Merged:
    """Dispatch to the method's file; returns the merged factors and the method's details."""
    method = config.method
    rank = config.rank or default_rank(sources)
    if method == "concat":
        return Merged(concat_merge(sources))
    if method == "svd":
        factors, errors = svd_merge(sources, rank)
        return Merged(factors, {"rank": rank, "svd_error": _summary(errors)})
    if method in DENSE_METHODS:
        from merging.ties_dare import dense_merge

        factors, info = dense_merge(
            sources, method, rank=rank, density=config.density, sign_method=config.sign_method,
            seed=config.seed, solver=config.svd_solver, device=_dense_device(config.device),
        )  # fmt: skip
        details = {
            "rank": rank,
            "density": config.density,
            "sign_method": config.sign_method,
            "seed": config.seed,
        }
        details |= {"pruning_error": _summary({p: v["pruning"] for p, v in info.items()})}
        details |= {"svd_error": _summary({p: v["svd"] for p, v in info.items()})}
        return Merged(factors, details)
    if method == "orthogonal":
        from merging.orthogonal import orthogonal_merge

        factors, info = orthogonal_merge(sources, config.ortho_tolerance)
        return Merged(factors, {"orthogonality": info["pairs"]}, info["warnings"])
    if method == "fusion":
        from merging.fusion import fusion_merge

        if pipe is None:
            raise StudioError("method fusion runs the base model: give it with --model")
        outcome = fusion_merge(sources, pipe, config, progress)
        return Merged(outcome.factors, {"fusion": outcome.info}, [], outcome.recorded)
    if method in ZIPLORA_METHODS:
        from merging.ziplora import ziplora_merge

        if pipe is None:
            raise StudioError(f"method {method} runs the base model: give it with --model")
        outcome = ziplora_merge(sources, pipe, config, fast=method == "ziplora-fast", progress=progress)
        details = {"ziplora": outcome.info}
        return Merged(outcome.factors, details, outcome.warnings, outcome.recorded, outcome.mergers)
    raise StudioError(f"unknown merge method {method!r}")


def _attach_model_errors(report: MergeReport, merged: Merged) -> None:
    errors = merged.details.get("ziplora", {}).get("model_error", {})
    for row in report.sources:
        if row.label in errors:
            row.model_error = errors[row.label]["ziplora"]
            row.model_error_sum = errors[row.label]["plain_sum"]


def _summary(errors: dict[str, float]) -> dict:
    if not errors:
        return {}
    worst = max(errors, key=errors.get)
    return {"mean": sum(errors.values()) / len(errors), "max": errors[worst], "worst_module": worst}


# ----------------------------------------------------------------------------------------------------
# checks and the base model


def _check_outputs(config: MergeConfig) -> None:
    outs = [Path(p) for p in (config.out, config.into_base) if p]
    for path in outs:
        if path.suffix.lower() != ".safetensors":
            raise StudioError(f"{path}: outputs are written as .safetensors; change the file name.")
        if path.exists() and not config.overwrite:
            raise StudioError(f"{path} already exists; choose another name or pass --overwrite.")
    if len(outs) == 2 and outs[0].resolve() == outs[1].resolve():
        raise StudioError("--out and --into-base name the same file; give them different names.")


def _refuse_dora_without_model(sources: list[MergeSource]) -> None:
    for source in sources:
        if source.lora.needs_base:
            raise StudioError(
                f"{source.label} is a DoRA LoRA: its change depends on the base model's weights. "
                "Pass --model with the base model it was trained on."
            )


def _emit(progress: Progress | None, **event) -> None:
    if progress:
        progress(event)


def _load_model(
    path: str, family: Family, config: MergeConfig, device: str | None = None, dtype: str | None = None
):
    from studio.core.model_paths import resolve_model
    from studio.core.models import load_base

    device = device or (None if config.device == "auto" else config.device)
    dtype = dtype or (None if config.dtype == "auto" else config.dtype)
    path = str(
        resolve_model(path)[0]
    )  # "demo:sd15" / "demo:sdxl" name the built-in models, as in train/generate
    return load_base(path, family=family, device=device, dtype=dtype, allow_pickle=config.allow_pickle).pipe


def _check_pipe_family(pipe, family: Family) -> None:
    from studio.core.checkpoints import pipe_family

    found = pipe_family(pipe)
    if found != family:
        raise FamilyMismatchError(
            f"the LoRAs are for {FAMILY_NAMES[family]} but the base model is {FAMILY_NAMES[found]}. "
            f"Give a {FAMILY_NAMES[family]} base model."
        )


def _dense_device(name: str) -> torch.device:
    """Where TIES/DARE do their dense arithmetic: the GPU when there is one (or as asked)."""
    from studio.core.devices import pick_device_dtype

    device, _ = pick_device_dtype(None if name == "auto" else name)
    return device if device.type == "cuda" else torch.device("cpu")


def _is_fp32(pipe) -> bool:
    return pipe is not None and pipe.unet.dtype == torch.float32
