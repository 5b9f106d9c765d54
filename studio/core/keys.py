"""Every LoRA and checkpoint key name the studio reads or writes, and the conversions between them.

Pure Python on purpose (no torch, no diffusers): naming a key, or telling which file a key comes from,
must stay cheap enough for `lora-studio inspect` to answer at once.

Names the studio meets:
- canonical module paths: the component, then the diffusers module path:
  "unet.up_blocks.0.attentions.1.transformer_blocks.0.attn1.to_q",
  "text_encoder.text_model.encoder.layers.0.mlp.fc1" (text encoders always with "text_model.");
- kohya / A1111 / ComfyUI module names: "lora_unet_" / "lora_te_" / "lora_te1_" / "lora_te2_" + the path
  with "_" for "."; SD1.5 files use diffusers paths, SDXL files the original (LDM/SGM) UNet paths
  ("output_blocks.1.1...");
- original single-file checkpoint keys: "model.diffusion_model." (UNet, LDM layout), "first_stage_model."
  (VAE), "cond_stage_model.transformer." / "conditioner.embedders.N." (text encoders);
- diffusers / PEFT keys: "unet.<path>.lora_A.weight" (the component prefix may be missing: a peft
  `save_pretrained` of a UNet).

    >>> parse_kohya_module("lora_unet_output_blocks_0_1_transformer_blocks_0_attn1_to_q")
    'unet.up_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q'
    >>> kohya_module_name("unet.up_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q", "sdxl")
    'lora_unet_output_blocks_0_1_transformer_blocks_0_attn1_to_q'
"""

from __future__ import annotations

import re
from functools import cache

from studio.core.blocks import block_of
from studio.core.families import FAMILY_NAMES, TEXT_ENCODERS, Family

# --------------------------------------------------------------------------------------------------
# canonical paths


def canonical_path(component: str, name: str) -> str:
    """Canonical path of a module: text-encoder paths always carry "text_model." as in every LoRA file.

    transformers 5 dropped the "text_model." level from CLIPTextModel (not from CLIPTextModelWithProjection);
    the files users own keep it, so the studio keeps one spelling and resolves either.

    >>> canonical_path("text_encoder", "encoder.layers.0.mlp.fc1")
    'text_encoder.text_model.encoder.layers.0.mlp.fc1'
    """
    if component.startswith("text_encoder") and not name.startswith("text_model."):
        name = f"text_model.{name}"
    return f"{component}.{name}"


def canonical_peft_path(path: str) -> str:
    """Canonical path of a diffusers / PEFT module path (with or without the component prefix).

    >>> canonical_peft_path("down_blocks.0.attentions.0.proj_in")
    'unet.down_blocks.0.attentions.0.proj_in'
    >>> canonical_peft_path("text_encoder.encoder.layers.0.self_attn.q_proj")
    'text_encoder.text_model.encoder.layers.0.self_attn.q_proj'
    """
    component, _, name = path.partition(".")
    if component in TEXT_ENCODERS:
        return canonical_path(component, name)
    if component == "unet":
        return path
    # peft-saved UNet adapters have no component prefix ("base_model.model." already stripped)
    return f"unet.{path}"


_UNET_ROOTS = ("conv_in", "time_embedding", "add_embedding", "down_blocks", "mid_block", "up_blocks",
               "conv_norm_out", "conv_out")  # fmt: skip
_TEXT_ROOTS = (
    "text_model.encoder.",
    "text_model.embeddings.",
    "text_model.final_layer_norm",
    "text_model.text_projection",
)


def is_known_module(path: str) -> bool:
    """True for a canonical path inside a Stable Diffusion UNet or CLIP text encoder (what a LoRA can adapt).

    >>> is_known_module("unet.mid_block.attentions.0.proj_in"), is_known_module("unet.model.layers.0.q_proj")
    (True, False)
    """
    component, _, name = path.partition(".")
    if component == "unet":
        return name.split(".", 1)[0] in _UNET_ROOTS
    return component in TEXT_ENCODERS and name.startswith(_TEXT_ROOTS)


