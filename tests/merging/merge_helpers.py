"""Helpers for the merge tests: model outputs on fixed inputs, with LoRAs applied by plain arithmetic."""

from __future__ import annotations

import torch

from studio.core.lora_files import LoraSet
from studio.core.modules import apply_to_pipeline
from tests.probes import unet_output


def text_output(pipe) -> torch.Tensor:
    ids = pipe.tokenizer(["a photo of sks dog"], padding="max_length", max_length=77, return_tensors="pt")
    with torch.no_grad():
        return pipe.text_encoder(ids.input_ids)[0]


def outputs_with(pipe, loras: list[tuple[LoraSet, float, dict | None]]) -> tuple[torch.Tensor, torch.Tensor]:
    """(unet, text encoder) outputs with weight * delta of each LoRA added; the weights are restored after."""
    parts = [p for p in ("unet", "text_encoder", "text_encoder_2") if getattr(pipe, p, None) is not None]
    saved = {p: {k: v.clone() for k, v in getattr(pipe, p).state_dict().items()} for p in parts}
    try:
        for lora, weight, blocks in loras:
            apply_to_pipeline(lora, pipe, weight, blocks)
        return unet_output(pipe), text_output(pipe)
    finally:
        for p in parts:
            getattr(pipe, p).load_state_dict(saved[p])
