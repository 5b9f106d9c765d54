"""Turning captions and images into what the UNet trains on: text embeddings and VAE latents, with caches.

Prompt encoding is written out here rather than taken from the pipelines' encode_prompt: under
`accelerate launch` the text encoders being trained are wrapped for gradient sync, and the pipeline would
call the unwrapped modules and skip that sync. The encoding itself is the pipelines' (SD1.5: last hidden
state, or the clip_skip-th last through the final layer norm; SDXL: both encoders' penultimate states
concatenated, pooled output of the second).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from diffusers.models.autoencoders.vae import DiagonalGaussianDistribution


@dataclass
class TextEmbedding:
    """Encoder hidden states (B, 77, D) and, for SDXL, pooled embeddings (B, D2)."""

    hidden: torch.Tensor
    pooled: torch.Tensor | None = None


def encode_prompts(
    captions: list[str], tokenizers: list, text_encoders: list, *, family: str, clip_skip: int = 1
) -> TextEmbedding:
    """Encode a batch of captions with the (possibly LoRA-wrapped) text encoders."""
    device = next(_unwrap(text_encoders[0]).parameters()).device
    if family == "sd15":
        ids = _tokenize(tokenizers[0], captions).to(device)
        out = text_encoders[0](ids, output_hidden_states=clip_skip > 1)
        if clip_skip <= 1:
            return TextEmbedding(out[0])
        hidden = out.hidden_states[-clip_skip]
        return TextEmbedding(_unwrap(text_encoders[0]).text_model.final_layer_norm(hidden))
    states, pooled = [], None
    for tokenizer, encoder in zip(tokenizers, text_encoders):
        out = encoder(_tokenize(tokenizer, captions).to(device), output_hidden_states=True)
        pooled = out[0]  # the last encoder is CLIPTextModelWithProjection: text_embeds
        states.append(out.hidden_states[-2])
    return TextEmbedding(torch.cat(states, dim=-1), pooled)


def _tokenize(tokenizer, captions: list[str]) -> torch.Tensor:
    return tokenizer(
        captions,
        padding="max_length",
        max_length=tokenizer.model_max_length,
        truncation=True,
        return_tensors="pt",
    ).input_ids


def _unwrap(module):
    return getattr(module, "module", module)


class TextCache:
    """Text embeddings for a batch of captions.

    With frozen text encoders each distinct caption is encoded once and kept (cache=True), or encoded without
    gradients every time (cache=False, e.g. with shuffled captions, which are rarely the same twice).
    With trained text encoders every batch is encoded with gradients.
    """

    def __init__(self, tokenizers: list, text_encoders: list, *, family: str, clip_skip: int, cache: bool,
                 trainable: bool):  # fmt: skip
        self.tokenizers, self.text_encoders = tokenizers, text_encoders
        self.family, self.clip_skip = family, clip_skip
        self.cache, self.trainable = cache and not trainable, trainable
        self.store: dict[str, TextEmbedding] = {}

    def _encode(self, captions: list[str]) -> TextEmbedding:
        return encode_prompts(captions, self.tokenizers, self.text_encoders, family=self.family,
                              clip_skip=self.clip_skip)  # fmt: skip

    def prefill(self, captions: list[str], batch: int = 16) -> None:
        """Encode every caption the run can ask for now, so the text encoders are not needed later."""
        todo = [c for c in dict.fromkeys(captions) if c not in self.store]
        for i in range(0, len(todo), batch):
            self(todo[i : i + batch])

    def __call__(self, captions: list[str]) -> TextEmbedding:
        if self.trainable:
            return self._encode(captions)
        if not self.cache:
            with torch.no_grad():
                return self._encode(captions)
        missing = [c for c in dict.fromkeys(captions) if c not in self.store]
        if missing:
            with torch.no_grad():
                emb = self._encode(missing)
            for i, caption in enumerate(missing):
                pooled = emb.pooled[i : i + 1] if emb.pooled is not None else None
                self.store[caption] = TextEmbedding(emb.hidden[i : i + 1], pooled)
        parts = [self.store[c] for c in captions]
        pooled = torch.cat([p.pooled for p in parts]) if parts[0].pooled is not None else None
        return TextEmbedding(torch.cat([p.hidden for p in parts]), pooled)


@torch.no_grad()
def encode_pixels(vae, pixels: torch.Tensor) -> torch.Tensor:
    """VAE posterior parameters (mean and log-variance, 2C channels) of a batch of [-1, 1] images."""
    param = next(vae.parameters())
    return vae.encode(pixels.to(param.device, param.dtype)).latent_dist.parameters.float()


def sample_latents(vae, parameters: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """Draw latents from cached posterior parameters and scale them the way the UNet expects."""
    z = DiagonalGaussianDistribution(parameters).sample(generator=generator)
    shift = getattr(vae.config, "shift_factor", None) or 0.0
    return (z - shift) * vae.config.scaling_factor