# --------------------------------------------------------------------------------------------------
# single-file checkpoint prefixes

UNET_PREFIX, VAE_PREFIX = "model.diffusion_model.", "first_stage_model."
TEXT_PREFIXES = {
    "sd15": {"text_encoder": "cond_stage_model.transformer."},
    "sdxl": {
        "text_encoder": "conditioner.embedders.0.transformer.",
        "text_encoder_2": "conditioner.embedders.1.model.",
    },
}
ARCHITECTURES = {"sd15": "stable-diffusion-v1", "sdxl": "stable-diffusion-xl-v1-base"}


# --------------------------------------------------------------------------------------------------
# UNet module paths: diffusers <-> original (ldm/sgm)

# Which diffusers blocks hold attention. Both families have layers_per_block = 2, so each level is three
# ldm input_blocks (two resnet(+attention) layers and a downsampler) and three output_blocks.
_UNET_LAYOUT = {
    "sd15": {"levels": 4, "down_attn": (0, 1, 2), "up_attn": (1, 2, 3)},
    "sdxl": {"levels": 3, "down_attn": (1, 2), "up_attn": (0, 1)},
}
# What each kind of block holds, and its name in the original layout (attention blocks and upsamplers
# keep their names; knowing them also rejects paths from the other family, e.g. SD1.5's
# output_blocks.2.1.conv read as SDXL).
_INNER = {
    "resnet": {
        "norm1": "in_layers.0", "conv1": "in_layers.2", "time_emb_proj": "emb_layers.1",
        "norm2": "out_layers.0", "dropout": "out_layers.2", "conv2": "out_layers.3",
        "conv_shortcut": "skip_connection",
    },
    "attention": {name: name for name in ("norm", "proj_in", "transformer_blocks", "proj_out")},
    "downsampler": {"conv": "op"},
    "upsampler": {"conv": "conv"},
    "leaf": {},
}  # fmt: skip
_TOP = {
    "conv_in": "input_blocks.0.0", "time_embedding": "time_embed", "time_embedding.linear_1": "time_embed.0",
    "time_embedding.act": "time_embed.1", "time_embedding.linear_2": "time_embed.2",
    "add_embedding": "label_emb.0", "add_embedding.linear_1": "label_emb.0.0",
    "add_embedding.act": "label_emb.0.1", "add_embedding.linear_2": "label_emb.0.2",
    "conv_norm_out": "out.0", "conv_act": "out.1", "conv_out": "out.2", "mid_block": "middle_block",
}  # fmt: skip


@cache
def _unet_table(family: Family) -> dict[str, tuple[str, str]]:
    """diffusers module prefix -> (ldm module prefix, kind), for every block-level module of `family`."""
    layout = _UNET_LAYOUT[family]
    table = {d: (ldm, "leaf") for d, ldm in _TOP.items()}
    table["mid_block.resnets.0"] = ("middle_block.0", "resnet")
    table["mid_block.attentions.0"] = ("middle_block.1", "attention")
    table["mid_block.resnets.1"] = ("middle_block.2", "resnet")
    for i in range(layout["levels"]):
        for j in range(2):
            table[f"down_blocks.{i}.resnets.{j}"] = (f"input_blocks.{3 * i + 1 + j}.0", "resnet")
            if i in layout["down_attn"]:
                table[f"down_blocks.{i}.attentions.{j}"] = (f"input_blocks.{3 * i + 1 + j}.1", "attention")
        for j in range(3):
            table[f"up_blocks.{i}.resnets.{j}"] = (f"output_blocks.{3 * i + j}.0", "resnet")
            if i in layout["up_attn"]:
                table[f"up_blocks.{i}.attentions.{j}"] = (f"output_blocks.{3 * i + j}.1", "attention")
        if i < layout["levels"] - 1:
            table[f"down_blocks.{i}.downsamplers.0"] = (f"input_blocks.{3 * i + 3}.0", "downsampler")
            # the upsampler follows the resnet, and the attention when the block has one
            slot = 2 if i in layout["up_attn"] else 1
            table[f"up_blocks.{i}.upsamplers.0"] = (f"output_blocks.{3 * i + 2}.{slot}", "upsampler")
    return table


