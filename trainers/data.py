"""Training data: folder scan with clear errors, captions, aspect-ratio buckets and a resumable batch order.

    >>> ds = scan_dataset("my_images", prompt="a photo of sks dog", use_captions=True)  # doctest: +SKIP
    >>> buckets = make_buckets(512, step=64, min_reso=256, max_reso=1024)
    >>> (512, 512) in buckets
    True

The batch order is a pure function of (seed, batch index), so a resumed run draws exactly the batches an
uninterrupted run would have drawn, without replaying the data.
"""

from __future__ import annotations

import math
import random
from collections import Counter
from dataclasses import dataclass, field, replace
from functools import lru_cache
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from studio.core.errors import BadFileError, ConfigError
from studio.core.images import IMAGE_SUFFIXES, image_files, load_image, read_caption


@dataclass
class Example:
    """One training image: where it is, its caption and its bucket (width, height)."""

    path: Path
    caption: str
    size: tuple[int, int]  # (width, height) of the file
    caption_from_file: bool = False
    bucket: tuple[int, int] = (0, 0)


@dataclass
class Dataset:
    """Images of one folder (instance/style images, or class images for prior preservation)."""

    folder: Path
    examples: list[Example]
    repeats: int = 1
    missing_captions: list[Path] = field(default_factory=list)
    skipped: list[tuple[Path, str]] = field(default_factory=list)  # unreadable images left out, and why

    def __len__(self) -> int:
        return len(self.examples)

    @property
    def images(self) -> list[Example]:
        """One example per image file (with several training resolutions an image has one per resolution)."""
        first: dict[Path, Example] = {}
        for ex in self.examples:
            first.setdefault(ex.path, ex)
        return list(first.values())


# --------------------------------------------------------------------------------------------------
# scanning


def scan_dataset(
    folder: str | Path,
    *,
    prompt: str,
    use_captions: bool,
    caption_extension: str = ".txt",
    repeats: int = 1,
    what: str = "data_dir",
    strict: bool = False,
) -> Dataset:
    """Find images and their captions; images without a caption file use `prompt`.

    Every image is decoded here, so all unreadable ones are found at once, before any model is loaded:
    they are left out and listed in `Dataset.skipped`, or with `strict` the scan stops naming them all.
    Raises ConfigError for a missing or empty folder, or an image with neither caption nor prompt.
    """
    folder = Path(folder).expanduser()
    if not str(folder) or not folder.is_dir():
        raise ConfigError(f"{what}: {folder} is not a folder. Point it at a folder of training images.")
    files = image_files(folder)
    if not files:
        found = sorted({p.suffix.lower() for p in folder.iterdir() if p.is_file()}) or ["no files"]
        raise ConfigError(
            f"{what}: {folder} has no images ({', '.join(IMAGE_SUFFIXES)}); it holds: {', '.join(found)}"
        )
    examples, missing, skipped = [], [], []
    for path in files:
        try:
            size = load_image(path).size  # decoded in full: a truncated file is found now, not at step 900
        except BadFileError as exc:
            skipped.append((path, str(exc).removeprefix(f"{path}: ")))
            continue
        caption, from_file = _caption_for(path, use_captions, caption_extension)
        if caption is None:
            missing.append(path)
            if not prompt:
                fix = "set prompt (used for images without captions)" if what == "data_dir" else "remove it"
                raise ConfigError(
                    f"{what}: {path} has no caption file ({path.with_suffix(caption_extension).name}) and no "
                    f"prompt is set. Add caption files or {fix}."
                )
            caption = prompt
        examples.append(Example(path, caption, size, from_file))
    if skipped and (strict or not examples):
        names = "; ".join(f"{p.name} ({why})" for p, why in skipped)
        lead = (
            f"none of the {len(files)} images" if not examples else f"{len(skipped)} of {len(files)} images"
        )
        raise BadFileError(
            f"{what}: {lead} in {folder} cannot be read: {names}. Replace or remove them"
            + ("." if not examples else ", or set strict_images = false to train without them.")
        )
    return Dataset(folder, examples, repeats, missing if use_captions else [], skipped)


def _caption_for(path: Path, use_captions: bool, extension: str) -> tuple[str | None, bool]:
    if not use_captions:
        return None, False
    text = read_caption(path, extension)
    return (text or None), bool(text)


# --------------------------------------------------------------------------------------------------
# captions


def process_caption(
    caption: str, rng: random.Random, *, dropout: float, shuffle: bool, keep_tokens: int, separator: str
) -> str:
    """Caption dropout (empty caption with probability `dropout`), then tag shuffle keeping the first N tags.

    >>> process_caption("sks, dog, grass, sun", random.Random(0), dropout=0, shuffle=True, keep_tokens=1,
    ...                 separator=",").startswith("sks, ")
    True
    """
    if dropout and rng.random() < dropout:
        return ""
    if not shuffle:
        return caption
    tags = [t.strip() for t in caption.split(separator) if t.strip()]
    fixed, rest = tags[:keep_tokens], tags[keep_tokens:]
    rng.shuffle(rest)
    return f"{separator} ".join(fixed + rest) if separator.strip() else " ".join(fixed + rest)


