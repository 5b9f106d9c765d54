"""Token embeddings bundled in LoRA files, loaded into a pipeline while those LoRAs are used (by a
generation stack, or by a merge that runs the model on the sources' prompts).

A LoRA trained with its trigger word's embedding (studio.core.lora_embeddings) only works with that
embedding: the word must stand for the trained vectors in every prompt, as A1111 does with the embeddings a
LoRA bundles. Each word is added to every tokenizer as a whole-word token (add_word_tokens), its vectors to
every text encoder's table, named as diffusers' textual-inversion loader names them, so diffusers' unloader
takes them out again. While words are loaded, the pipelines' encode_prompt writes a word of n vectors as its
n tokens where the tokenizer reads the word (expand_words). This keeps the loaded words equal to those of the
current stack, unloading the others, so a LoRA taken out of the stack leaves the pipeline as it was.

    >>> with words_loaded(pipe, "sd15", {"sks": vectors}, {"sks": "dog.safetensors"}):  # doctest: +SKIP
    ...     pipe("a photo of sks")
"""

from __future__ import annotations

import re
from collections.abc import Iterator
from contextlib import contextmanager

import torch
from transformers import AddedToken

from studio.core.errors import ConfigError, StudioError
from studio.core.lora_embeddings import Embeddings


class PipelineWords:
    """The bundled embeddings loaded into one pipeline (a stack's, or a merge's sources')."""

    def __init__(self, pipe, family: str):
        self.pipe = pipe
        self.encoders = [("clip_l", pipe.tokenizer, pipe.text_encoder)]
        if family == "sdxl":
            self.encoders.append(("clip_g", pipe.tokenizer_2, pipe.text_encoder_2))
        self.loaded: dict[str, dict[str, torch.Tensor]] = {}  # word -> the vectors loaded for it

    def use(self, embeddings: Embeddings, labels: dict[str, str]) -> None:
        """Load exactly `embeddings` ({word: {encoder: vectors}}); `labels`: the file each word comes from."""
        for word in [w for w, v in self.loaded.items() if embeddings.get(w) is not v]:
            self._unload(word)
        for word, vectors in embeddings.items():
            if word not in self.loaded:
                self._load(word, vectors, labels[word])
        # diffusers' own expansion (TextualInversionLoaderMixin._maybe_convert_prompt) replaces the word inside
        # longer words too ("asks" -> "asks sks_1") and misses it in capitals, which the tokenizer reads as the
        # word; the pipeline's encode_prompt calls it through the instance, so ours stands in while words load
        if self.loaded:
            self.pipe._maybe_convert_prompt = self.expand
        else:
            self.pipe.__dict__.pop("_maybe_convert_prompt", None)

    def expand(self, prompt: str, tokenizer=None) -> str:
        """`prompt` with each loaded word of n vectors written as its n tokens, where the word stands alone."""
        return expand_words(prompt, {w: next(iter(v.values())).shape[0] for w, v in self.loaded.items()})

    def _load(self, word: str, vectors: dict[str, torch.Tensor], label: str) -> None:
        for encoder, tokenizer, text_encoder in self.encoders:
            width = text_encoder.get_input_embeddings().weight.shape[1]
            if encoder not in vectors or vectors[encoder].shape[1] != width:
                got = tuple(vectors[encoder].shape) if encoder in vectors else "none"
                raise StudioError(
                    f"{label}: its embedding for {word!r} does not fit this model's text encoder ({encoder}: "
                    f"{got}, the encoder takes {width} wide vectors); it was made for another base model"
                )
            if word in tokenizer.get_vocab():
                raise StudioError(
                    f"{label}: its embedding's word {word!r} is already a token of this model's tokenizer; "
                    "retrain it with another trigger word"
                )
        for encoder, tokenizer, text_encoder in self.encoders:
            rows = vectors[encoder]
            ids = add_word_tokens(tokenizer, text_encoder, vector_tokens(word, rows.shape[0]))
            table = text_encoder.get_input_embeddings().weight
            with torch.no_grad():
                table[ids] = rows.to(table.device, table.dtype)
        self.loaded[word] = vectors

    def _unload(self, word: str) -> None:
        n = next(iter(self.loaded.pop(word).values())).shape[0]
        for _, tokenizer, text_encoder in self.encoders:
            self.pipe.unload_textual_inversion(
                vector_tokens(word, n), tokenizer=tokenizer, text_encoder=text_encoder
            )


def word_alone(word: str) -> re.Pattern:
    """Where the tokenizers read a bundled word: standing alone, in any case (not inside "asks", nor in
    "sks_1"), as a whole-word token (add_word_tokens) matches."""
    return re.compile(rf"(?<!\w){re.escape(word)}(?!\w)", re.IGNORECASE)


def expand_words(prompt: str, words: dict[str, int]) -> str:
    """Each of `words` ({word: vectors}) written as its tokens ("sks" -> "sks sks_1") where it stands alone."""
    for word, n in words.items():
        if n > 1:
            tokens = " ".join(vector_tokens(word, n))
            prompt = word_alone(word).sub(lambda _, t=tokens: t, prompt)
    return prompt


def vector_tokens(word: str, n: int) -> list[str]:
    """The tokens of a word of n vectors, named as diffusers' textual-inversion loader names them (the
    pipelines' encode_prompt expands "sks" into "sks sks_1 ..." by these names)."""
    return [word] + [f"{word}_{i}" for i in range(1, n)]


def add_word_tokens(tokenizer, text_encoder, tokens: list[str]) -> list[int]:
    """Add `tokens` to the tokenizer, read only as whole words, and grow the encoder's table to match; their
    ids. Written here rather than with diffusers' textual-inversion loader because that one adds plain
    tokens, which the tokenizer also finds inside longer words ("a man asks" would read "a man a sks");
    A1111 reads an embedding's word only where it stands alone, and so does a single_word token."""
    start = len(tokenizer)
    tokenizer.add_tokens([AddedToken(token, single_word=True) for token in tokens])
    if len(tokenizer) != start + len(tokens):
        raise ConfigError(f"the words {', '.join(tokens)} must each be new and given once")
    # grown without transformers' mean resizing (a covariance of the whole table, for rows set at once)
    text_encoder.resize_token_embeddings(len(tokenizer), mean_resizing=False)
    return tokenizer.convert_tokens_to_ids(tokens)


@contextmanager
def words_loaded(pipe, family: str, embeddings: Embeddings, labels: dict[str, str]) -> Iterator[None]:
    """`embeddings` loaded into the pipeline for the block, and unloaded after it, whatever happens."""
    words = PipelineWords(pipe, family)
    try:
        words.use(embeddings, labels)
        yield
    finally:
        words.use({}, {})