@cache
def _unet_table_inverse(family: Family) -> dict[str, tuple[str, str]]:
    return {ldm: (d, kind) for d, (ldm, kind) in _unet_table(family).items()}


def _map_unet_path(path: str, table: dict[str, tuple[str, str]], to_ldm: bool, family: Family) -> str:
    parts = path.split(".")
    suffix = [parts.pop()] if parts and parts[-1] in ("weight", "bias") else []
    for n in range(len(parts), 0, -1):
        if (head := ".".join(parts[:n])) in table:
            mapped, kind = table[head]
            rest = parts[n:]
            break
    else:
        raise ValueError(f"{path!r} is not a {FAMILY_NAMES[family]} UNet module path")
    if rest:
        renames = _INNER[kind] if to_ldm else {v: k for k, v in _INNER[kind].items()}
        width = 2 if not to_ldm and ".".join(rest[:2]) in renames else 1
        inner = ".".join(rest[:width])
        if inner not in renames:
            raise ValueError(f"{path!r} has no counterpart in the other UNet layout")
        rest = [renames[inner], *rest[width:]]
    return ".".join([mapped, *rest, *suffix])


def unet_diffusers_to_ldm(path: str, family: Family = "sdxl") -> str:
    """Original (ldm/sgm) UNet module path for a diffusers one; a trailing .weight/.bias is kept.

    The default family is SDXL because kohya names SDXL LoRA modules by these paths (SD1.5 LoRAs use
    diffusers paths). Raises ValueError for modules with no counterpart (e.g. "down_blocks.0", a
    shared activation).

    >>> unet_diffusers_to_ldm("up_blocks.0.attentions.1.transformer_blocks.0.attn1.to_q")
    'output_blocks.1.1.transformer_blocks.0.attn1.to_q'
    >>> unet_diffusers_to_ldm("down_blocks.1.resnets.0.conv1.weight", "sd15")
    'input_blocks.4.0.in_layers.2.weight'
    """
    return _map_unet_path(path, _unet_table(family), True, family)


def unet_ldm_to_diffusers(path: str, family: Family = "sdxl") -> str:
    """diffusers UNet module path for an original (ldm/sgm) one; the inverse of `unet_diffusers_to_ldm`.

    >>> unet_ldm_to_diffusers("output_blocks.2.2.conv")
    'up_blocks.0.upsamplers.0.conv'
    """
    return _map_unet_path(path, _unet_table_inverse(family), False, family)


# --------------------------------------------------------------------------------------------------
# kohya module names <-> canonical module paths

# Module-name words that themselves contain "_": kohya joins path parts with "_", so splitting
# back needs to know them. Greedy longest match over this vocabulary recovers the path.
_COMPOUND_WORDS = {
    "down_blocks", "up_blocks", "mid_block", "transformer_blocks", "to_q", "to_k", "to_v", "to_out",
    "proj_in", "proj_out", "conv_shortcut", "time_emb_proj", "conv_in", "conv_out", "conv_norm_out",
    "time_embedding", "linear_1", "linear_2", "add_embedding", "text_model", "self_attn", "q_proj",
    "k_proj", "v_proj", "out_proj", "final_layer_norm", "layer_norm1", "layer_norm2", "token_embedding",
    "position_embedding", "text_projection", "input_blocks", "output_blocks", "middle_block", "in_layers",
    "out_layers", "emb_layers", "skip_connection", "time_embed", "label_emb",
}  # fmt: skip
_MAX_WORDS = max(w.count("_") + 1 for w in _COMPOUND_WORDS)
_LDM_UNET_ROOTS = ("input_blocks", "output_blocks", "middle_block")

KOHYA_PREFIX = {
    ("sd15", "unet"): "lora_unet_",
    ("sd15", "text_encoder"): "lora_te_",
    ("sdxl", "unet"): "lora_unet_",
    ("sdxl", "text_encoder"): "lora_te1_",
    ("sdxl", "text_encoder_2"): "lora_te2_",
}
_KOHYA_COMPONENTS = (
    ("lora_unet_", "unet"),
    ("lora_te1_", "text_encoder"),
    ("lora_te2_", "text_encoder_2"),
    ("lora_te_", "text_encoder"),
)


