"""Generation parameters inside PNG files: A1111's "parameters" text and a JSON record to regenerate from.

Every image LoRA Studio writes carries two tEXt chunks:

- "parameters": the A1111 text that A1111, Forge, ComfyUI, Civitai and image browsers read:

      a red fox in the snow <lora:fox_style:0.8>
      Negative prompt: blurry
      Steps: 20, Sampler: DPM++ 2M, Schedule type: Karras, CFG scale: 7, Seed: 42, Size: 512x512, ...

- "lora_studio": a JSON record with everything needed to make the same pixels again (base model path and
  hash, every LoRA's path, sha256, weight and resolved block weights, mode, tau, scheduler, steps, cfg,
  seed, size, device, dtype...). `lora-studio generate --from image.png` reads it back.

Images are saved atomically under a fresh name: "00012-1234.png" (next free number, then the seed);
an existing file is never replaced.
"""

from __future__ import annotations

import json
import os
import re
from pathlib import Path
from typing import Any

from PIL import Image, UnidentifiedImageError

from studio.core.errors import BadFileError, StudioError
from studio.core.io import atomic_write_bytes, png_bytes

RECORD_KEY = "lora_studio"
RECORD_FORMAT = "lora-studio/generate"
RECORD_VERSION = 1
PARAMETERS_KEY = "parameters"


def parameters_text(record: dict[str, Any]) -> str:
    """A1111-style "parameters" text for a generation record.

    >>> print(parameters_text({"prompt": "a cat", "negative_prompt": "", "steps": 4, "scheduler": "Euler a",
    ...     "cfg": 7.0, "seed": 3, "width": 64, "height": 64, "model": {"path": "m", "hash": "ab" * 32},
    ...     "loras": [], "mode": "merge", "clip_skip": 1}))
    a cat
    Steps: 4, Sampler: Euler a, CFG scale: 7, Seed: 3, Size: 64x64, Model hash: ababababab, Model: m
    """
    tags = "".join(f" {_lora_tag(lora)}" for lora in record["loras"])
    lines = [record["prompt"] + tags]
    if record.get("negative_prompt"):
        lines.append(f"Negative prompt: {record['negative_prompt']}")
    sampler, karras = re.subn(r"\s+Karras$", "", record["scheduler"])
    fields = [("Steps", record["steps"]), ("Sampler", sampler)]
    if karras:
        fields.append(("Schedule type", "Karras"))
    fields += [
        ("CFG scale", f"{record['cfg']:g}"),
        ("Seed", record["seed"]),
        ("Size", f"{record['width']}x{record['height']}"),
        ("Model hash", record["model"]["hash"][:10]),
        ("Model", Path(str(record["model"]["path"])).stem),
    ]
    if record.get("clip_skip", 1) > 1:
        fields.append(("Clip skip", record["clip_skip"]))
    if record["loras"]:
        hashes = ", ".join(f"{_lora_name(lora)}: {lora['sha256'][:12]}" for lora in record["loras"])
        fields.append(("Lora hashes", f'"{hashes}"'))
    if record["mode"] != "merge":
        fields.append(("LoRA mode", record["mode"]))
        if record["mode"] == "switch":
            fields.append(("LoRA tau", record["tau"]))
    if record.get("regions"):
        fields.append(("Regions", '"' + " | ".join(_region_text(r) for r in record["regions"]) + '"'))
        fields.append(("Region base", f"{record.get('region_base', 0.2):g}"))
        if record.get("region_mode", "mask") != "mask":
            fields.append(("Region mode", record["region_mode"]))
    if record.get("studio_version"):
        fields.append(("Version", f"lora-studio {record['studio_version']}"))
    lines.append(", ".join(f"{key}: {value}" for key, value in fields))
    return "\n".join(lines)


