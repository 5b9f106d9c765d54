"""TrainConfig: every option of a training run, with its help text, loadable from presets/train_*.toml.

    >>> from studio.config import build_config, load_preset
    >>> cfg = build_config(TrainConfig, load_preset("train_style_sd15"), data_dir="my_images", max_steps=500)

Field names follow kohya's where one exists (network_dim -> rank, block_dims, down_lr_weight, ...), so
kohya users recognise them.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

from studio.errors import ConfigError

Method = Literal["dreambooth", "style", "b_lora", "orthogonal"]
METHODS: tuple[str, ...] = ("dreambooth", "style", "b_lora", "orthogonal")


def _f(default, help_text: str):
    """A dataclass field with its help text (lists get a fresh copy per instance)."""
    if isinstance(default, list):
        return field(default_factory=lambda: list(default), metadata={"help": help_text})
    return field(default=default, metadata={"help": help_text})


@dataclass
class TrainConfig:
    # --- what to train -------------------------------------------------------------------------
    method: Method = _f("style", "training method: dreambooth, style, b_lora (SDXL) or orthogonal")
    model: str = _f("", "base model: diffusers folder or single .safetensors file ('' = built-in demo model)")
    allow_pickle: bool = _f(False, "allow loading a pickle (.ckpt) base model: it can run code")
    output_dir: str = _f("output", "folder for the LoRA, checkpoints, samples and events.jsonl")
    output_name: str = _f("lora", "file name of the LoRA (without .safetensors)")
    overwrite: bool = _f(False, "replace an existing LoRA file of the same name")
    save_dtype: Literal["fp16", "bf16", "fp32"] = _f("fp16", "dtype of the saved LoRA weights")
    # --- data ----------------------------------------------------------------------------------
    data_dir: str = _f("", "folder of training images (instance images for DreamBooth)")
    prompt: str = _f("", "prompt for images without a caption file, e.g. 'a photo of sks dog'")
    use_captions: bool = _f(
        True, "read a caption file next to each image (name.txt); missing ones use prompt"
    )
    caption_extension: str = _f(".txt", "extension of caption files")
    repeats: int = _f(1, "how many times each image counts per epoch")
    resolution: int = _f(512, "training resolution (bucket area = resolution^2)")
    enable_buckets: bool = _f(True, "aspect-ratio buckets; off = every image resized and cropped square")
    bucket_step: int = _f(64, "bucket sides are multiples of this many pixels")
    min_bucket_reso: int = _f(256, "smallest bucket side in pixels")
    max_bucket_reso: int = _f(1024, "largest bucket side in pixels")
    crop: Literal["center", "random", "none"] = _f(
        "center", "fit to the bucket: center crop, random crop, or none (resize only, aspect may change)"
    )
    flip_aug: bool = _f(False, "random horizontal flips")
    caption_dropout_rate: float = _f(0.0, "probability of training a step with an empty caption")
    shuffle_caption: bool = _f(False, "shuffle comma-separated caption tags each step")
    keep_tokens: int = _f(0, "with shuffle_caption: keep the first N tags in place")
    caption_separator: str = _f(",", "separator between caption tags")
    cache_latents: bool = _f(
        True, "encode every image with the VAE once before training (off with random crop)"
    )
    cache_text_embeddings: bool = _f(True, "encode captions once when the text encoder is not trained")
    # --- DreamBooth prior preservation -----------------------------------------------------------
    prior_preservation: bool = _f(
        False, "DreamBooth: add class images with their own loss (prior preservation)"
    )
    class_data_dir: str = _f("", "folder of class images; missing ones are generated with the base model")
    class_prompt: str = _f("", "prompt of the class images, e.g. 'a photo of a dog'")
    num_class_images: int = _f(100, "how many class images to have (generated when the folder has fewer)")
    prior_loss_weight: float = _f(1.0, "weight of the class-image loss")
    class_generation_steps: int = _f(30, "denoising steps when generating class images")
    # --- network ---------------------------------------------------------------------------------
    rank: int = _f(16, "LoRA rank (kohya network_dim)")
    alpha: float = _f(0.0, "LoRA alpha (kohya network_alpha); 0 = same as rank (scale 1)")
    conv_rank: int = _f(0, "rank of 3x3 convs of resnets/samplers (LoCon); 0 = no conv LoRA")
    conv_alpha: float = _f(0.0, "alpha of conv LoRA; 0 = same as conv_rank")
    train_text_encoder: bool = _f(False, "also train LoRA on the text encoder(s) (block BASE)")
    lora_dropout: float = _f(0.0, "dropout inside LoRA layers")
    blocks: list[str] = _f([], "only these block ids get a LoRA, e.g. OUT00,OUT01 (empty = all)")
    layers: list[str] = _f(
        [], "only modules with these names, e.g. to_q,to_k,to_v,to_out.0 (empty = kohya's)"
    )
    block_rank: dict[str, float] | None = _f(None, "rank per block id, e.g. 'IN04=8,OUT01=0' (0 = no module)")
    block_alpha: dict[str, float] | None = _f(None, "alpha per block id, e.g. 'IN04=4'")
    block_lr: dict[str, float] | None = _f(
        None, "learning-rate multiplier per block id, e.g. 'OUT00=2,IN07=0.5'"
    )
    block_dims: list[int] | None = _f(None, "kohya block_dims: 25 values (SD1.x) or 23 (SDXL)")
    block_alphas: list[float] | None = _f(None, "kohya block_alphas: 25 values (SD1.x) or 23 (SDXL)")
    conv_block_dims: list[int] | None = _f(None, "kohya conv_block_dims (LoCon ranks per block)")
    conv_block_alphas: list[float] | None = _f(None, "kohya conv_block_alphas")
    down_lr_weight: str = _f(
        "", "kohya down_lr_weight: 12 values (SD1.x) / 9 (SDXL) or sine, cosine, ...(+offset)"
    )
    mid_lr_weight: str = _f("", "kohya mid_lr_weight: 1 value (SD1.x) / 3 (SDXL)")
    up_lr_weight: str = _f("", "kohya up_lr_weight: 12 values (SD1.x) / 9 (SDXL) or a shape name")
    block_lr_zero_threshold: float = _f(0.0, "blocks whose lr weight is at or under this get no LoRA")
    # --- orthogonal adaptation -------------------------------------------------------------------
    ortho_seed: int = _f(0, "orthogonal: seed of the shared basis (the same for every concept to merge)")
    ortho_slice: int = _f(0, "orthogonal: this concept's index (which slice of the basis it owns)")
    ortho_num_concepts: int = _f(4, "orthogonal: how many concepts the basis must hold")
    # --- B-LoRA ----------------------------------------------------------------------------------
    split: bool = _f(False, "B-LoRA: also write the content (OUT00) and style (OUT01) halves as two files")
    # --- optimisation ----------------------------------------------------------------------------
    max_steps: int = _f(1000, "optimizer steps to train")
    batch_size: int = _f(1, "images per step per device")
    gradient_accumulation_steps: int = _f(1, "micro-batches summed into one optimizer step")
    optimizer: Literal["adamw", "adamw8bit", "prodigy"] = _f(
        "adamw", "adamw, adamw8bit (bitsandbytes, CUDA) or prodigy (prodigyopt; use learning_rate 1)"
    )
    learning_rate: float = _f(1e-4, "learning rate of the UNet LoRA (kohya unet_lr)")
    text_encoder_lr: float = _f(0.0, "learning rate of the text-encoder LoRA; 0 = learning_rate")
    weight_decay: float = _f(1e-2, "AdamW weight decay")
    adam_beta1: float = _f(0.9, "Adam beta1")
    adam_beta2: float = _f(0.999, "Adam beta2")
    adam_epsilon: float = _f(1e-8, "Adam epsilon")
    max_grad_norm: float = _f(1.0, "gradient clipping norm; 0 = no clipping")
    lr_scheduler: Literal[
        "constant", "constant_with_warmup", "linear", "cosine", "cosine_with_restarts", "polynomial"
    ] = _f("constant", "learning-rate schedule")
    lr_warmup_steps: int = _f(0, "steps of linear warmup")
    lr_num_cycles: int = _f(1, "cycles of cosine_with_restarts")
    min_snr_gamma: float = _f(0.0, "min-SNR loss weighting gamma (5 is common); 0 = off")
    noise_offset: float = _f(0.0, "noise offset (0.05-0.1 helps very dark/bright images); 0 = off")
    clip_skip: int = _f(1, "SD1.x: use the text encoder's n-th last layer (2 for many anime models)")
    seed: int = _f(42, "random seed (data order, noise, timesteps)")
    mixed_precision: Literal["auto", "no", "fp16", "bf16"] = _f(
        "auto", "auto = bf16 on CUDA when supported, else fp16 on CUDA, no on CPU"
    )
    gradient_checkpointing: bool = _f(False, "trade compute for memory (recompute activations)")
    attention: Literal["auto", "sdpa", "xformers"] = _f(
        "auto", "attention kernel: auto = xformers when installed on CUDA, else PyTorch SDPA"
    )
    device: str = _f("auto", "auto, cpu, cuda or cuda:N (accelerate launch decides when used)")
    # --- samples, checkpoints, logs --------------------------------------------------------------
    sample_every: int = _f(0, "render sample images every N steps (0 = never)")
    sample_prompts: list[str] = _f(
        [], "prompts of the sample images ('|' separates several on the command line)"
    )
    sample_seed: int = _f(1234, "seed of the sample images (the same at every sampling)")
    sample_steps: int = _f(20, "denoising steps of sample images")
    sample_guidance: float = _f(7.0, "guidance scale of sample images")
    checkpoint_every: int = _f(0, "save a resumable checkpoint every N steps (0 = only at the end)")
    checkpoints_keep: int = _f(3, "keep this many recent checkpoints (0 = all)")
    resume: str = _f("", "resume from a checkpoint folder, or 'latest' for the newest in output_dir")
    progress_bar: bool = _f(True, "show a progress bar in the terminal")

    def __post_init__(self) -> None:
        self._check_positive(
            "max_steps", "batch_size", "gradient_accumulation_steps", "repeats", "resolution"
        )
        self._check_positive("rank", "bucket_step", "clip_skip", "ortho_num_concepts")
        for name in ("caption_dropout_rate", "lora_dropout"):
            if not 0.0 <= getattr(self, name) < 1.0:
                raise ConfigError(f"option {name} must be in [0, 1), got {getattr(self, name)}")
        if self.learning_rate <= 0:
            raise ConfigError(f"option learning_rate must be > 0, got {self.learning_rate}")
        for name in ("sample_every", "checkpoint_every", "checkpoints_keep", "lr_warmup_steps", "conv_rank"):
            if getattr(self, name) < 0:
                raise ConfigError(f"option {name} must be 0 or more, got {getattr(self, name)}")
        if self.lr_warmup_steps > self.max_steps:
            raise ConfigError(
                f"lr_warmup_steps ({self.lr_warmup_steps}) is more than max_steps ({self.max_steps})"
            )
        if self.sample_prompts and len(self.sample_prompts) == 1 and "|" in self.sample_prompts[0]:
            self.sample_prompts = [p.strip() for p in self.sample_prompts[0].split("|") if p.strip()]

    def _check_positive(self, *names: str) -> None:
        for name in names:
            if getattr(self, name) < 1:
                raise ConfigError(f"option {name} must be 1 or more, got {getattr(self, name)}")

    @property
    def effective_alpha(self) -> float:
        return self.alpha or float(self.rank)

    @property
    def effective_text_encoder_lr(self) -> float:
        return self.text_encoder_lr or self.learning_rate
