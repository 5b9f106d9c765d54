"""Probes of model outputs on fixed inputs, shared by the tests.

`unet_output` is a UNet prediction on fixed random inputs. `block_changes` answers "which blocks does a
LoRA file change?": each UNet block module is first run without the LoRA and its inputs are recorded; with the LoRA loaded
(diffusers' load_lora_weights), every block is fed the recorded inputs again, so a block's output changes
only if its own weights changed, not because an earlier block did.
"""

from __future__ import annotations

import torch

from studio.core.blocks import FAMILY_BLOCK_IDS, unet_prefix_of_block


def _first_tensor(out):
    if isinstance(out, torch.Tensor):
        return out
    if isinstance(out, (tuple, list)):
        return _first_tensor(out[0])
    return out.sample


def _block_modules(unet, family):
    names = dict(unet.named_modules())
    out = {}
    for block in FAMILY_BLOCK_IDS[family]:
        for prefix in unet_prefix_of_block(block, family):
            if prefix in names:
                out[prefix] = (block, names[prefix])
    return out


def _unet_inputs(pipe, family):
    g = torch.Generator().manual_seed(0)
    latents = torch.randn((1, 4, 8, 8), generator=g)
    with torch.no_grad():
        if family == "sdxl":
            emb, _, pooled, _ = pipe.encode_prompt("a photo of sks dog", do_classifier_free_guidance=False)
            extra = {"text_embeds": pooled, "time_ids": torch.tensor([[64.0, 64, 0, 0, 64, 64]])}
        else:
            emb, _ = pipe.encode_prompt("a photo of sks dog", "cpu", 1, False)
            extra = None
    return latents, emb, extra


@torch.no_grad()
def block_changes(pipe, family: str, lora_path) -> dict[str, float]:
    """{block id: largest output change} for every block of the UNet, plus BASE for the text encoders."""
    modules = _block_modules(pipe.unet, family)
    latents, emb, extra = _unet_inputs(pipe, family)
    recorded, before, after = {}, {}, {}
    handles = []
    for name, (_, module) in modules.items():

        def record(mod, args, kwargs, name=name):
            recorded[name] = (args, kwargs)

        def keep(mod, args, kwargs, out, name=name, store=before):
            store[name] = _first_tensor(out).clone()

        handles += [
            module.register_forward_pre_hook(record, with_kwargs=True),
            module.register_forward_hook(keep, with_kwargs=True),
        ]
    pipe.unet(latents, 500, encoder_hidden_states=emb, added_cond_kwargs=extra)
    for h in handles:
        h.remove()
    pipe.load_lora_weights(str(lora_path))
    _, emb_lora, _ = _unet_inputs(pipe, family)
    handles = []
    for name, (_, module) in modules.items():

        def replay(mod, args, kwargs, name=name):
            return recorded[name]

        def keep(mod, args, kwargs, out, name=name, store=after):
            store[name] = _first_tensor(out).clone()

        handles += [
            module.register_forward_pre_hook(replay, with_kwargs=True),
            module.register_forward_hook(keep, with_kwargs=True),
        ]
    pipe.unet(latents, 500, encoder_hidden_states=emb, added_cond_kwargs=extra)
    for h in handles:
        h.remove()
    changes = {b: 0.0 for b in FAMILY_BLOCK_IDS[family]}
    for name, (block, _) in modules.items():
        changes[block] = max(changes[block], float((after[name] - before[name]).abs().max()))
    changes["BASE"] = float((emb_lora - emb).abs().max())
    return changes


def changed_blocks(changes: dict[str, float], tol: float = 1e-7) -> set[str]:
    return {b for b, v in changes.items() if v > tol}


def unet_output(pipe, seed: int = 0) -> torch.Tensor:
    """UNet noise prediction on fixed random inputs (with SDXL's size conditioning)."""
    g = torch.Generator().manual_seed(seed)
    unet = pipe.unet
    sample = torch.randn(2, unet.config.in_channels, 8, 8, generator=g)
    hidden = torch.randn(2, 77, unet.config.cross_attention_dim, generator=g)
    kwargs = {}
    if unet.config.addition_embed_type == "text_time":
        proj = pipe.text_encoder_2.config.projection_dim
        kwargs["added_cond_kwargs"] = {
            "text_embeds": torch.randn(2, proj, generator=g),
            "time_ids": torch.tensor([[64.0, 64.0, 0.0, 0.0, 64.0, 64.0]] * 2),
        }
    with torch.no_grad():
        return unet(sample, torch.tensor([500, 100]), encoder_hidden_states=hidden, **kwargs).sample