def _region_text(region: dict[str, Any]) -> str:
    box = ",".join(f"{v:g}" for v in region["box"])
    tag = f" {_lora_tag(region['lora'])}" if region.get("lora") else ""
    return f"{box}: {region['prompt']}{tag}".replace('"', "'")


def _lora_name(lora: dict[str, Any]) -> str:
    return Path(lora["path"]).stem


def _lora_tag(lora: dict[str, Any]) -> str:
    """<lora:name:weight> as A1111 users type it; block weights in the LoRA Block Weight extension's form."""
    tag = f"<lora:{_lora_name(lora)}:{lora['weight']:g}"
    if lora.get("block_weights_text"):
        tag += f":lbw={lora['block_weights_text']}"
    return tag + ">"


def save_png(image: Image.Image, record: dict[str, Any], out_dir: str | Path) -> Path:
    """Write `image` with its parameters into out_dir as the next free "NNNNN-SEED.png"; returns the path.

    The file appears complete or not at all (studio.core.io.atomic_write) and never replaces an existing
    file: the name is reserved with an exclusive create before the finished file is moved onto it.
    """
    out_dir = Path(out_dir)
    data = png_bytes(
        image, {PARAMETERS_KEY: parameters_text(record), RECORD_KEY: json.dumps(record, sort_keys=True)}
    )
    target = _reserve_name(out_dir, record["seed"])
    try:
        atomic_write_bytes(target, data)
    except StudioError:
        target.unlink(missing_ok=True)
        raise
    return target


def _reserve_name(out_dir: Path, seed: int) -> Path:
    """Create an empty "NNNNN-SEED.png" that no other writer holds (the next free number)."""
    try:
        out_dir.mkdir(parents=True, exist_ok=True)
        number = _next_number(out_dir)
        while True:
            target = out_dir / f"{number:05d}-{seed}.png"
            try:
                os.close(os.open(target, os.O_CREAT | os.O_EXCL | os.O_WRONLY))
                return target
            except FileExistsError:
                number += 1
    except OSError as exc:
        raise StudioError(f"could not write an image into {out_dir}: {exc.strerror or exc}.") from None


def _next_number(out_dir: Path) -> int:
    numbers = [int(m[1]) for p in out_dir.iterdir() if (m := re.match(r"^(\d{5,})-", p.name))]
    return max(numbers, default=-1) + 1


def read_record(path: str | Path) -> dict[str, Any]:
    """The LoRA Studio record of a PNG written by `save_png`, with a clear error for any other image."""
    path = Path(path)
    if not path.is_file():
        raise BadFileError(f"{path}: no such image.")
    try:
        with Image.open(path) as image:
            chunks = dict(getattr(image, "text", None) or image.info)
    except (UnidentifiedImageError, OSError) as exc:
        raise BadFileError(f"{path}: not a readable image ({exc}).") from None
    raw = chunks.get(RECORD_KEY)
    if raw is None:
        if PARAMETERS_KEY in chunks:
            raise BadFileError(
                f"{path}: this image has A1111-style parameters but no LoRA Studio record, so the exact "
                "base model and LoRA files behind it are unknown. Only images made by LoRA Studio can be "
                "regenerated with --from; set the options by hand instead."
            )
        raise BadFileError(
            f"{path}: this image carries no generation parameters (it was not made by LoRA Studio, or "
            "its metadata was stripped). --from needs a PNG written by `lora-studio generate`."
        )
    try:
        record = json.loads(raw)
    except json.JSONDecodeError:
        raise BadFileError(f"{path}: its LoRA Studio record is damaged (not valid JSON).") from None
    if not isinstance(record, dict) or record.get("format") != RECORD_FORMAT:
        raise BadFileError(f"{path}: its {RECORD_KEY!r} chunk is not a LoRA Studio generation record.")
    if record.get("version", 0) > RECORD_VERSION:
        raise BadFileError(
            f"{path}: made by a newer LoRA Studio (record version {record['version']}); update to regenerate it."
        )
    return record
