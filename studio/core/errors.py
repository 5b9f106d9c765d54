"""Errors the studio raises for bad input.

Every error a user can cause is a StudioError whose message names the file (or value) and says what to do.
The CLI prints the message alone (no traceback); the UI shows it in the job's log.
"""

from __future__ import annotations


class StudioError(Exception):
    """A problem with the user's input or environment, with a message meant for the user."""


class BadFileError(StudioError):
    """A file that cannot be read: missing, truncated, not safetensors, malformed header, pickle refused."""


class FamilyMismatchError(StudioError):
    """A LoRA or checkpoint made for another model family (e.g. an SD1.5 LoRA given to an SDXL model)."""


class KeyMismatchError(StudioError):
    """A LoRA whose keys or shapes do not match the modules of the base model."""


class ConfigError(StudioError):
    """A bad option value: unknown preset, a block vector of the wrong length, a missing dataset folder..."""
