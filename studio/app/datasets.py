"""Preparing a training folder: images plus one caption file each (name.png + name.txt), kohya-style.

    >>> report = import_images(["a.jpg", "b.png"], Path("work/datasets/dog"), caption="a photo of sks dog")
    >>> report.added, report.rejected          # doctest: +SKIP
    (['a.png', 'b.png'], [])

A file that is not a readable image is rejected with the reason and nothing else is lost: the good images
are still added. Images are re-saved as PNG (EXIF rotation applied) so the trainer reads one format; every
write is atomic.
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

from PIL import Image

from studio.core.errors import ConfigError, StudioError
from studio.core.images import image_files, load_image
from studio.core.io import atomic_write_text, write_png
from studio.demo.concepts import STYLE, SUBJECT


@dataclass
class ImportReport:
    """What an import did: files added (names in the dataset), files rejected (name, reason), captions
    taken from uploaded .txt files, and images already in the dataset (same pixels) left out."""

    added: list[str] = field(default_factory=list)
    rejected: list[tuple[str, str]] = field(default_factory=list)
    captions: int = 0
    duplicates: list[str] = field(default_factory=list)

    def summary(self) -> str:
        text = f"added {len(self.added)} image(s)"
        if self.captions:
            text += f", {self.captions} with their own caption file"
        if self.duplicates:
            text += f"; already in the dataset (same pixels), left out: {', '.join(self.duplicates)}"
        if self.rejected:
            text += f"; skipped {len(self.rejected)}: " + "; ".join(
                f"{n} ({why})" for n, why in self.rejected
            )
        return text


def import_images(
    files: Sequence[str | Path], dest: Path, caption: str = "", overwrite: bool = False
) -> ImportReport:
    """Copy readable images into `dest` as PNG with their captions: an uploaded name.txt beside name.png
    gives that image's caption, the others get `caption` (when given). An image whose pixels are already
    in the dataset is left out (content hash), whatever its name."""
    dest.mkdir(parents=True, exist_ok=True)
    report = ImportReport()
    texts = {Path(f).stem.lower(): Path(f) for f in files if Path(f).suffix.lower() == ".txt"}
    seen = {pixel_hash(load_image(p)): p.name for p in dataset_images(dest) if _readable(p)}
    for file in files:
        path = Path(file)
        if path.suffix.lower() == ".txt":
            continue
        try:
            image = load_image(path)
        except StudioError as exc:
            report.rejected.append((path.name, str(exc).split(": ", 1)[-1]))
            continue
        digest = pixel_hash(image)
        if digest in seen:
            report.duplicates.append(f"{path.name} (= {seen[digest]})")
            continue
        target = dest / f"{path.stem}.png"
        if target.exists() and not overwrite:
            target = _free_name(dest, path.stem)
        own = texts.get(path.stem.lower())
        text = _read_caption(own) if own is not None else caption
        report.captions += own is not None
        add_image(image, target, text)
        seen[digest] = target.name
        report.added.append(target.name)
    unpaired = sorted(set(texts) - {Path(f).stem.lower() for f in files if Path(f).suffix.lower() != ".txt"})
    report.rejected += [(texts[s].name, "no image of that name in this upload") for s in unpaired]
    return report


def pixel_hash(image: Image.Image) -> str:
    """What makes two images the same: their size and RGB pixels."""
    return hashlib.sha256(f"{image.size}".encode() + image.tobytes()).hexdigest()


def _readable(path: Path) -> bool:
    try:
        load_image(path)
        return True
    except StudioError:
        return False


def _read_caption(path: Path) -> str:
    try:
        return path.read_text(encoding="utf-8", errors="replace").strip()
    except OSError:
        return ""


def add_image(image: Image.Image, path: Path, caption: str = "") -> None:
    """Write one image as PNG at `path`, and its caption next to it when given (both atomically)."""
    write_png(image, path)
    if caption.strip():
        write_caption(path, caption)


def dataset_images(folder: Path) -> list[Path]:
    """The images of a dataset folder, sorted by name."""
    return image_files(folder) if folder.is_dir() else []


def write_caption(image: Path, caption: str) -> None:
    """Set the caption of one image of a dataset (name.txt next to it)."""
    atomic_write_text(image.with_suffix(".txt"), caption.strip() + "\n")


def read_caption(image: Path) -> str:
    text = image.with_suffix(".txt")
    return _read_caption(text) if text.is_file() else ""


def _free_name(folder: Path, stem: str) -> Path:
    for i in range(1, 10_000):
        candidate = folder / f"{stem}-{i}.png"
        if not candidate.exists():
            return candidate
    raise ConfigError(f"{folder}: too many images named {stem}-N.png")


# The demo world's training sets the page offers: label -> kind
DEMO_SETS = {
    f"subject: a {SUBJECT['colour']} {SUBJECT['shape']} ({SUBJECT['token']})": "subject",
    f"style: {STYLE}": "style",
    "world scenes (regularisation)": "scenes",
}


def write_demo_set(folder: Path, which: str, count: int) -> int:
    """Write `count` demo-world training images with captions into `folder`; returns how many."""
    from studio.demo.world import WORLD

    kind = DEMO_SETS.get(which)
    if kind == "subject":
        samples = WORLD.dreambooth_set(n=count, shape=SUBJECT["shape"], colour=SUBJECT["colour"])
    elif kind == "style":
        samples = WORLD.style_set(STYLE, n=count)
    elif kind == "scenes":
        samples = WORLD.scene_set(n=count)
    else:
        raise ConfigError(f"unknown demo set {which!r}; choose one of {', '.join(DEMO_SETS)}")
    folder.mkdir(parents=True, exist_ok=True)
    for i, sample in enumerate(samples):
        add_image(sample.image, folder / f"demo-{i:03d}.png", sample.caption)
    return len(samples)


# --------------------------------------------------------------------------------------------------
# looking through and editing a dataset


def bucket_options(resolution: int) -> dict[str, int]:
    """The bucket range the Train tab uses at `resolution` (small ones for the demo models' 64 px)."""
    if resolution < 256:
        return {"step": 64, "min_reso": 64, "max_reso": 256}
    return {"step": 64, "min_reso": 256, "max_reso": max(1024, resolution)}


def dataset_rows(folder: Path, resolution: int) -> list[list]:
    """[file, caption, "W x H", bucket "W x H"] per image, the bucket the trainer would give it."""
    import math

    from studio.core.images import image_size
    from trainers.data import make_buckets

    buckets = make_buckets(resolution, **bucket_options(resolution))
    rows = []
    for path in dataset_images(folder):
        try:
            w, h = image_size(path)
        except StudioError:
            rows.append([path.name, read_caption(path), "unreadable", "-"])
            continue
        bw, bh = min(buckets, key=lambda b: abs(math.log(b[0] / b[1]) - math.log(w / h)))
        rows.append([path.name, read_caption(path), f"{w} x {h}", f"{bw} x {bh}"])
    return rows


def save_captions(folder: Path, captions: dict[str, str]) -> int:
    """Write the captions that changed ({image file name: caption}); returns how many were written."""
    changed = 0
    for name, caption in captions.items():
        image = _image_in(folder, name)
        if read_caption(image) != str(caption).strip():
            write_caption(image, str(caption))
            changed += 1
    return changed


def replace_in_captions(folder: Path, find: str, replace: str) -> int:
    """Replace `find` by `replace` in every caption; returns how many captions changed."""
    if not find:
        raise ConfigError("find: give the text to replace")
    return save_captions(
        folder, {p.name: read_caption(p).replace(find, replace) for p in dataset_images(folder)}
    )


def prepend_trigger(folder: Path, trigger: str) -> int:
    """Put `trigger` first in every caption that does not start with it; returns how many changed."""
    trigger = trigger.strip().rstrip(",")
    if not trigger:
        raise ConfigError("trigger word: give the word to put first, e.g. sks")
    captions = {}
    for image in dataset_images(folder):
        caption = read_caption(image)
        if not caption.startswith(trigger):
            captions[image.name] = f"{trigger}, {caption}" if caption else trigger
    return save_captions(folder, captions)


def delete_images(folder: Path, names: Sequence[str], trash: Path) -> list[str]:
    """Move images (and their captions) into `trash`; returns their names."""
    import shutil
    import time

    target = trash / f"{time.strftime('%Y%m%d-%H%M%S')}-{folder.name}-images"
    moved = []
    for name in names:
        image = _image_in(folder, name)
        target.mkdir(parents=True, exist_ok=True)
        for path in (image, image.with_suffix(".txt")):
            if path.is_file():
                shutil.move(str(path), str(target / path.name))
        moved.append(name)
    return moved


def _image_in(folder: Path, name: str) -> Path:
    image = folder / Path(str(name)).name
    if image.parent != folder or not image.is_file():
        raise ConfigError(f"no image {name!r} in dataset {folder.name!r}")
    return image
