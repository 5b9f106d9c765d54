"""What a `generate` run is asked to do: the LoRA stack (LoraSpec) and every option (GenerateConfig).

The dataclass fields carry their own help; `lora-studio generate` turns them into flags and TOML presets
load into them. A stack entry is typed FILE[:WEIGHT[:BLOCKS]]:

    >>> cfg = GenerateConfig(prompt="a fox", loras=["fox.safetensors:0.8:OUTALL", "snow.safetensors"])
    >>> [(s.path.name, s.weight, s.block_weights) for s in cfg.stack()]
    [('fox.safetensors', 0.8, 'OUTALL'), ('snow.safetensors', 1.0, None)]
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Literal

from studio.core.errors import ConfigError
from studio.core.lora_ref import parse_lora_ref
from studio.core.options import check_fields, option
from studio.core.samplers import scheduler_name

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
        """Read FILE[:WEIGHT[:BLOCKS]] as typed on the command line (studio.core.lora_ref).

        >>> LoraSpec.parse("style.safetensors:0.8:OUTALL")
        LoraSpec(path=PosixPath('style.safetensors'), weight=0.8, block_weights='OUTALL', sha256=None)
        >>> LoraSpec.parse("C:/loras/a.safetensors:0.5").weight
        0.5
        """
        ref = parse_lora_ref(text)
        return cls(ref.path, ref.weight, ref.blocks)


@dataclass
class Region:
    """A box of the image with its own prompt and, optionally, its own LoRA (regional generation).

    Typed X0,Y0,X1,Y1:PROMPT[:FILE[:WEIGHT]]: corners as fractions of the image (0-1) or in pixels (any
    value above 1); the prompt cannot contain ':'.

    >>> r = Region.parse("0,0,0.5,1:a photo of sks dog:dog.safetensors:0.9")
    >>> r.box, r.prompt, r.lora.path.name, r.lora.weight
    ((0.0, 0.0, 0.5, 1.0), 'a photo of sks dog', 'dog.safetensors', 0.9)
    >>> Region.parse("0,0,256,512:a cat").fractions(512, 512)
    (0.0, 0.0, 0.5, 1.0)
    """

    box: tuple[float, float, float, float]
    prompt: str
    lora: LoraSpec | None = None

    @classmethod
    def parse(cls, text: str) -> Region:
        corners, _, rest = str(text).partition(":")
        prompt, _, lora = rest.partition(":")
        try:
            box = tuple(float(v) for v in corners.split(","))
        except ValueError:
            box = ()
        if len(box) != 4 or not prompt.strip():
            raise ConfigError(
                f"cannot read region {text!r}: type X0,Y0,X1,Y1:PROMPT[:FILE[:WEIGHT]], e.g. "
                "'0,0,0.5,1:a photo of sks dog:dog.safetensors:0.9' (corners in 0-1 or in pixels)"
            )
        spec = LoraSpec.parse(lora) if lora.strip() else None
        if spec is not None and spec.block_weights is not None:
            raise ConfigError(f"region {text!r}: a region's LoRA takes FILE[:WEIGHT], without block weights")
        return cls(box, prompt.strip(), spec)  # type: ignore[arg-type]

    def fractions(self, width: int, height: int) -> tuple[float, float, float, float]:
        """The box as fractions of a width x height image; a clear error when it is empty or outside."""
        x0, y0, x1, y1 = self.box
        if max(self.box) > 1:
            x0, x1, y0, y1 = x0 / width, x1 / width, y0 / height, y1 / height
        if not (0 <= x0 < x1 <= 1 and 0 <= y0 < y1 <= 1):
            raise ConfigError(
                f"region {self.text()!r} is empty or outside the {width}x{height} image: corners go "
                "X0,Y0,X1,Y1 with X0 < X1 and Y0 < Y1, as fractions (0-1) or pixels"
            )
        return x0, y0, x1, y1

    def text(self) -> str:
        box = ",".join(f"{v:g}" for v in self.box)
        lora = f":{self.lora.path}:{self.lora.weight:g}" if self.lora else ""
        return f"{box}:{self.prompt}{lora}"


def _as_region(value) -> Region:
    if isinstance(value, Region):
        return value
    if isinstance(value, str):
        return Region.parse(value)
    if isinstance(value, Mapping) and {"box", "prompt"} <= set(value):
        lora = value.get("lora")
        return Region(tuple(value["box"]), value["prompt"], _as_spec(lora) if lora else None)
    raise ConfigError(f"cannot read {value!r} as a region: give X0,Y0,X1,Y1:PROMPT[:FILE[:WEIGHT]]")


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

    prompt: str = option("", "what to draw")
    negative_prompt: str = option("", "what to keep out of the image")
    model: str | None = option(
        None, "base model: diffusers folder or single-file .safetensors (default: built-in demo)"
    )
    loras: list[LoraSpec] = option([], "the LoRA stack: FILE[:WEIGHT[:BLOCKS]], repeatable")
    b_lora_content: str | None = option(None, "B-LoRA (SDXL) whose content block to use: FILE[:WEIGHT]")
    b_lora_style: str | None = option(None, "B-LoRA (SDXL) whose style block to use: FILE[:WEIGHT]")
    mode: Mode = option(
        "merge",
        "merge: all LoRAs at once; switch: one at a time, every tau steps; composite: "
        "each LoRA's guided prediction averaged every step",
    )
    tau: int = option(5, "switch mode: steps before the next LoRA takes over", min=1, max=1000)
    composite_batched: bool = option(
        True,
        "composite mode: all LoRAs in one batched UNet call (off: one call per LoRA, slower, less memory)",
    )
    scheduler: str = option(
        "DPM++ 2M Karras", "Euler, Euler a, DPM++ 2M, DPM++ 2M Karras, DPM++ 2M SDE Karras, DDIM, UniPC"
    )
    steps: int = option(20, "denoising steps", min=1, max=1000)
    cfg: float = option(7.0, "classifier-free guidance scale (1 = off)", min=0.0, max=100.0)
    seed: int = option(-1, "seed of the first image (-1: random); image i uses seed+i", min=-1, max=2**32 - 1)
    width: int | None = option(None, "pixels, multiple of 8 (default: the model's)", min=8, max=8192)
    height: int | None = option(None, "pixels, multiple of 8 (default: the model's)", min=8, max=8192)
    batch_count: int = option(1, "number of images, one after the other", min=1, max=1000)
    clip_skip: int = option(1, "A1111 clip skip: 1 = last text-encoder layer, 2 = one before", min=1, max=12)
    out: Path = option(Path("outputs"), "folder for the PNG files")
    device: str = option("auto", "auto, cpu, cuda, cuda:N or mps")
    dtype: Literal["auto", "fp32", "fp16", "bf16"] = option(
        "auto", "auto: bf16/fp16 on a GPU, fp32 on the CPU"
    )
    fuse: Literal["auto", "on", "off"] = option(
        "auto", "merge LoRAs into the weights for base speed; auto: on a GPU, while the stack stays"
    )
    compile: bool = option(False, "torch.compile the UNet (merge mode; GPU)")
    allow_pickle: bool = option(False, "also load .ckpt/.pt/.bin files (they can run code)")
    expect_model_hash: str | None = option(None, "refuse a base model with another hash (set by --from)")
    regions: list[Region] = option(
        [], "regional prompts: X0,Y0,X1,Y1:PROMPT[:FILE[:WEIGHT]], repeatable; the prompt covers the rest"
    )
    region_base: float = option(
        0.2, "regions: share of the global prompt's prediction kept inside each region", min=0.0, max=1.0
    )
    region_mode: Literal["mask", "area"] = option(
        "mask",
        "regions: mask = each region's prompt sees the whole picture, kept inside its box (Regional Prompter's "
        "latent mode); area = each box is drawn as a picture of its own (ComfyUI's Conditioning (Set Area))",
    )

    def __post_init__(self) -> None:
        self.loras = [_as_spec(v) for v in (self.loras or [])]
        self.regions = [_as_region(v) for v in (self.regions or [])]
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

    def check(self) -> None:
        """Refuse values that cannot work (bounds are on the fields), before anything is loaded."""
        check_fields(self)
        scheduler_name(self.scheduler)
        for name in ("width", "height"):
            value = getattr(self, name)
            if value is not None and value % 8:
                raise ConfigError(f"{name} must be a positive multiple of 8; got {value}")
        if self.mode != "merge" and not self.stack():
            raise ConfigError(
                f"mode {self.mode!r} composes several LoRAs but the stack is empty; add --lora FILE"
            )
        if self.regions and self.mode != "merge":
            raise ConfigError(
                f"regions work with mode 'merge' (each region adds its LoRA to the stack); got {self.mode!r}"
            )
        for region in self.regions:  # boxes in pixels are checked against the image size when it is known
            if max(region.box) <= 1:
                region.fractions(1, 1)
        if self.compile and self.mode != "merge":
            raise ConfigError(
                "compile works with mode 'merge' only (switch and composite change the graph per step)"
            )


def config_from_record(record: dict, **overrides) -> GenerateConfig:
    """The GenerateConfig that reproduces the image a record (studio.generation.records.read_record) describes."""
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
        "regions": [_region_from_record(r) for r in record.get("regions", [])],
        "region_base": record.get("region_base", 0.2),
        "region_mode": record.get("region_mode", "mask"),
        **{k: record[k] for k in ("mode", "tau", "composite_batched", "scheduler", "steps", "cfg")},
        **{k: record[k] for k in ("width", "height", "clip_skip", "device", "dtype")},
    }


def _region_from_record(r: dict) -> Region:
    lora = r.get("lora")
    spec = LoraSpec(Path(lora["path"]), lora["weight"], None, lora["sha256"]) if lora else None
    return Region(tuple(r["box"]), r["prompt"], spec)
