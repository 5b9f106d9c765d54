"""What a `generate` run is asked to do: the LoRA stack (LoraSpec) and every option (GenerateConfig).

The dataclass fields carry their own help; `lora-studio generate` turns them into flags and TOML presets
load into them. A stack entry is typed FILE[:WEIGHT[:BLOCKS]]:

    >>> cfg = GenerateConfig(prompt="a fox", loras=["fox.safetensors:0.8:OUTALL", "snow.safetensors"])
    >>> [(s.path.name, s.weight, s.block_weights) for s in cfg.stack()]
    [('fox.safetensors', 0.8, 'OUTALL'), ('snow.safetensors', 1.0, None)]
"""

from __future__ import annotations

import re
import typing
from collections.abc import Mapping
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Literal

from studio.errors import ConfigError
from studio.schedulers import scheduler_name

Mode = Literal["merge", "switch", "composite"]


@dataclass
class LoraSpec:
    """One LoRA of a stack: a file, its weight, and optional block weights."""

    path: Path = field(metadata={"help": "LoRA file (.safetensors; kohya, A1111, ComfyUI or diffusers keys)"})
    weight: float = field(default=1.0, metadata={"help": "strength; 0 turns it off, negative inverts it"})
    block_weights: str | dict[str, float] | None = field(
        default=None,
        metadata={"help": "preset (OUTALL, CONTENT...), 12/17/20/26-value vector, or {block id: weight}"},
    )
    sha256: str | None = field(default=None, metadata={"help": "expected file hash (set by --from)"})

    @classmethod
    def parse(cls, text: str) -> LoraSpec:
        """Read FILE[:WEIGHT[:BLOCKS]] as typed on the command line.

        >>> LoraSpec.parse("style.safetensors:0.8:OUTALL")
        LoraSpec(path=PosixPath('style.safetensors'), weight=0.8, block_weights='OUTALL', sha256=None)
        >>> LoraSpec.parse("C:/loras/a.safetensors:0.5").weight
        0.5
        """
        text = text.strip()
        for parts in (text.rsplit(":", 1), text.rsplit(":", 2)):
            if len(parts) > 1 and _is_number(parts[1]) and parts[0] and not Path(text).is_file():
                blocks = parts[2] if len(parts) == 3 else None
                return cls(Path(parts[0]), float(parts[1]), blocks or None)
        if not text:
            raise ConfigError("--lora needs a file: FILE[:WEIGHT[:BLOCKS]]")
        return cls(Path(text))


def _is_number(text: str) -> bool:
    return re.fullmatch(r"\s*[-+]?(\d+\.?\d*|\.\d+)([eE][-+]?\d+)?\s*", text) is not None


def _as_spec(value) -> LoraSpec:
    if isinstance(value, LoraSpec):
        return value
    if isinstance(value, str | Path):
        return LoraSpec.parse(str(value))
    if isinstance(value, Mapping):
        known = {f.name for f in fields(LoraSpec)}
        if "path" not in value or set(value) - known:
            raise ConfigError(
                f"a LoRA entry needs 'path' and may have {', '.join(sorted(known))}; got {dict(value)}"
            )
        return LoraSpec(**{**value, "path": Path(value["path"])})
    raise ConfigError(f"cannot read {value!r} as a LoRA: give FILE[:WEIGHT[:BLOCKS]]")


