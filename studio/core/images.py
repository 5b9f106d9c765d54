"""Reading training and reference images: which files count as images, and opening them with clear errors.

>>> image = load_image(Path("dog/1.jpg"))  # doctest: +SKIP   (RGB, EXIF rotation applied)
"""

from __future__ import annotations

from pathlib import Path

from PIL import Image, ImageOps, UnidentifiedImageError

from studio.core.errors import BadFileError

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp", ".bmp")
# PIL raises these for files that are not images, are truncated, or lie about their size
_UNREADABLE = (UnidentifiedImageError, OSError, ValueError, SyntaxError, Image.DecompressionBombError)


def is_image_name(path: str | Path) -> bool:
    return Path(path).suffix.lower() in IMAGE_SUFFIXES


def image_files(folder: Path) -> list[Path]:
    """The image files of a folder, sorted by name."""
    return sorted(p for p in Path(folder).iterdir() if p.is_file() and is_image_name(p))


def load_image(path: Path) -> Image.Image:
    """Open an image fully (EXIF rotation applied, RGB); a BadFileError names a corrupt or unreadable file."""
    try:
        with Image.open(path) as img:
            img.load()  # decode it all: a truncated file fails here, not in the middle of training
            return ImageOps.exif_transpose(img).convert("RGB")
    except _UNREADABLE as exc:
        raise BadFileError(f"{path}: cannot read this image ({exc}). Replace or remove the file.") from None


def image_size(path: Path) -> tuple[int, int]:
    """(width, height) as the image is shown (EXIF rotation counted), read from the header only."""
    try:
        with Image.open(path) as img:
            w, h = img.size
            if img.getexif().get(0x0112) in (5, 6, 7, 8):  # rotated by 90 degrees in EXIF
                w, h = h, w
            return w, h
    except _UNREADABLE as exc:
        raise BadFileError(f"{path}: cannot read this image ({exc}). Replace or remove the file.") from None


def read_caption(image: Path, extension: str = ".txt") -> str:
    """The caption file next to an image (name.txt), whitespace collapsed; "" when there is none."""
    path = image.with_suffix(extension)
    if not path.is_file():
        return ""
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise BadFileError(f"{path}: cannot read this caption file ({exc}); save it as UTF-8.") from None
    return " ".join(text.split())
