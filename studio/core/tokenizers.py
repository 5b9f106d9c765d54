"""An offline CLIP tokenizer, the one SD1.5 and SDXL use, built from the vocabulary we ship.

Stable Diffusion's tokenizers are all OpenAI CLIP's byte-pair encoding (vocabulary 49408, 77 tokens).
The hub repositories (openai/clip-vit-large-patch14, the SDXL `tokenizer_2` folder) store it as
vocab.json + merges.txt; we rebuild exactly those files from CLIP's own merge list
(studio/core/assets/bpe_simple_vocab_16e6.txt.gz, MIT, see LICENSE-CLIP.txt) so that nothing is downloaded.

The only difference between the SD tokenizers is the padding token: "<|endoftext|>" for SD1.5 and for
SDXL's first text encoder, "!" for SDXL's second (OpenCLIP-G) text encoder.

>>> tok = clip_tokenizer()  # doctest: +SKIP
>>> tok("a photo of a dog").input_ids  # doctest: +SKIP
[49406, 320, 1125, 539, 320, 1929, 49407]
"""

from __future__ import annotations

import gzip
import hashlib
import json
import os
from functools import cache
from pathlib import Path

from transformers import CLIPTokenizer

from studio.core.errors import StudioError
from studio.core.io import atomic_write_text, cached_folder

ASSETS = Path(__file__).resolve().parent / "assets"
BPE_FILE = ASSETS / "bpe_simple_vocab_16e6.txt.gz"

BOS = "<|startoftext|>"
EOS = "<|endoftext|>"
SDXL_PAD_2 = "!"  # tokenizer_2 of SDXL pads with "!" (id 0), as in stabilityai/stable-diffusion-xl-base-1.0
MODEL_MAX_LENGTH = 77
VOCAB_SIZE = 49408
# CLIP keeps the first 49152 - 256 - 2 merges of the file (the rest were never trained).
NUM_MERGES = 49152 - 256 - 2
# Bump when the files written below change, so cached copies are rebuilt.
FILES_VERSION = "1"


def cache_root() -> Path:
    """Folder for files LoRA Studio generates (tokenizer files, materialised configs).

    $LORA_STUDIO_CACHE if set, else $XDG_CACHE_HOME/lora-studio, else ~/.cache/lora-studio.
    """
    if os.environ.get("LORA_STUDIO_CACHE"):
        return Path(os.environ["LORA_STUDIO_CACHE"]).expanduser()
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base).expanduser() / "lora-studio"


def _bytes_to_unicode() -> list[str]:
    """CLIP's printable stand-in for each of the 256 byte values, in CLIP's vocabulary order.

    Written out here (13 lines) because transformers keeps its copy in a private module whose location
    changed between versions; the order matters since it fixes the first 512 token ids.
    """
    printable = [
        *range(ord("!"), ord("~") + 1),
        *range(ord("¡"), ord("¬") + 1),
        *range(ord("®"), ord("ÿ") + 1),
    ]
    byte_values = printable[:]
    code_points = printable[:]
    extra = 0
    for b in range(256):
        if b not in byte_values:
            byte_values.append(b)
            code_points.append(256 + extra)
            extra += 1
    return [chr(c) for c in code_points]


@cache
def _vocab_and_merges() -> tuple[dict[str, int], tuple[str, ...]]:
    """The 49408-token vocabulary and the merge list, built the way OpenAI's CLIP builds them."""
    try:
        lines = gzip.decompress(BPE_FILE.read_bytes()).decode("utf-8").split("\n")
    except OSError as exc:
        raise StudioError(
            f"{BPE_FILE}: cannot read the CLIP vocabulary ({exc}). Reinstall LoRA Studio."
        ) from None
    merges = tuple(lines[1 : NUM_MERGES + 1])  # line 0 is the "#version" header
    symbols = _bytes_to_unicode()
    tokens = symbols + [s + "</w>" for s in symbols] + [m.replace(" ", "") for m in merges] + [BOS, EOS]
    vocab = {token: index for index, token in enumerate(tokens)}
    if len(vocab) != VOCAB_SIZE:
        raise StudioError(
            f"{BPE_FILE}: expected {VOCAB_SIZE} tokens, built {len(vocab)}. The file is damaged."
        )
    return vocab, merges


def _tokenizer_config(pad_token: str) -> dict:
    """tokenizer_config.json as in the SD hub repositories (minus the legacy AddedToken dicts)."""
    return {
        "tokenizer_class": "CLIPTokenizer",
        "model_max_length": MODEL_MAX_LENGTH,
        "bos_token": BOS,
        "eos_token": EOS,
        "unk_token": EOS,
        "pad_token": pad_token,
        "do_lower_case": True,
        "errors": "replace",
        "add_prefix_space": False,
        "clean_up_tokenization_spaces": False,
    }


def write_tokenizer_files(folder: str | Path, pad_token: str = EOS) -> Path:
    """Write vocab.json, merges.txt, tokenizer_config.json and special_tokens_map.json into `folder`.

    The result loads with `CLIPTokenizer.from_pretrained(folder)` and is what a diffusers pipeline
    folder holds under tokenizer/ (and tokenizer_2/ for SDXL, with pad_token="!").
    """
    folder = Path(folder)
    vocab, merges = _vocab_and_merges()
    atomic_write_text(folder / "vocab.json", json.dumps(vocab, ensure_ascii=False))
    atomic_write_text(folder / "merges.txt", "#version: 0.2\n" + "\n".join(merges) + "\n")
    atomic_write_text(folder / "tokenizer_config.json", json.dumps(_tokenizer_config(pad_token), indent=2))
    specials = {"bos_token": BOS, "eos_token": EOS, "unk_token": EOS, "pad_token": pad_token}
    atomic_write_text(folder / "special_tokens_map.json", json.dumps(specials, indent=2))
    return folder


def tokenizer_dir(pad_token: str = EOS) -> Path:
    """A cached folder with the tokenizer files for `pad_token`, written once and then reused.

    The folder is built in a temporary sibling and renamed into place, so concurrent processes never
    see a half-written folder. If the cache is not writable, a fresh temporary folder is used.
    """
    key = hashlib.sha256(f"{FILES_VERSION}|{pad_token}|{BPE_FILE.stat().st_size}".encode()).hexdigest()[:16]
    final = cache_root() / "tokenizer" / key
    return cached_folder(
        final, "special_tokens_map.json", lambda folder: write_tokenizer_files(folder, pad_token)
    )


def clip_tokenizer(pad_token: str = EOS) -> CLIPTokenizer:
    """The CLIP tokenizer of SD1.5 / SDXL (pad_token="!" gives SDXL's tokenizer_2), loaded offline."""
    return CLIPTokenizer.from_pretrained(str(tokenizer_dir(pad_token)), local_files_only=True)
