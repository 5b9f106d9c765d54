"""TrainConfig: every option of a training run, with its help text, loadable from presets/train_*.toml.

    >>> from studio.core.options import build_config, load_preset
    >>> cfg = build_config(TrainConfig, load_preset("style_sd15", "train"), data_dir="my_images", max_steps=500)

Field names follow kohya's where one exists (network_dim -> rank, block_dims, down_lr_weight, ...), so
kohya users recognise them.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from studio.core.errors import ConfigError
from studio.core.lora_keys import is_bundle_word
from studio.core.options import check_fields, option

Method = Literal["dreambooth", "style", "b_lora", "orthogonal"]
METHODS: tuple[str, ...] = ("dreambooth", "style", "b_lora", "orthogonal")


@dataclass
class TrainConfig:
    # --- what to train -------------------------------------------------------------------------
    method: Method = option("style", "training method: dreambooth, style, b_lora (SDXL) or orthogonal")
    model: str = option(
        "", "base model: diffusers folder or single .safetensors file ('' = built-in demo model)"
    )
    allow_pickle: bool = option(False, "allow loading a pickle (.ckpt) base model: it can run code")
    output_dir: str = option("output", "folder for the LoRA, checkpoints, samples and events.jsonl")
    output_name: str = option("lora", "file name of the LoRA (without .safetensors)")
    overwrite: bool = option(False, "replace an existing LoRA file of the same name")
    save_dtype: Literal["fp16", "bf16", "fp32"] = option("fp16", "dtype of the saved LoRA weights")
    # --- data ----------------------------------------------------------------------------------
    data_dir: str = option("", "folder of training images (instance images for DreamBooth)")
    prompt: str = option("", "prompt for images without a caption file, e.g. 'a photo of sks dog'")
    use_captions: bool = option(
        True, "read a caption file next to each image (name.txt); missing ones use prompt"
    )
    caption_extension: str = option(".txt", "extension of caption files")
    strict_images: bool = option(
        False, "stop when any image cannot be read (default: train without them, and say which)"
    )
    repeats: int = option(1, "how many times each image counts per epoch", min=1, max=10_000)
    resolution: int = option(512, "training resolution (bucket area = resolution^2)", min=64, max=4096)
    extra_resolutions: list[int] = option(
        [],
        "also train every image at these resolutions, e.g. 768,1024 beside resolution 512 (multi-resolution "
        "training: the model learns the subject at several sizes); an epoch shows each image once per "
        "resolution",
        min=64,
        max=4096,
    )
    enable_buckets: bool = option(True, "aspect-ratio buckets; off = every image resized and cropped square")
    bucket_step: int = option(64, "bucket sides are multiples of this many pixels", min=8, max=1024)
    min_bucket_reso: int = option(256, "smallest bucket side in pixels", min=8)
    max_bucket_reso: int = option(1024, "largest bucket side in pixels", min=8, max=8192)
    crop: Literal["center", "random", "none"] = option(
        "center", "fit to the bucket: center crop, random crop, or none (resize only, aspect may change)"
    )
    flip_aug: bool = option(False, "random horizontal flips")
    caption_dropout_rate: float = option(0.0, "probability of training a step with an empty caption", min=0.0)
    shuffle_caption: bool = option(False, "shuffle comma-separated caption tags each step")
    keep_tokens: int = option(0, "with shuffle_caption: keep the first N tags in place", min=0)
    caption_separator: str = option(",", "separator between caption tags")
    cache_latents: bool = option(
        True, "encode every image with the VAE once before training (off with random crop)"
    )
    cache_text_embeddings: bool = option(True, "encode captions once when the text encoder is not trained")
    # --- DreamBooth prior preservation -----------------------------------------------------------
    prior_preservation: bool = option(
        False, "DreamBooth: add class images with their own loss (prior preservation)"
    )
    class_data_dir: str = option("", "folder of class images; missing ones are generated with the base model")
    class_prompt: str = option("", "prompt of the class images, e.g. 'a photo of a dog'")
    num_class_images: int = option(
        100, "how many class images to have (generated when the folder has fewer)", min=0, max=100_000
    )
    prior_loss_weight: float = option(
        1.0, "weight of the class-image (DreamBooth) or regularisation-image (style) loss", min=0.0
    )
    reg_data_dir: str = option(
        "",
        "style: folder of regularisation images with captions (name.txt), trained alongside the style "
        "images so prompts keep their content; weighted by prior_loss_weight",
    )
    class_generation_steps: int = option(30, "denoising steps when generating class images", min=1, max=1000)
    # --- network ---------------------------------------------------------------------------------
    network_type: Literal["lora", "locon", "loha", "lokr", "dora"] = option(
        "lora",
        "lora; locon (LoRA on the 3x3 convs too); LyCORIS loha, lokr; dora (LoRA with weight decomposition)",
    )
    lokr_factor: int = option(
        -1, "LoKr: split each weight's sides near this factor (-1 = as balanced as possible)"
    )
    rank: int = option(16, "LoRA rank (kohya network_dim)", min=1, max=1024)
    alpha: float = option(0.0, "LoRA alpha (kohya network_alpha); 0 = same as rank (scale 1)", min=0.0)
    conv_rank: int = option(
        0,
        "rank of 3x3 convs of resnets/samplers (LoCon); 0 = no conv layers (locon: same as rank)",
        min=0,
        max=1024,
    )
    conv_alpha: float = option(0.0, "alpha of conv LoRA; 0 = same as conv_rank", min=0.0)
    train_text_encoder: bool = option(False, "also train LoRA on the text encoder(s) (block BASE)")
    token_words: list[str] = option(
        [],
        "learn these trigger words' token embeddings with the LoRA (pivotal tuning), one vector each, saved in "
        "the LoRA file the way A1111 reads them; words the tokenizer does not have whole, e.g. sks",
    )
    token_lr: float = option(1e-3, "learning rate of the token_words' embeddings", min=0.0)
    lora_dropout: float = option(0.0, "dropout inside LoRA layers", min=0.0)
    blocks: list[str] = option([], "only these block ids get a LoRA, e.g. OUT00,OUT01 (empty = all)")
    layers: list[str] = option(
        [], "only modules with these names, e.g. to_q,to_k,to_v,to_out.0 (empty = kohya's)"
    )
    block_rank: dict[str, float] | None = option(
        None, "rank per block id, e.g. 'IN04=8,OUT01=0' (0 = no module)"
    )
    block_alpha: dict[str, float] | None = option(None, "alpha per block id, e.g. 'IN04=4'")
    block_lr: dict[str, float] | None = option(
        None, "learning-rate multiplier per block id, e.g. 'OUT00=2,IN07=0.5'"
    )
    block_dims: list[int] | None = option(None, "kohya block_dims: 25 values (SD1.x) or 23 (SDXL)")
    block_alphas: list[float] | None = option(None, "kohya block_alphas: 25 values (SD1.x) or 23 (SDXL)")
    conv_block_dims: list[int] | None = option(None, "kohya conv_block_dims (LoCon ranks per block)")
    conv_block_alphas: list[float] | None = option(None, "kohya conv_block_alphas")
    down_lr_weight: str = option(
        "", "kohya down_lr_weight: 12 values (SD1.x) / 9 (SDXL) or sine, cosine, ...(+offset)"
    )
    mid_lr_weight: str = option("", "kohya mid_lr_weight: 1 value (SD1.x) / 3 (SDXL)")
    up_lr_weight: str = option("", "kohya up_lr_weight: 12 values (SD1.x) / 9 (SDXL) or a shape name")
    block_lr_zero_threshold: float = option(
        0.0, "blocks whose lr weight is at or under this get no LoRA", min=0.0
    )
    # --- orthogonal adaptation -------------------------------------------------------------------
    ortho_seed: int = option(0, "orthogonal: seed of the shared basis (the same for every concept to merge)")
    ortho_slice: int = option(0, "orthogonal: this concept's index (which slice of the basis it owns)", min=0)
    ortho_num_concepts: int = option(4, "orthogonal: how many concepts the basis must hold", min=1, max=1024)
    # --- B-LoRA ----------------------------------------------------------------------------------
    split: bool = option(
        False, "B-LoRA: also write the content (OUT00) and style (OUT01) halves as two files"
    )
    # --- optimisation ----------------------------------------------------------------------------
    max_steps: int = option(1000, "optimizer steps to train", min=1, max=1_000_000)
    batch_size: int = option(1, "images per step per device", min=1, max=256)
    gradient_accumulation_steps: int = option(
        1, "micro-batches summed into one optimizer step", min=1, max=1024
    )
    optimizer: Literal["adamw", "adamw8bit", "prodigy"] = option(
        "adamw", "adamw, adamw8bit (bitsandbytes, CUDA) or prodigy (prodigyopt; use learning_rate 1)"
    )
    learning_rate: float = option(1e-4, "learning rate of the UNet LoRA (kohya unet_lr)", min=0.0)
    text_encoder_lr: float = option(0.0, "learning rate of the text-encoder LoRA; 0 = learning_rate", min=0.0)
    weight_decay: float = option(1e-2, "AdamW weight decay", min=0.0)
    adam_beta1: float = option(0.9, "Adam beta1")
    adam_beta2: float = option(0.999, "Adam beta2")
    adam_epsilon: float = option(1e-8, "Adam epsilon")
    max_grad_norm: float = option(1.0, "gradient clipping norm; 0 = no clipping", min=0.0)
    lr_scheduler: Literal[
        "constant", "constant_with_warmup", "linear", "cosine", "cosine_with_restarts", "polynomial"
    ] = option("constant", "learning-rate schedule")
    lr_warmup_steps: int = option(0, "steps of linear warmup", min=0)
    lr_num_cycles: int = option(1, "cycles of cosine_with_restarts", min=1)
    min_snr_gamma: float = option(0.0, "min-SNR loss weighting gamma (5 is common); 0 = off", min=0.0)
    noise_offset: float = option(
        0.0, "noise offset (0.05-0.1 helps very dark/bright images); 0 = off", min=0.0
    )
    clip_skip: int = option(
        1, "SD1.x: use the text encoder's n-th last layer (2 for many anime models)", min=1, max=12
    )
    seed: int = option(42, "random seed (data order, noise, timesteps)")
    mixed_precision: Literal["auto", "no", "fp16", "bf16"] = option(
        "auto", "auto = bf16 on CUDA when supported, else fp16 on CUDA, no on CPU"
    )
    gradient_checkpointing: bool = option(False, "trade compute for memory (recompute activations)")
    attention: Literal["auto", "sdpa", "xformers"] = option(
        "auto", "attention kernel: auto = xformers when installed on CUDA, else PyTorch SDPA"
    )
    device: str = option("auto", "auto, cpu, cuda or cuda:N (accelerate launch decides when used)")
    # --- samples, checkpoints, logs --------------------------------------------------------------
    sample_every: int = option(0, "render sample images every N steps (0 = never)", min=0)
    sample_prompts: list[str] = option(
        [],
        "prompts of the sample images ('|' separates several on the command line)",
        separator="|",
    )
    sample_seed: int = option(1234, "seed of the sample images (the same at every sampling)")
    sample_steps: int = option(20, "denoising steps of sample images", min=1, max=1000)
    sample_guidance: float = option(7.0, "guidance scale of sample images", min=0.0)
    checkpoint_every: int = option(
        0, "save a resumable checkpoint every N steps (0 = only at the end)", min=0
    )
    checkpoints_keep: int = option(3, "keep this many recent checkpoints (0 = all)", min=0)
    resume: str = option("", "resume from a checkpoint folder, or 'latest' for the newest in output_dir")
    progress_bar: bool = option(True, "show a progress bar in the terminal")
    log_with: Literal["none", "tensorboard"] = option(
        "none",
        "also log to TensorBoard (loss, lr, samples), beside events.jsonl; needs the tensorboard package",
    )
    logging_dir: str = option("", "TensorBoard log folder ('' = <output_dir>/logs)")

    def check(self) -> None:
        """Refuse values that cannot work (bounds are on the fields), before anything is loaded."""
        check_fields(self)
        for name in ("caption_dropout_rate", "lora_dropout"):
            if not 0.0 <= getattr(self, name) < 1.0:
                raise ConfigError(f"option {name} must be in [0, 1), got {getattr(self, name)}")
        if self.reg_data_dir and self.method != "style":
            raise ConfigError(
                "reg_data_dir is for method style; DreamBooth keeps its class with prior_preservation and "
                "class_data_dir"
            )
        if self.learning_rate <= 0:
            raise ConfigError(f"option learning_rate must be > 0, got {self.learning_rate}")
        for word in self.token_words:
            if not is_bundle_word(word):
                raise ConfigError(f"token_words: {word!r} must be one word, without spaces or dots")
        if len(set(self.token_words)) != len(self.token_words):
            raise ConfigError("token_words: each word must be given once")
        if self.lr_warmup_steps > self.max_steps:
            raise ConfigError(
                f"lr_warmup_steps ({self.lr_warmup_steps}) is more than max_steps ({self.max_steps})"
            )

    @property
    def effective_conv_rank(self) -> int:
        """conv_rank, or for network_type locon with conv_rank 0, the rank (LoCon adapts the convs)."""
        return self.conv_rank or (self.rank if self.network_type == "locon" else 0)

    @property
    def effective_alpha(self) -> float:
        return self.alpha or float(self.rank)

    @property
    def effective_text_encoder_lr(self) -> float:
        return self.text_encoder_lr or self.learning_rate