def tag_frequency(datasets: list[Dataset], separator: str = ",") -> dict[str, dict[str, int]]:
    """kohya's ss_tag_frequency: {"<repeats>_<folder>": {tag: count}}."""
    out = {}
    for ds in datasets:
        counts = Counter(t.strip() for ex in ds.images for t in ex.caption.split(separator) if t.strip())
        out[f"{ds.repeats}_{ds.folder.name}"] = dict(counts.most_common())
    return out


# --------------------------------------------------------------------------------------------------
# buckets


def make_buckets(resolution: int, *, step: int, min_reso: int, max_reso: int) -> list[tuple[int, int]]:
    """(width, height) buckets whose area is at most resolution^2, sides multiples of `step` (kohya's rule)."""
    if min_reso > resolution or max_reso < resolution:
        raise ConfigError(f"bucket range {min_reso}..{max_reso} must contain the resolution {resolution}")
    side = resolution // step * step
    if side < step:
        raise ConfigError(f"resolution {resolution} is smaller than bucket_step {step}")
    max_area = side * side
    buckets = {(side, side)}
    width = math.ceil(min_reso / step) * step
    while width <= max_reso:
        height = min(max_reso, (max_area // width) // step * step)
        if height >= min_reso:
            buckets.add((width, height))
            buckets.add((height, width))
        width += step
    return sorted(buckets)


def assign_buckets(dataset: Dataset, buckets: list[tuple[int, int]]) -> None:
    """Give each example the bucket with the nearest aspect ratio (in log space)."""
    ratios = np.log([w / h for w, h in buckets])
    for ex in dataset.examples:
        w, h = ex.size
        ex.bucket = buckets[int(np.abs(ratios - math.log(w / h)).argmin())]


def assign_resolutions(dataset: Dataset, bucket_sets: list[list[tuple[int, int]]]) -> None:
    """Multi-resolution training: each example once per bucket set (one set per resolution), in the set's
    nearest-aspect bucket. One set keeps the examples as they are.

    ai-toolkit and OneTrainer train at a list of resolutions the same way; kohya's sd-scripts has no such
    option (only buckets of one area), hence this small expansion before the latent cache.
    """
    expanded = []
    for buckets in bucket_sets:
        copies = Dataset(dataset.folder, [replace(ex) for ex in dataset.examples])
        assign_buckets(copies, buckets)
        expanded += copies.examples
    dataset.examples = expanded


def fit_to_bucket(
    img: Image.Image, bucket: tuple[int, int], crop: str, rng: random.Random | None = None
) -> tuple[torch.Tensor, tuple[int, int]]:
    """Resize to cover the bucket and crop (center/random), or resize to it exactly (crop="none").

    Returns pixels in [-1, 1] (C, H, W) and the crop's (top, left) in the resized image.
    """
    bw, bh = bucket
    if crop == "none":
        img = img.resize((bw, bh), Image.BICUBIC)
        top = left = 0
    else:
        scale = max(bw / img.width, bh / img.height)
        rw, rh = max(bw, round(img.width * scale)), max(bh, round(img.height * scale))
        img = img.resize((rw, rh), Image.BICUBIC)
        if crop == "random":
            rng = rng or random.Random(0)
            top, left = rng.randint(0, rh - bh), rng.randint(0, rw - bw)
        else:
            top, left = (rh - bh) // 2, (rw - bw) // 2
        img = img.crop((left, top, left + bw, top + bh))
    pixels = torch.from_numpy(np.asarray(img, dtype=np.float32) / 127.5 - 1.0).permute(2, 0, 1)
    return pixels.contiguous(), (top, left)


# --------------------------------------------------------------------------------------------------
# batch order


class BatchPlan:
    """Which examples form global batch number i, for any i, from the seed alone.

    Each epoch repeats every example `repeats` times, shuffles within each bucket, cuts same-bucket batches
    and shuffles the batch order. Batch i of an epoch never depends on earlier batches being drawn.

    >>> plan = BatchPlan([(64, 64)] * 5, batch_size=2, repeats=1, seed=0)
    >>> plan.batches_per_epoch, sorted(i for b in range(3) for i in plan.batch(b))
    (3, [0, 1, 2, 3, 4])
    """

    def __init__(self, buckets: list[tuple[int, int]], *, batch_size: int, repeats: int, seed: int):
        self.groups: dict[tuple[int, int], list[int]] = {}
        for index, bucket in enumerate(buckets):
            self.groups.setdefault(bucket, []).extend([index] * repeats)
        self.batch_size, self.seed = batch_size, seed
        self.batches_per_epoch = sum(math.ceil(len(g) / batch_size) for g in self.groups.values())

    def batch(self, global_index: int) -> list[int]:
        epoch, pos = divmod(global_index, self.batches_per_epoch)
        return self._epoch(epoch)[pos]

    @lru_cache(maxsize=2)  # noqa: B019 - a plan lives as long as its run
    def _epoch(self, epoch: int) -> list[list[int]]:
        rng = random.Random(self.seed * 1_000_003 + epoch)
        batches = []
        for bucket in sorted(self.groups):
            items = list(self.groups[bucket])
            rng.shuffle(items)
            batches += [items[i : i + self.batch_size] for i in range(0, len(items), self.batch_size)]
        rng.shuffle(batches)
        return batches