@dataclass
class GenerateConfig:
    """Everything one `generate` run needs; TOML presets and CLI flags load into it."""

    prompt: str = field(default="", metadata={"help": "what to draw"})
    negative_prompt: str = field(default="", metadata={"help": "what to keep out of the image"})
    model: str | None = field(
        default=None,
        metadata={
            "help": "base model: diffusers folder or single-file .safetensors (default: built-in demo)"
        },
    )
    loras: list[LoraSpec] = field(
        default_factory=list, metadata={"help": "the LoRA stack: FILE[:WEIGHT[:BLOCKS]], repeatable"}
    )
    b_lora_content: str | None = field(
        default=None, metadata={"help": "B-LoRA (SDXL) whose content block to use: FILE[:WEIGHT]"}
    )
    b_lora_style: str | None = field(
        default=None, metadata={"help": "B-LoRA (SDXL) whose style block to use: FILE[:WEIGHT]"}
    )
    mode: Mode = field(
        default="merge",
        metadata={"help": "merge: all LoRAs at once; switch: one at a time, every tau steps; composite: "
                  "each LoRA's guided prediction averaged every step"},
    )  # fmt: skip
    tau: int = field(default=5, metadata={"help": "switch mode: steps before the next LoRA takes over"})
    composite_batched: bool = field(
        default=True,
        metadata={
            "help": "composite mode: all LoRAs in one batched UNet call (off: one call per LoRA, slower, less memory)"
        },
    )
    scheduler: str = field(
        default="DPM++ 2M Karras",
        metadata={"help": "Euler, Euler a, DPM++ 2M, DPM++ 2M Karras, DPM++ 2M SDE Karras, DDIM, UniPC"},
    )
    steps: int = field(default=20, metadata={"help": "denoising steps"})
    cfg: float = field(default=7.0, metadata={"help": "classifier-free guidance scale (1 = off)"})
    seed: int = field(
        default=-1, metadata={"help": "seed of the first image (-1: random); image i uses seed+i"}
    )
    width: int | None = field(default=None, metadata={"help": "pixels, multiple of 8 (default: the model's)"})
    height: int | None = field(
        default=None, metadata={"help": "pixels, multiple of 8 (default: the model's)"}
    )
    batch_count: int = field(default=1, metadata={"help": "number of images, one after the other"})
    clip_skip: int = field(
        default=1, metadata={"help": "A1111 clip skip: 1 = last text-encoder layer, 2 = one before"}
    )
    out: Path = field(default=Path("outputs"), metadata={"help": "folder for the PNG files"})
    device: str = field(default="auto", metadata={"help": "auto, cpu, cuda, cuda:N or mps"})
    dtype: Literal["auto", "fp32", "fp16", "bf16"] = field(
        default="auto", metadata={"help": "auto: bf16/fp16 on a GPU, fp32 on the CPU"}
    )
    fuse: Literal["auto", "on", "off"] = field(
        default="auto",
        metadata={
            "help": "merge LoRAs into the weights for base speed; auto: on a GPU, while the stack stays"
        },
    )
    compile: bool = field(default=False, metadata={"help": "torch.compile the UNet (merge mode; GPU)"})
    allow_pickle: bool = field(
        default=False, metadata={"help": "also load .ckpt/.pt/.bin files (they can run code)"}
    )
    expect_model_hash: str | None = field(
        default=None, metadata={"help": "refuse a base model with another hash (set by --from)"}
    )

    def __post_init__(self) -> None:
        self.loras = [_as_spec(v) for v in (self.loras or [])]
        self.out = Path(self.out)

    def stack(self) -> list[LoraSpec]:
        """The LoRAs to run: `loras`, then the B-LoRA content and style halves."""
        stack = list(self.loras)
        for text, preset in ((self.b_lora_content, "CONTENT"), (self.b_lora_style, "STYLE")):
            if text:
                spec = LoraSpec.parse(text)
                if spec.block_weights is not None:
                    raise ConfigError(f"B-LoRA {preset.lower()} takes FILE[:WEIGHT]; got {text!r}")
                stack.append(LoraSpec(spec.path, spec.weight, preset))
        return stack


def check_config(cfg: GenerateConfig) -> None:
    """Refuse values that cannot work, before anything is loaded."""
    scheduler_name(cfg.scheduler)
    for name in ("mode", "fuse", "dtype"):  # build_config checks these too; a config built in code may not
        choices = typing.get_args(typing.get_type_hints(GenerateConfig)[name])
        if getattr(cfg, name) not in choices:
            raise ConfigError(f"{name} must be one of {', '.join(choices)}; got {getattr(cfg, name)!r}")
    for name, low in (("steps", 1), ("tau", 1), ("batch_count", 1), ("clip_skip", 1)):
        if getattr(cfg, name) < low:
            raise ConfigError(f"{name} must be at least {low}; got {getattr(cfg, name)}")
    if cfg.cfg < 0:
        raise ConfigError(f"cfg must not be negative; got {cfg.cfg}")
    for name in ("width", "height"):
        value = getattr(cfg, name)
        if value is not None and (value < 8 or value % 8):
            raise ConfigError(f"{name} must be a positive multiple of 8; got {value}")
    if cfg.mode != "merge" and not cfg.stack():
        raise ConfigError(f"mode {cfg.mode!r} composes several LoRAs but the stack is empty; add --lora FILE")
    if cfg.compile and cfg.mode != "merge":
        raise ConfigError(
            "compile works with mode 'merge' only (switch and composite change the graph per step)"
        )


def config_from_record(record: dict, **overrides) -> GenerateConfig:
    """The GenerateConfig that reproduces the image a record (studio.png_meta.read_record) describes."""
    try:
        values = _record_values(record)
    except (KeyError, TypeError) as exc:
        raise ConfigError(
            f"this generation record is incomplete (no {exc}); it cannot be regenerated"
        ) from None
    values.update({k: v for k, v in overrides.items() if v is not None})
    return GenerateConfig(**values)


def _record_values(record: dict) -> dict:
    loras = [
        LoraSpec(Path(lora["path"]), lora["weight"], lora["block_weights"], lora["sha256"])
        for lora in record["loras"]
    ]
    return {
        "prompt": record["prompt"],
        "negative_prompt": record["negative_prompt"],
        "model": record["model"]["path"],
        "expect_model_hash": record["model"]["hash"],
        "loras": loras,
        "seed": record["seed"],
        "batch_count": 1,
        "fuse": "on" if record["fused"] else "off",
        **{k: record[k] for k in ("mode", "tau", "composite_batched", "scheduler", "steps", "cfg")},
        **{k: record[k] for k in ("width", "height", "clip_skip", "device", "dtype")},
    }
