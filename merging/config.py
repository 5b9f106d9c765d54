"""MergeConfig: every option of a merge, with its help text, loadable from presets/merge_*.toml.

    >>> from studio.config import build_config
    >>> cfg = build_config(MergeConfig, sources=["a.safetensors:0.7", "b.safetensors:0.5:OUTALL"],
    ...                    method="svd", rank=32, out="merged.safetensors")
    >>> [(s.path.name, s.weight, s.blocks) for s in cfg.source_specs()]
    [('a.safetensors', 0.7, None), ('b.safetensors', 0.5, 'OUTALL')]

Methods:
    concat        exact weighted sum; factors concatenated along the rank axis (rank = sum of ranks)
    svd           exact weighted sum re-factorised to `rank` by a truncated SVD (reports what is lost)
    ties          TIES on the dense deltas (trim to `density`, elect sign, average agreeing), then SVD
    dare          DARE (random drop with 1/density rescale) then weighted sum, then SVD
    dare-ties     DARE drop, then TIES sign election, then SVD
    magnitude     magnitude pruning to `density`, weighted sum, then SVD
    ziplora       ZipLoRA: learn per-column mergers on whole-model noise predictions (needs --model)
    ziplora-fast  ZipLoRA mergers fitted layer by layer on recorded layer inputs (needs --model)
    orthogonal    plain weighted sum of LoRAs trained with orthogonal adaptation, after checking they are
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal, NamedTuple

from studio.errors import ConfigError

Method = Literal[
    "concat", "svd", "ties", "dare", "dare-ties", "magnitude", "ziplora", "ziplora-fast", "orthogonal"
]
METHODS: tuple[str, ...] = (
    "concat", "svd", "ties", "dare", "dare-ties", "magnitude", "ziplora", "ziplora-fast", "orthogonal",
)  # fmt: skip
DENSE_METHODS = ("ties", "dare", "dare-ties", "magnitude")
ZIPLORA_METHODS = ("ziplora", "ziplora-fast")
LORA_SUFFIXES = (".safetensors", ".ckpt", ".pt", ".pth", ".bin")


def _f(default, help_text: str):
    """A dataclass field with its help text (lists get a fresh copy per instance)."""
    if isinstance(default, list):
        return field(default_factory=lambda: list(default), metadata={"help": help_text})
    return field(default=default, metadata={"help": help_text})


class SourceSpec(NamedTuple):
    """One source as the user typed it: FILE[:WEIGHT[:BLOCKS]]."""

    path: Path
    weight: float
    blocks: str | None


def parse_source(text: str) -> SourceSpec:
    """Split "FILE[:WEIGHT[:BLOCKS]]"; the file part may itself hold ':' (C:\\loras\\a.safetensors:0.5).

    >>> parse_source("style.safetensors:0.8:OUTALL")
    SourceSpec(path=PosixPath('style.safetensors'), weight=0.8, blocks='OUTALL')
    """
    parts = text.split(":")
    for n in range(len(parts), 0, -1):
        head, rest = ":".join(parts[:n]), parts[n:]
        if len(rest) <= 2 and (Path(head).exists() or head.lower().endswith(LORA_SUFFIXES)):
            break
    else:
        head, rest = parts[0], parts[1:]
    if not head.strip():
        raise ConfigError(f"source {text!r}: no file name; write FILE[:WEIGHT[:BLOCKS]]")
    if len(rest) > 2:
        raise ConfigError(f"source {text!r}: too many ':' parts; write FILE[:WEIGHT[:BLOCKS]]")
    weight = 1.0
    if rest and rest[0].strip():
        try:
            weight = float(rest[0])
        except ValueError:
            raise ConfigError(
                f"source {text!r}: weight {rest[0]!r} is not a number; write FILE[:WEIGHT[:BLOCKS]], "
                "e.g. style.safetensors:0.8:OUTALL"
            ) from None
    blocks = rest[1].strip() if len(rest) > 1 and rest[1].strip() else None
    return SourceSpec(Path(head), weight, blocks)


@dataclass
class MergeConfig:
    # --- what to merge -------------------------------------------------------------------------
    sources: list[str] = _f(
        [], "LoRA files, each FILE[:WEIGHT[:BLOCKS]] (BLOCKS: preset name or block vector)"
    )
    method: Method = _f(
        "concat", "concat, svd, ties, dare, dare-ties, magnitude, ziplora, ziplora-fast, orthogonal"
    )
    out: str = _f("", "output LoRA file (.safetensors); may be empty when only --into-base is wanted")
    format: Literal["kohya", "peft"] = _f(
        "kohya", "output key format: kohya (A1111/ComfyUI/diffusers) or peft"
    )
    save_dtype: Literal["auto", "fp32", "fp16", "bf16"] = _f(
        "auto", "dtype of the saved factors (auto = the most precise dtype among the sources)"
    )
    overwrite: bool = _f(False, "replace existing output files")
    allow_pickle: bool = _f(False, "also read pickle LoRA / model files (.pt/.ckpt/.bin): they can run code")
    family: Literal["sd15", "sdxl"] | None = _f(None, "sd15 or sdxl, for files that do not say")
    model: str = _f(
        "",
        "base model (diffusers folder, single file, or demo:sd15 / demo:sdxl): needed by ziplora and --into-base",
    )
    into_base: str = _f("", "also add the merged LoRA into the base model and save it as this single file")
    device: str = _f("auto", "auto, cpu, cuda or cuda:N: where ziplora and the dense methods (ties...) run")
    # --- low-rank result ------------------------------------------------------------------------
    rank: int | None = _f(
        None, "rank of the result for svd/ties/dare/magnitude (default: largest source rank)"
    )
    svd_solver: Literal["auto", "full", "randomized"] = _f(
        "auto",
        "dense SVD after ties/dare: full (exact), randomized (fast) or auto (randomized for rank << size)",
    )
    # --- TIES / DARE / magnitude ----------------------------------------------------------------
    density: float = _f(0.5, "ties/dare/magnitude: fraction of each delta's entries kept, in (0, 1]")
    sign_method: Literal["total", "frequency"] = _f(
        "total", "ties: elect each entry's sign by total mass or by how many sources agree"
    )
    seed: int = _f(0, "seed of DARE's random drop, of ZipLoRA's noise and of the report's random inputs")
    # --- ZipLoRA --------------------------------------------------------------------------------
    prompts: list[str] = _f([], "ziplora: one prompt per source (its trigger words), in source order")
    references: list[str] = _f(
        [], "ziplora: one folder of reference images per source ('' = generate them from the prompt)"
    )
    steps: int = _f(100, "ziplora: merger optimisation steps (paper: 100)")
    lr: float = _f(0.01, "ziplora: Adam learning rate of the mergers (paper: 0.01)")
    similarity_weight: float = _f(0.01, "ziplora: lambda, weight of the merger-similarity term (paper: 0.01)")
    stop_similarity: float = _f(
        0.01,
        "ziplora: stop early once the mergers' mean overlap |m_i . m_j| / width (1 at first) is below this",
    )
    batch_size: int = _f(1, "ziplora: noisy samples per source per step")
    resolution: int = _f(0, "ziplora: image size of the references in pixels (0 = the model's default)")
    reference_count: int = _f(2, "ziplora: images generated per source when no reference folder is given")
    reference_steps: int = _f(20, "ziplora: denoising steps when generating reference images")
    reference_guidance: float = _f(5.0, "ziplora: guidance scale when generating reference images")
    warm_start: bool = _f(
        False, "ziplora: start from the layer-wise (ziplora-fast) mergers instead of all ones"
    )
    fast_steps: int = _f(200, "ziplora-fast: Adam steps of the layer-wise fit")
    fast_lr: float = _f(0.01, "ziplora-fast: Adam learning rate of the layer-wise fit")
    fast_tokens: int = _f(256, "ziplora-fast: recorded input rows kept per layer and source")
    eval_samples: int = _f(
        4, "ziplora: fixed noisy samples per source for the whole-model error in the report"
    )
    # --- orthogonal / report --------------------------------------------------------------------
    ortho_tolerance: float = _f(
        0.005,
        "orthogonal: largest normalised overlap ||A_i A_j^T|| / (||A_i|| ||A_j||) accepted as orthogonal",
    )
    probes: int = _f(32, "report: random input vectors per layer when measuring preservation/interference")

    def __post_init__(self) -> None:
        if self.method not in METHODS:
            raise ConfigError(f"option method: {self.method!r} is not one of {', '.join(METHODS)}")
        if self.rank is not None and self.rank < 1:
            raise ConfigError(f"option rank must be 1 or more, got {self.rank}")
        if not 0.0 < self.density <= 1.0:
            raise ConfigError(f"option density must be in (0, 1], got {self.density}")
        for name in ("steps", "fast_steps", "resolution", "reference_steps"):
            if getattr(self, name) < 0:
                raise ConfigError(f"option {name} must be 0 or more, got {getattr(self, name)}")
        for name in ("batch_size", "reference_count", "fast_tokens", "eval_samples", "probes"):
            if getattr(self, name) < 1:
                raise ConfigError(f"option {name} must be 1 or more, got {getattr(self, name)}")
        for name in ("lr", "fast_lr"):
            if getattr(self, name) <= 0:
                raise ConfigError(f"option {name} must be > 0, got {getattr(self, name)}")
        if self.similarity_weight < 0 or self.ortho_tolerance < 0:
            raise ConfigError("options similarity_weight and ortho_tolerance must be 0 or more")

    def source_specs(self) -> list[SourceSpec]:
        return [parse_source(s) for s in self.sources]

    def check_complete(self) -> None:
        """Cross-option checks, done before any file is read."""
        if not self.sources:
            raise ConfigError("nothing to merge: give one or more LoRA files (FILE[:WEIGHT[:BLOCKS]])")
        if not self.out and not self.into_base:
            raise ConfigError(
                "say where the result goes: --out merged.safetensors and/or --into-base model.safetensors"
            )
        if self.method in ZIPLORA_METHODS + ("orthogonal",) and len(self.sources) < 2:
            raise ConfigError(f"method {self.method} merges two or more LoRAs; got {len(self.sources)}")
        if self.method in ZIPLORA_METHODS:
            if not self.model:
                raise ConfigError(f"method {self.method} runs the base model: give it with --model")
            if len(self.prompts) != len(self.sources):
                raise ConfigError(
                    f"method {self.method} needs one prompt per source (its trigger words, e.g. "
                    f"'a sks dog' / 'a painting in zwx style'): got {len(self.prompts)} prompts "
                    f"for {len(self.sources)} sources (--prompt once per source)"
                )
            if self.references and len(self.references) != len(self.sources):
                raise ConfigError(
                    f"--references: give one folder per source ('' to generate that source's images); "
                    f"got {len(self.references)} for {len(self.sources)} sources"
                )
        if self.into_base and not self.model:
            raise ConfigError("--into-base adds the LoRA into a base model: give the model with --model")
