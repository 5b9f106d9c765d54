"""Preparing a training folder: images plus one caption file each (name.png + name.txt), kohya-style.

    >>> report = import_images(["a.jpg", "b.png"], Path("work/datasets/dog"), caption="a photo of sks dog")
    >>> report.added, report.rejected          # doctest: +SKIP
    (['a.png', 'b.png'], [])

A file that is not a readable image is rejected with the reason and nothing else is lost: the good images
are still added. Images are re-saved as PNG (EXIF rotation applied) so the trainer reads one format; every
write is atomic.
"""

from __future__ import annotations

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
    """What an import did: files added (names in the dataset) and files rejected (name, reason)."""

    added: list[str] = field(default_factory=list)
    rejected: list[tuple[str, str]] = field(default_factory=list)

    def summary(self) -> str:
        text = f"added {len(self.added)} image(s)"
        if self.rejected:
            text += f"; skipped {len(self.rejected)}: " + "; ".join(
                f"{n} ({why})" for n, why in self.rejected
            )
        return text


def import_images(
    files: Sequence[str | Path], dest: Path, caption: str = "", overwrite: bool = False
) -> ImportReport:
    """Copy readable images into `dest` as PNG, each with `caption` in name.txt (when given)."""
    dest.mkdir(parents=True, exist_ok=True)
    report = ImportReport()
    for file in files:
        path = Path(file)
        try:
            image = load_image(path)
        except StudioError as exc:
            report.rejected.append((path.name, str(exc).split(": ", 1)[-1]))
            continue
        target = dest / f"{path.stem}.png"
        if target.exists() and not overwrite:
            target = _free_name(dest, path.stem)
        add_image(image, target, caption)
        report.added.append(target.name)
    return report


def add_image(image: Image.Image, path: Path, caption: str = "") -> None:
    """Write one image as PNG at `path`, and its caption next to it when given (both atomically)."""
    write_png(image, path)
    if caption.strip():
        write_caption(path, caption)


def dataset_images(folder: Path) -> list[Path]:
    """The images of a dataset folder, sorted by name."""
    return image_files(folder)


def write_caption(image: Path, caption: str) -> None:
    """Set the caption of one image of a dataset (name.txt next to it)."""
    atomic_write_text(image.with_suffix(".txt"), caption.strip() + "\n")


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
}


def write_demo_set(folder: Path, which: str, count: int) -> int:
    """Write `count` demo-world training images with captions into `folder`; returns how many."""
    from studio.demo.world import WORLD

    kind = DEMO_SETS.get(which)
    if kind == "subject":
        samples = WORLD.dreambooth_set(n=count, shape=SUBJECT["shape"], colour=SUBJECT["colour"])
    elif kind == "style":
        samples = WORLD.style_set(STYLE, n=count)
    else:
        raise ConfigError(f"unknown demo set {which!r}; choose one of {', '.join(DEMO_SETS)}")
    folder.mkdir(parents=True, exist_ok=True)
    for i, sample in enumerate(samples):
        add_image(sample.image, folder / f"demo-{i:03d}.png", sample.caption)
    return len(samples)