def split_underscored(name: str) -> str:
    """Turn a kohya module name back into a dotted path.

    >>> split_underscored("down_blocks_0_attentions_1_transformer_blocks_0_attn1_to_out_0")
    'down_blocks.0.attentions.1.transformer_blocks.0.attn1.to_out.0'
    """
    parts = name.split("_")
    out: list[str] = []
    i = 0
    while i < len(parts):
        for k in range(min(_MAX_WORDS, len(parts) - i), 0, -1):
            word = "_".join(parts[i : i + k])
            if k == 1 or word in _COMPOUND_WORDS:
                out.append(word)
                i += k
                break
    return ".".join(out)


def is_kohya_name(key: str) -> bool:
    """True for a kohya / A1111 module name or key (lora_unet_..., lora_te_..., lora_te1_..., lora_te2_...)."""
    return key.startswith(tuple(prefix for prefix, _ in _KOHYA_COMPONENTS))


def parse_kohya_module(name: str, family: Family | None = None) -> str:
    """Canonical module path of a kohya module name (the key without .lora_down.weight etc.).

    SD1.5 files name UNet modules by diffusers paths, SDXL files by the original (LDM) paths; a few SD1.5
    files do too. An LDM name is converted with `family`'s layout when given, else SDXL's, then SD1.5's.

    >>> parse_kohya_module("lora_te2_text_model_encoder_layers_0_mlp_fc1")
    'text_encoder_2.text_model.encoder.layers.0.mlp.fc1'
    >>> parse_kohya_module("lora_unet_input_blocks_1_1_proj_in", "sd15")
    'unet.down_blocks.0.attentions.0.proj_in'
    """
    for prefix, component in _KOHYA_COMPONENTS:
        if name.startswith(prefix):
            path = split_underscored(name[len(prefix) :])
            if component == "unet" and path.split(".")[0] in _LDM_UNET_ROOTS:
                path = _ldm_unet_to_diffusers_any(path, family)
            return f"{component}.{path}"
    raise ValueError(f"not a kohya LoRA module name: {name!r}")


def kohya_family_of_ldm_names(names: list[str]) -> Family | None:
    """The family whose UNet layout reads every original (LDM) UNet name of a file; None without any.

    Most LDM paths mean the same module in SD1.5 and SDXL, so the whole file decides: text-encoder names
    ("lora_te_" is SD1.5, "lora_te1_" / "lora_te2_" SDXL) first, then which layout converts every name
    (SDXL when both do, as kohya names SDXL files this way).

    >>> kohya_family_of_ldm_names(["lora_unet_input_blocks_1_1_proj_in", "lora_unet_input_blocks_4_1_proj_in"])
    'sd15'
    """
    ldm = [split_underscored(n[len("lora_unet_") :]) for n in names if n.startswith("lora_unet_")]
    ldm = [p for p in ldm if p.split(".")[0] in _LDM_UNET_ROOTS]
    if not ldm:
        return None
    if any(n.startswith(("lora_te1_", "lora_te2_")) for n in names):
        return "sdxl"
    order: tuple[Family, ...] = (
        ("sd15", "sdxl") if any(n.startswith("lora_te_") for n in names) else ("sdxl", "sd15")
    )
    for family in order:
        try:
            for path in ldm:
                unet_ldm_to_diffusers(path, family)
        except ValueError:
            continue
        return family
    return None


def _ldm_unet_to_diffusers_any(path: str, family: Family | None) -> str:
    families: tuple[Family, ...] = (family,) if family else ("sdxl", "sd15")
    for fam in families:
        try:
            return unet_ldm_to_diffusers(path, fam)
        except ValueError:
            continue
    names = " or ".join(FAMILY_NAMES[f] for f in families)
    raise ValueError(f"{path!r} is not a {names} UNet module path")


