"""Alphas that PEFT-style files keep outside their tensors: adapter_config.json, diffusers' metadata.

A PEFT `save_pretrained` folder holds adapter_config.json (r, lora_alpha or alpha, rank_pattern,
alpha_pattern, use_rslora, peft_type) beside adapter_model.safetensors; diffusers' `save_lora_weights`
stores the same per component in the "lora_adapter_metadata" metadata entry ({"unet.lora_alpha": 8, ...}).
Without them a module's strength is unknown and tools read alpha = rank; with them this module gives each
module the alpha that makes alpha / rank the scale PEFT itself applies.

Pure Python: `inspect` reads these without torch.

    >>> config = AdapterConfig.from_json({"r": 4, "lora_alpha": 8, "alpha_pattern": {"to_k": 2}})
    >>> config.alpha("unet.mid_block.attentions.0.transformer_blocks.0.attn1.to_q", rank=4)
    8.0
    >>> config.alpha("unet.mid_block.attentions.0.transformer_blocks.0.attn1.to_k", rank=4)
    2.0
"""

from __future__ import annotations

import json
import math
import re
from dataclasses import dataclass, field
from pathlib import Path

from studio.core.errors import BadFileError
from studio.core.lora_checks import metadata_number

CONFIG_NAME, WEIGHTS_NAME = "adapter_config.json", "adapter_model.safetensors"


@dataclass
class AdapterConfig:
    """The alpha rules of one adapter (one component's, for diffusers' metadata)."""

    alpha_value: float | None = None  # lora_alpha (LoRA) or alpha (LoHa / LoKr)
    alpha_pattern: dict[str, float] = field(default_factory=dict)
    rslora: bool = False  # scale alpha / sqrt(r) instead of alpha / r
    where: str = "adapter_config.json"

    @classmethod
    def from_json(cls, data: object, where: str = CONFIG_NAME) -> AdapterConfig:
        if not isinstance(data, dict):
            raise BadFileError(f"{where} is not a JSON object.")
        key = "lora_alpha" if "lora_alpha" in data else "alpha"
        value = data.get(key)
        pattern = data.get("alpha_pattern") or {}
        if not isinstance(pattern, dict):
            raise BadFileError(f"{where}: alpha_pattern is not a table of alphas.")
        for p in pattern:
            _compile(str(p), where)
        return cls(
            None if value is None else metadata_number(value, f"{where}: {key}"),
            {str(k): metadata_number(v, f"{where}: alpha_pattern[{k!r}]") for k, v in pattern.items()},
            bool(data.get("use_rslora", False)),
            where,
        )

    def alpha(self, path: str, rank: int | None) -> float | None:
        """The alpha to store for module `path` (canonical) so that alpha / rank is PEFT's scale."""
        module = path.partition(".")[2]
        value = self.alpha_value
        for pattern, alpha in self.alpha_pattern.items():
            if _compile(pattern, self.where).match(module):
                value = alpha
                break
        if value is None or rank is None:
            return value
        return value * math.sqrt(rank) if self.rslora else value


def _compile(pattern: str, where: str) -> re.Pattern:
    """peft matches a pattern key at the end of a module name, on a "." boundary."""
    try:
        return re.compile(rf"(.*\.)?({pattern})$")
    except (re.error, RecursionError):
        raise BadFileError(f"{where}: {pattern!r} is not a valid module pattern.") from None


def metadata_configs(metadata: dict[str, str]) -> dict[str, AdapterConfig]:
    """Per component ("unet", "text_encoder", ...), the alphas diffusers keeps in "lora_adapter_metadata"."""
    raw = metadata.get("lora_adapter_metadata")
    if not raw:
        return {}
    try:
        meta = json.loads(raw)
    except (json.JSONDecodeError, RecursionError):
        raise BadFileError("malformed lora_adapter_metadata JSON in the file's metadata.") from None
    if not isinstance(meta, dict):
        raise BadFileError("lora_adapter_metadata in the file's metadata is not a JSON object.")
    per_component: dict[str, dict] = {}
    for key, value in meta.items():
        component, _, name = str(key).partition(".")
        per_component.setdefault(component, {})[name] = value
    return {c: AdapterConfig.from_json(v, f"lora_adapter_metadata ({c})") for c, v in per_component.items()}


def folder_config(folder: Path) -> AdapterConfig:
    """The AdapterConfig of a PEFT save_pretrained folder."""
    path = folder / CONFIG_NAME
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError, RecursionError) as exc:
        raise BadFileError(
            f"{path}: cannot read it ({type(exc).__name__}); the adapter folder is damaged."
        ) from None
    return AdapterConfig.from_json(data, str(path))


def is_adapter_folder(path: Path) -> bool:
    """True for a PEFT save_pretrained folder (adapter_config.json + adapter_model.safetensors)."""
    return path.is_dir() and (path / CONFIG_NAME).is_file()
