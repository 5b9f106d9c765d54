"""Token embeddings bundled in a LoRA file, the way A1111 and kohya's sd-scripts write them.

A LoRA trained with its trigger word's embedding ("pivotal tuning") carries that embedding beside its
modules, under `bundle_emb.<word>.<vector>`:

    bundle_emb.sks.string_to_param.*   (n, 768)     SD1.5: A1111's textual-inversion layout
    bundle_emb.sks.clip_l              (n, 768)     SDXL: one tensor per text encoder
    bundle_emb.sks.clip_g              (n, 1280)

n is the number of vectors the word stands for in a prompt. The studio holds them as
{word: {"clip_l": tensor, "clip_g": tensor}} (SD1.5: "clip_l" only). No library reads this part of a LoRA
file (diffusers' LoRA loaders drop it), so it is split off here; loading the vectors into a pipeline is
diffusers' textual-inversion loader's work (studio.core.pipeline_words).
"""

from __future__ import annotations

import torch

from studio.core.errors import BadFileError, StudioError
from studio.core.lora_checks import check_tensor_values
from studio.core.lora_keys import BUNDLE_ENCODERS, BUNDLE_PREFIX, BUNDLE_SD15_VECTOR, parse_bundle_key

Embeddings = dict[str, dict[str, torch.Tensor]]


def split_bundled(state: dict[str, torch.Tensor]) -> tuple[dict[str, torch.Tensor], Embeddings]:
    """(the state without its bundled embeddings, the embeddings), checked."""
    rest, found = {}, {}
    for key, tensor in state.items():
        if not key.startswith(BUNDLE_PREFIX):
            rest[key] = tensor
            continue
        word, encoder = parse_bundle_key(key)
        found.setdefault(word, {})[encoder] = _vectors(key, tensor)
    for word, vectors in found.items():
        counts = {t.shape[0] for t in vectors.values()}
        if len(counts) > 1:
            raise BadFileError(f"bundled embedding {word!r}: its text encoders' parts have different lengths")
    return rest, found


def _vectors(key: str, tensor: torch.Tensor) -> torch.Tensor:
    if tensor.dim() == 1:
        tensor = tensor[None]
    if tensor.dim() != 2 or not tensor.is_floating_point() or 0 in tensor.shape:
        raise BadFileError(
            f"{key}: an embedding is a (vectors, width) float tensor; got {tuple(tensor.shape)}"
        )
    check_tensor_values(key, "embedding", tensor)
    return tensor


def bundled_state(embeddings: Embeddings, family: str) -> dict[str, torch.Tensor]:
    """The keys that store `embeddings` in a LoRA file of `family` (A1111's layout)."""
    state = {}
    for word, vectors in embeddings.items():
        wanted = ("clip_l",) if family == "sd15" else BUNDLE_ENCODERS
        if set(vectors) != set(wanted):
            raise StudioError(
                f"embedding {word!r} has parts {sorted(vectors)}; a {family} LoRA needs {list(wanted)}"
            )
        for encoder, tensor in vectors.items():
            vector = BUNDLE_SD15_VECTOR if family == "sd15" else encoder
            state[f"{BUNDLE_PREFIX}{word}.{vector}"] = tensor.contiguous()
    return state


def union(sources: list[tuple[str, Embeddings]]) -> Embeddings:
    """The embeddings of several LoRAs together; a word two of them bundle with different vectors is refused
    (which to keep?); the same vectors twice (one file used twice in a stack) are one."""
    out: Embeddings = {}
    owner: dict[str, str] = {}
    for label, embeddings in sources:
        for word, vectors in embeddings.items():
            if word in out and _same(out[word], vectors):
                continue
            if word in out:
                raise StudioError(
                    f"{owner[word]} and {label} both bundle an embedding for {word!r}; use one of them, "
                    "or retrain one with another trigger word"
                )
            out[word], owner[word] = vectors, label
    return out


def _same(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
