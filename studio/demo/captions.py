"""The demo text encoders' vocabulary: which token rows the shipped encoders keep, and captions as token ids."""

from __future__ import annotations

from collections.abc import Sequence

import torch

from studio.demo.world import World

# Words whose token rows are kept (randomly initialised) in the shipped text encoders although the base
# training never shows them: held-out subjects and styles, and the usual DreamBooth / TI trigger words.
RESERVED_WORDS = (
    "sks",
    "ohwx",
    "zwx",
    "bnha",
    "photo",
    "of",
    "in",
    "the",
    "an",
    "with",
    "and",
    "made",
    "gold",
    "style",
    "left",  # the 128 px world's Pairs: "a red circle on the left and a blue star on the right"
    "right",
)


def keep_token_rows(
    text_encoders: Sequence[torch.nn.Module], tokenizers: Sequence, seed: int, world: World
) -> list[int]:
    """Zero the embedding rows of tokens the demo never uses, so shipped files are mostly zeros.

    Kept: every token of the world's vocabulary (held-out words too), RESERVED_WORDS and special tokens.
    Rows of unused tokens get no gradient, so they stay zero through training.
    """
    words = [w for values in world.attributes().values() for w in values]
    words += ["a", "on", "background", "shape", ",", *RESERVED_WORDS]
    keep: set[int] = set()
    for tok in tokenizers:
        keep.update(tok(" ".join(words)).input_ids)
        keep.add(tok.pad_token_id)
    rows = sorted(keep)
    gen = torch.Generator().manual_seed(seed)
    for te in text_encoders:
        emb = te.get_input_embeddings().weight
        with torch.no_grad():
            kept = torch.randn(len(rows), emb.shape[1], generator=gen) * 0.02
            emb.zero_()
            emb[rows] = kept
    return rows


class CaptionIds:
    """Token ids of captions, cached per text (the world has a few thousand distinct captions)."""

    def __init__(self, tokenizers: Sequence) -> None:
        self.tokenizers = tokenizers
        self.cache: dict[str, list[torch.Tensor]] = {}

    def __call__(self, captions: Sequence[str]) -> list[torch.Tensor]:
        """One (batch, 77) id tensor per tokenizer."""
        for text in set(captions) - set(self.cache):
            self.cache[text] = [
                tok(
                    text,
                    padding="max_length",
                    max_length=tok.model_max_length,
                    truncation=True,
                    return_tensors="pt",
                ).input_ids[0]
                for tok in self.tokenizers
            ]
        return [torch.stack([self.cache[c][i] for c in captions]) for i in range(len(self.tokenizers))]
