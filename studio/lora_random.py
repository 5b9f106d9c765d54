"""Random LoRAs shaped for a given pipeline: test fixtures and benchmark inputs (real shapes, random values)."""

from __future__ import annotations

import torch

from studio.blocks import Family, block_of
from studio.lora_files import LoraModule, LoraSet, model_module_shapes

# The modules kohya targets by default: Linear / 1x1 conv inside transformer blocks, and text-encoder
# attention and MLP layers. LoCon adds the 3x3 convs of resnets and samplers.
_UNET_ATTN_PARTS = (".attentions.",)
_TE_PARTS = (".self_attn.", ".mlp.")


def default_targets(
    module_shapes: dict[str, tuple[int, ...]], *, text_encoder: bool = True, conv: bool = False
) -> list[str]:
    """Canonical paths kohya would adapt by default (plus 3x3 convs when conv=True)."""
    out = []
    for path, shape in module_shapes.items():
        if path.startswith("unet."):
            in_attn = any(p in path for p in _UNET_ATTN_PARTS) and block_of(path) is not None
            is_3x3 = len(shape) == 4 and shape[2:] != (1, 1)
            if (in_attn and not is_3x3) or (conv and is_3x3 and block_of(path) is not None):
                out.append(path)
        elif text_encoder and any(p in path for p in _TE_PARTS):
            out.append(path)
    return out


def random_lora(
    pipe,
    family: Family,
    *,
    rank: int = 4,
    alpha: float | None = None,
    seed: int = 0,
    targets: list[str] | None = None,
    text_encoder: bool = True,
    conv: bool = False,
    scale: float = 0.05,
) -> LoraSet:
    """A LoRA with random (non-zero) factors for every default target module of `pipe`.

    `scale` sets the size of the factors so that deltas are noticeable but do not blow up outputs.
    """
    g = torch.Generator().manual_seed(seed)
    shapes = model_module_shapes(pipe)
    paths = targets if targets is not None else default_targets(shapes, text_encoder=text_encoder, conv=conv)
    modules = {}
    for path in paths:
        shape = shapes[path]
        kernel = tuple(shape[2:])
        down = torch.randn((rank, shape[1], *kernel), generator=g) * scale
        up = torch.randn((shape[0], rank, *((1, 1) if kernel else ())), generator=g) * scale
        modules[path] = LoraModule(down, up, alpha)
    return LoraSet(modules, family, {}, None, None)
