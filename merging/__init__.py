"""The merge workspace: one entry point, run_merge(config), for `lora-studio merge` and the page's Merge tab.

    >>> from merging import MergeConfig, run_merge  # doctest: +SKIP

The names are loaded on first use (PEP 562), so reading a merge's options (merging.config) costs no torch
import: `lora-studio --help` stays fast.
"""

from studio.core.lazy import lazy_names

_HOMES = {
    "MergeConfig": "merging.config", "MergeResult": "merging.run", "Merged": "merging.run",
    "merge_factors": "merging.run", "read_mergers": "merging.output", "run_merge": "merging.run",
}  # fmt: skip
__all__ = sorted(_HOMES)

__getattr__ = lazy_names("merging", _HOMES)
