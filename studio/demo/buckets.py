"""Size buckets for the demo base models: besides the world's square pictures, one-shape pictures of other
sizes and aspects (64 x 64, 64 x 128, 128 x 64 in the 128 px world), each training step drawn from one bucket.

Real checkpoints are trained on many sizes and aspects (SDXL's aspect buckets, kohya's bucketing), which is
what lets a region's box be drawn as a picture of its own (ComfyUI's Conditioning (Set Area), the regional
sampler's area mode). A model trained on one size draws smears at others; these buckets give the demo
models the same room.

    >>> parse_buckets("128x128,64x128")
    [(128, 128), (64, 128)]
"""

from __future__ import annotations

from studio.core.errors import ConfigError

Bucket = tuple[int, int]  # (width, height) in pixels


def parse_buckets(text: str) -> list[Bucket]:
    """ "128x128,64x128" -> [(128, 128), (64, 128)]; sides must be multiples of 8 (one latent pixel)."""
    buckets = []
    for item in filter(None, (part.strip() for part in text.split(","))):
        try:
            width, height = (int(v) for v in item.lower().split("x"))
        except ValueError:
            raise ConfigError(f"--buckets: {item!r} is not WIDTHxHEIGHT; write e.g. 128x128,64x128") from None
        if width <= 0 or height <= 0 or width % 8 or height % 8:
            raise ConfigError(f"--buckets: {item!r}: each side must be a positive multiple of 8 pixels")
        buckets.append((width, height))
    return buckets


def bucket_name(bucket: Bucket) -> str:
    return f"{bucket[0]}x{bucket[1]}"