def kohya_module_name(module_path: str, family: Family) -> str:
    """kohya module name for a canonical path: SD1.5 keeps diffusers paths, SDXL uses the original paths."""
    component, _, path = module_path.partition(".")
    if (family, component) not in KOHYA_PREFIX:
        raise ValueError(f"{module_path!r} has no kohya name for {FAMILY_NAMES[family]}")
    if family == "sdxl" and component == "unet":
        path = unet_diffusers_to_ldm(path)
    return KOHYA_PREFIX[(family, component)] + path.replace(".", "_")


def kohya_index(module_path: str, family: Family) -> int | None:
    """kohya's block index of a UNet module (None for text encoders and modules outside every block).

    kohya's training vectors (block_dims, ...) count blocks this way: SD1.x 0..24 = IN00..IN11, M00,
    OUT00..OUT11; SDXL 1..9 = IN00..IN08, 10-12 = the middle block's three parts, 13..21 = OUT00..OUT08.

    >>> kohya_index("unet.up_blocks.0.attentions.1.proj_in", "sd15")
    14
    >>> kohya_index("unet.mid_block.attentions.0.proj_in", "sdxl")
    11
    """
    block = block_of(module_path)
    if block is None or block == "BASE":
        return None
    n = 0 if block == "M00" else int(block[-2:])
    if family == "sd15":
        return {"IN": n, "M0": 12, "OU": 13 + n}[block[:2]]
    if block.startswith("IN"):
        return 1 + n
    if block == "M00":
        part = re.match(r"unet\.mid_block\.(resnets|attentions)\.(\d+)", module_path)
        return 10 + (1 if part and part[1] == "attentions" else 2 if part and part[2] == "1" else 0)
    return 13 + n


# --------------------------------------------------------------------------------------------------
# VAE and text-encoder keys: diffusers -> original

_VAE_ATTN = {"group_norm": "norm", "to_q": "q", "to_k": "k", "to_v": "v", "to_out.0": "proj_out"}


def vae_key_to_ldm(key: str, num_up: int) -> str:
    """Original VAE key for a diffusers AutoencoderKL key (the decoder's up blocks count backwards)."""
    rules = (
        (r"^(encoder|decoder)\.conv_norm_out\.", lambda m: f"{m[1]}.norm_out."),
        (r"^encoder\.down_blocks\.(\d+)\.resnets\.(\d+)\.", lambda m: f"encoder.down.{m[1]}.block.{m[2]}."),
        (r"^encoder\.down_blocks\.(\d+)\.downsamplers\.0\.", lambda m: f"encoder.down.{m[1]}.downsample."),
        (r"^decoder\.up_blocks\.(\d+)\.resnets\.(\d+)\.", lambda m: f"decoder.up.{num_up - 1 - int(m[1])}.block.{m[2]}."),
        (r"^decoder\.up_blocks\.(\d+)\.upsamplers\.0\.", lambda m: f"decoder.up.{num_up - 1 - int(m[1])}.upsample."),
        (r"^(encoder|decoder)\.mid_block\.resnets\.(\d+)\.", lambda m: f"{m[1]}.mid.block_{int(m[2]) + 1}."),
        (r"^(encoder|decoder)\.mid_block\.attentions\.0\.(group_norm|to_q|to_k|to_v|to_out\.0)\.",
         lambda m: f"{m[1]}.mid.attn_1.{_VAE_ATTN[m[2]]}."),
        (r"\.conv_shortcut\.", lambda m: ".nin_shortcut."),
    )  # fmt: skip
    for pattern, repl in rules:
        key = re.sub(pattern, repl, key)
    return key


OPEN_CLIP = {
    "embeddings.token_embedding.weight": "token_embedding.weight",
    "embeddings.position_embedding.weight": "positional_embedding",
    "final_layer_norm.weight": "ln_final.weight", "final_layer_norm.bias": "ln_final.bias",
}  # fmt: skip
OPEN_CLIP_LAYER = {
    "layer_norm1": "ln_1", "layer_norm2": "ln_2", "self_attn.out_proj": "attn.out_proj",
    "mlp.fc1": "mlp.c_fc", "mlp.fc2": "mlp.c_proj",
}  # fmt: skip
