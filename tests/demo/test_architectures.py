"""The demo architectures: the 128 px world's text encoders are wide enough for several orthogonal concepts,
and every text encoder's output fits its UNet (SDXL's pooled embedding and size conditioning included)."""

from __future__ import annotations

import pytest
import torch

from studio.demo.architectures import SDXL_TIME_EMBED, build_text_encoders, build_unet


@pytest.mark.parametrize("family", ["sd15", "sdxl"])
@pytest.mark.parametrize("size, width", [(64, 32), (128, 128)])
def test_text_encoders_feed_their_unet(family, size, width):
    torch.manual_seed(0)
    unet, encoders = build_unet(family, size), build_text_encoders(family, size)
    assert [te.config.hidden_size for te in encoders] == [width] * len(encoders)
    ids = torch.randint(0, 49408, (1, 77))
    with torch.no_grad():
        outs = [te(ids, output_hidden_states=True) for te in encoders]
        states = torch.cat([o.hidden_states[-2] for o in outs], dim=-1)
        extra = {}
        if family == "sdxl":
            time_ids = torch.tensor([[size, size, 0, 0, size, size]], dtype=torch.float32)
            extra = {"added_cond_kwargs": {"text_embeds": outs[1].text_embeds, "time_ids": time_ids}}
            assert unet.config.projection_class_embeddings_input_dim == 6 * SDXL_TIME_EMBED + width
        latents = torch.randn(1, 4, size // 8, size // 8)
        noise = unet(latents, torch.tensor([500]), encoder_hidden_states=states, **extra).sample
    assert noise.shape == latents.shape and torch.isfinite(noise).all()
