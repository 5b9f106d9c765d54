"""MergeConfig: every option of a merge, with its help text, loadable from presets/merge_*.toml.

    >>> from studio.core.options import build_config
    >>> cfg = build_config(MergeConfig, sources=["a.safetensors:0.7", "b.safetensors:0.5:OUTALL"],
    ...                    method="svd", rank=32, out="merged.safetensors")
    >>> [(s.path.name, s.weight, s.blocks) for s in cfg.source_refs()]
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
    fusion        Mix-of-Show gradient fusion: per layer, the weights that best give each concept's outputs on
                  its own recorded inputs, solved in closed form (needs --model and one prompt per source)
    orthogonal    plain weighted sum of LoRAs trained with orthogonal adaptation, after checking they are
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from studio.core.errors import ConfigError
from studio.core.lora_ref import LoraRef, parse_lora_ref
from studio.core.options import check_fields, option

Method = Literal[
    "concat",
    "svd",
    "ties",
    "dare",
    "dare-ties",
    "magnitude",
    "ziplora",
    "ziplora-fast",
    "fusion",
    "orthogonal",
]
METHODS: tuple[str, ...] = (
    "concat", "svd", "ties", "dare", "dare-ties", "magnitude", "ziplora", "ziplora-fast", "fusion", "orthogonal",
)  # fmt: skip
DENSE_METHODS = ("ties", "dare", "dare-ties", "magnitude")
ZIPLORA_METHODS = ("ziplora", "ziplora-fast")
MODEL_METHODS = ZIPLORA_METHODS + ("fusion",)  # they run the base model on each source's prompts


@dataclass
class MergeConfig:
    # --- what to merge -------------------------------------------------------------------------
    sources: list[str] = option(
        [], "LoRA files, each FILE[:WEIGHT[:BLOCKS]] (BLOCKS: preset name or block vector)"
    )
    method: Method = option(
        "concat", "concat, svd, ties, dare, dare-ties, magnitude, ziplora, ziplora-fast, fusion, orthogonal"
    )
    out: str = option("", "output LoRA file (.safetensors); may be empty when only --into-base is wanted")
    format: Literal["kohya", "peft"] = option(
        "kohya",
        "output key format: kohya (loads in A1111, ComfyUI, diffusers) or peft (diffusers / peft only: "
        "ComfyUI names attention layers of diffusers files only as processor.to_q, so it would drop them)",
    )
    save_dtype: Literal["auto", "fp32", "fp16", "bf16"] = option(
        "auto", "dtype of the saved factors (auto = the most precise dtype among the sources)"
    )
    overwrite: bool = option(False, "replace existing output files")
    allow_pickle: bool = option(
        False, "also read pickle LoRA / model files (.pt/.ckpt/.bin): they can run code"
    )
    family: Literal["sd15", "sdxl"] | None = option(None, "sd15 or sdxl, for files that do not say")
    model: str = option(
        "",
        "base model (diffusers folder, single file, or demo:sd15 / demo:sdxl): needed by ziplora, fusion, "
        "DoRA sources and --into-base",
    )
    into_base: str = option(
        "", "also add the merged LoRA into the base model and save it as this single file"
    )
    device: str = option(
        "auto", "auto, cpu, cuda or cuda:N: where ziplora and the dense methods (ties...) run"
    )
    dtype: Literal["auto", "fp32", "bf16", "fp16"] = option(
        "auto",
        "ziplora, fusion: the base model's dtype while it runs (auto: bf16/fp16 on a GPU, fp32 on the CPU); "
        "bf16 halves its memory, e.g. to fuse SDXL LoRAs on a 24 GB machine; the solve stays in float32",
    )
    # --- low-rank result ------------------------------------------------------------------------
    rank: int | None = option(
        None, "rank of the result for svd/ties/dare/magnitude (default: largest source rank)", min=1, max=4096
    )
    svd_solver: Literal["auto", "full", "randomized"] = option(
        "auto",
        "dense SVD after ties/dare: full (exact), randomized (fast) or auto (randomized for rank << size)",
    )
    # --- TIES / DARE / magnitude ----------------------------------------------------------------
    density: float = option(0.5, "ties/dare/magnitude: fraction of each delta's entries kept, in (0, 1]")
    sign_method: Literal["total", "frequency"] = option(
        "total", "ties: elect each entry's sign by total mass or by how many sources agree"
    )
    seed: int = option(0, "seed of DARE's random drop, of ZipLoRA's noise and of the report's random inputs")
    # --- ZipLoRA --------------------------------------------------------------------------------
    prompts: list[str] = option(
        [], "ziplora, fusion: one prompt per source (its trigger words), in source order"
    )
    references: list[str] = option(
        [], "ziplora, fusion: one folder of reference images per source ('' = generate them from the prompt)"
    )
    reference_captions: bool = option(
        False,
        "ziplora, fusion: each reference image is seen with its caption file (name.txt) instead of the "
        "source's prompt (fusion with plain UNet LoRAs: favours the stronger concept, fusion_probe_128.md; with "
        "LoRAs that learnt their trigger words or train the text encoder it keeps both best, "
        "fusion_probe_tw128.md, fusion_probe_te128.md; preset merge_fusion_subjects)",
    )
    steps: int = option(100, "ziplora: merger optimisation steps (paper: 100)", min=0, max=100_000)
    lr: float = option(0.01, "ziplora: Adam learning rate of the mergers (paper: 0.01)")
    similarity_weight: float = option(
        0.01, "ziplora: lambda, weight of the merger-similarity term (paper: 0.01)", min=0.0
    )
    stop_similarity: float = option(
        0.01,
        "ziplora: stop early once the mergers' mean overlap |m_i . m_j| / width (1 at first) is below this",
    )
    batch_size: int = option(1, "ziplora: noisy samples per source per step", min=1, max=256)
    resolution: int = option(
        0, "ziplora: image size of the references in pixels (0 = the model's default)", min=0, max=4096
    )
    reference_count: int = option(
        2, "ziplora: images generated per source when no reference folder is given", min=1, max=1000
    )
    reference_steps: int = option(
        20, "ziplora: denoising steps when generating reference images", min=0, max=1000
    )
    reference_guidance: float = option(
        5.0, "ziplora: guidance scale when generating reference images", min=0.0
    )
    warm_start: bool = option(
        False, "ziplora: start from the layer-wise (ziplora-fast) mergers instead of all ones"
    )
    fast_steps: int = option(200, "ziplora-fast: Adam steps of the layer-wise fit", min=0, max=100_000)
    fast_lr: float = option(0.01, "ziplora-fast: Adam learning rate of the layer-wise fit")
    fast_tokens: int = option(
        256, "ziplora-fast, fusion: recorded input rows kept per layer and source", min=1
    )
    eval_samples: int = option(
        4, "ziplora: fixed noisy samples per source for the whole-model error; fusion: recorded ones", min=1
    )
    # --- gradient fusion -------------------------------------------------------------------------
    fusion_samples: int = option(
        16, "fusion: noisy samples recorded per source (its reference images in turn)", min=1, max=10_000
    )
    fusion_ridge: float = option(
        0.05,
        "fusion: ridge added to each layer's input Gram matrix, relative to its mean diagonal (0.05 with "
        "text-first kept the most of the weaker concept in bench/results/fusion_probe_128.md; LoRAs that "
        "train the text encoder, recorded with captions, kept the most at 0.01: fusion_probe_te128*.md)",
        min=0.0,
    )
    fusion_anchor: Literal["base", "sum"] = option(
        "base",
        "fusion: what the ridge pulls each layer toward where the recorded inputs do not decide it: the base "
        "weights (no change) or the exact sum of the LoRAs",
    )
    fusion_order: Literal["joint", "text-first", "sequential"] = option(
        "text-first",
        "fusion: joint records every layer with each concept's own LoRA; text-first (Mix-of-Show's order) "
        "fuses the cross-attention keys and values first, then records the other layers with them fused; "
        "sequential then goes block by block, each recorded with the blocks before it fused (slower)",
    )
    fusion_text_encoders: Literal["fuse", "sum"] = option(
        "fuse",
        "fusion, text-first or sequential: the text encoders' LoRA layers fused on each concept's prompts (as "
        "Mix-of-Show does: a concept's prompt keeps its own encoding) or their deltas summed (the joint order "
        "always sums them)",
    )
    fusion_balance: Literal["rows", "output"] = option(
        "rows",
        "fusion: how concepts weigh in each layer's fit: alike per recorded row, or each scaled by its own "
        "delta's output energy on its inputs, so every concept's error counts relative to its own change",
    )
    fusion_text_rows: Literal["all", "trigger"] = option(
        "all",
        "fusion, text-first or sequential: the prompt tokens each concept's keys and values are kept on: all, or its trigger "
        "words (those of its prompt the other prompts lack) and the end token, as Mix-of-Show keeps its concept tokens",
    )
    # --- orthogonal / report --------------------------------------------------------------------
    ortho_tolerance: float = option(
        0.005,
        "orthogonal: largest normalised overlap ||A_i A_j^T|| / (||A_i|| ||A_j||) accepted as orthogonal",
        min=0.0,
    )
    probes: int = option(
        32, "report: random input vectors per layer when measuring preservation/interference", min=1
    )

    def source_refs(self) -> list[LoraRef]:
        return [parse_lora_ref(s) for s in self.sources]

    def check(self) -> None:
        """Refuse options that cannot work (bounds are on the fields), before any file is read."""
        check_fields(self)
        if not 0.0 < self.density <= 1.0:
            raise ConfigError(f"option density must be in (0, 1], got {self.density}")
        for name in ("lr", "fast_lr"):
            if getattr(self, name) <= 0:
                raise ConfigError(f"option {name} must be > 0, got {getattr(self, name)}")
        if not self.sources:
            raise ConfigError("nothing to merge: give one or more LoRA files (FILE[:WEIGHT[:BLOCKS]])")
        if not self.out and not self.into_base:
            raise ConfigError(
                "say where the result goes: --out merged.safetensors and/or --into-base model.safetensors"
            )
        if self.method in MODEL_METHODS + ("orthogonal",) and len(self.sources) < 2:
            raise ConfigError(f"method {self.method} merges two or more LoRAs; got {len(self.sources)}")
        if self.method in MODEL_METHODS:
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
        if self.fusion_text_rows == "trigger" and self.fusion_order == "joint":
            raise ConfigError(
                "option fusion_text_rows trigger keeps the keys and values on trigger words, which only the "
                "text-first and sequential orders fit on their own: add fusion_order text-first (or use "
                "fusion_text_rows all)"
            )
        if self.into_base and not self.model:
            raise ConfigError("--into-base adds the LoRA into a base model: give the model with --model")
