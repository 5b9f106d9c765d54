"""Package faces that load their names on first use (PEP 562), so importing a light part of a package (its
options) does not import torch through the package's __init__.

    # merging/__init__.py
    __getattr__ = lazy_names("merging", {"run_merge": "merging.run", "MergeConfig": "merging.config"})
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from importlib import import_module


def lazy_names(package: str, homes: Mapping[str, str]) -> Callable[[str], object]:
    """A module __getattr__ that imports `homes[name]` and returns its `name` when first asked."""

    def __getattr__(name: str) -> object:
        if name not in homes:
            raise AttributeError(f"module {package!r} has no attribute {name!r}")
        return getattr(import_module(homes[name]), name)

    return __getattr__
