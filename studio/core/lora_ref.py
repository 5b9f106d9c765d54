"""A LoRA as users type it on a command line or in a form: FILE[:WEIGHT[:BLOCKS]].

One parser for generation stacks and merge sources alike. The file part may itself hold ':' (a Windows
path such as C:/loras/a.safetensors), so the split is made where the file part names an existing file or
ends in a LoRA suffix.

    >>> parse_lora_ref("style.safetensors:0.8:OUTALL")
    LoraRef(path=PosixPath('style.safetensors'), weight=0.8, blocks='OUTALL')
    >>> parse_lora_ref("C:/loras/a.safetensors:0.5").weight
    0.5
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from studio.core.errors import ConfigError
from studio.core.io import PICKLE_SUFFIXES

LORA_SUFFIXES = (".safetensors", *PICKLE_SUFFIXES)
FORM = "FILE[:WEIGHT[:BLOCKS]]"


@dataclass(frozen=True)
class LoraRef:
    """One LoRA file with the weight and block weights (preset name or vector, as typed) given to it."""

    path: Path
    weight: float = 1.0
    blocks: str | None = None


def parse_lora_ref(text: str) -> LoraRef:
    """Split "FILE[:WEIGHT[:BLOCKS]]" (see the module docstring); a ConfigError says what is wrong."""
    text = str(text).strip()
    parts = text.split(":")
    for n in range(len(parts), 0, -1):
        head, rest = ":".join(parts[:n]), parts[n:]
        if len(rest) <= 2 and (Path(head).exists() or head.lower().endswith(LORA_SUFFIXES)):
            break
    else:
        head, rest = parts[0], parts[1:]
    if not head.strip():
        raise ConfigError(f"LoRA {text!r}: no file name; write {FORM}, e.g. style.safetensors:0.8:OUTALL")
    if len(rest) > 2:
        raise ConfigError(f"LoRA {text!r}: too many ':' parts; write {FORM}")
    weight = 1.0
    if rest and rest[0].strip():
        try:
            weight = float(rest[0])
        except ValueError:
            raise ConfigError(
                f"LoRA {text!r}: weight {rest[0]!r} is not a number; write {FORM}, "
                "e.g. style.safetensors:0.8:OUTALL"
            ) from None
    blocks = rest[1].strip() if len(rest) > 1 and rest[1].strip() else None
    return LoraRef(Path(head), weight, blocks)
