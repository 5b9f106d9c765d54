"""The one block map: module paths -> block ids, kohya names, block-weight vectors."""

import pytest

from studio.core.blocks import (
    BLOCK_IDS,
    FAMILY_BLOCK_IDS,
    block_of,
    format_block_weights,
    parse_block_weights,
    unet_prefix_of_block,
)
from studio.core.errors import ConfigError
from studio.core.keys import parse_kohya_module, split_underscored


@pytest.mark.parametrize(
    "path, block",
    [
        ("unet.conv_in", "IN00"),
        ("unet.down_blocks.0.attentions.0.proj_in", "IN01"),
        ("unet.down_blocks.0.resnets.1.conv1", "IN02"),
        ("unet.down_blocks.0.downsamplers.0.conv", "IN03"),
        ("unet.down_blocks.1.attentions.1.transformer_blocks.0.attn2.to_k", "IN05"),
        ("unet.down_blocks.3.resnets.1.conv2", "IN11"),
        ("unet.mid_block.attentions.0.proj_out", "M00"),
        ("unet.up_blocks.0.resnets.2.conv1", "OUT02"),
        ("unet.up_blocks.0.upsamplers.0.conv", "OUT02"),
        ("unet.up_blocks.0.attentions.1.transformer_blocks.3.ff.net.2", "OUT01"),
        ("unet.up_blocks.3.attentions.2.proj_in", "OUT11"),
        ("unet.time_embedding.linear_1", None),
        ("text_encoder.text_model.encoder.layers.0.self_attn.q_proj", "BASE"),
        ("text_encoder_2.text_model.encoder.layers.9.mlp.fc2", "BASE"),
    ],
)
def test_block_of(path, block):
    assert block_of(path) == block


def test_block_prefixes_invert_block_of():
    for family in ("sd15", "sdxl"):
        for block in FAMILY_BLOCK_IDS[family][1:]:
            for prefix in unet_prefix_of_block(block, family):
                assert block_of(f"unet.{prefix}.x") == block, (family, block, prefix)


def test_b_lora_blocks_are_out00_out01():
    assert unet_prefix_of_block("OUT00", "sdxl") == ["up_blocks.0.resnets.0", "up_blocks.0.attentions.0"]
    assert unet_prefix_of_block("OUT01", "sdxl") == ["up_blocks.0.resnets.1", "up_blocks.0.attentions.1"]


def test_unknown_block_for_family():
    with pytest.raises(ConfigError, match="IN10"):
        unet_prefix_of_block("IN10", "sdxl")


@pytest.mark.parametrize(
    "name, path",
    [
        ("to_out_0", "to_out.0"),
        ("ff_net_0_proj", "ff.net.0.proj"),
        (
            "text_model_encoder_layers_11_self_attn_out_proj",
            "text_model.encoder.layers.11.self_attn.out_proj",
        ),
        ("down_blocks_2_resnets_0_conv_shortcut", "down_blocks.2.resnets.0.conv_shortcut"),
        ("up_blocks_1_resnets_2_time_emb_proj", "up_blocks.1.resnets.2.time_emb_proj"),
        (
            "input_blocks_4_1_transformer_blocks_0_attn1_to_q",
            "input_blocks.4.1.transformer_blocks.0.attn1.to_q",
        ),
        ("output_blocks_2_2_conv", "output_blocks.2.2.conv"),
    ],
)
def test_split_underscored(name, path):
    assert split_underscored(name) == path


def test_parse_kohya_sd15_and_te():
    assert (
        parse_kohya_module("lora_unet_down_blocks_0_attentions_0_proj_in")
        == "unet.down_blocks.0.attentions.0.proj_in"
    )
    assert (
        parse_kohya_module("lora_te_text_model_encoder_layers_0_mlp_fc1")
        == "text_encoder.text_model.encoder.layers.0.mlp.fc1"
    )
    assert (
        parse_kohya_module("lora_te1_text_model_encoder_layers_0_mlp_fc1")
        == "text_encoder.text_model.encoder.layers.0.mlp.fc1"
    )
    with pytest.raises(ValueError):
        parse_kohya_module("model_diffusion_model_input_blocks_1")


def test_vector_forms():
    w = parse_block_weights("1,0,0,0,0,0,0,0,1,1,1,1,1,1,1,1,1", "sd15")
    assert set(w) == set(BLOCK_IDS)
    assert w["BASE"] == 1 and w["IN01"] == 0 and w["OUT03"] == 1 and w["OUT00"] == 0  # not in the 17-form
    assert parse_block_weights("OUTALL", "sd15") == w
    xl = parse_block_weights([0.5] * 12, "sdxl")
    assert set(xl) == set(FAMILY_BLOCK_IDS["sdxl"]) and xl["OUT05"] == 0.5 and xl["OUT06"] == 0.0
    full = parse_block_weights([float(i) for i in range(26)], "sd15")
    assert full["OUT11"] == 25.0
    assert (
        parse_block_weights({"out01": 0}, "sdxl")["OUT01"] == 0
        and parse_block_weights({}, "sdxl")["M00"] == 1
    )


def test_vector_errors_say_what_to_do():
    with pytest.raises(ConfigError, match="Stable Diffusion 1.5 form.*zero OUT00-OUT02"):
        parse_block_weights([1.0] * 17, "sdxl")
    with pytest.raises(ConfigError, match="12 .* 17 .* 20 .* 26"):
        parse_block_weights("1,1,1", "sd15")
    with pytest.raises(ConfigError, match="unknown block-weight preset 'NOPE'.*OUTALL"):
        parse_block_weights("NOPE", "sd15")
    with pytest.raises(ConfigError, match="unknown block id"):
        parse_block_weights({"IN11": 1}, "sdxl")
    with pytest.raises(ConfigError, match="cannot read"):
        parse_block_weights("1,x,3", "sd15")


def test_presets_are_valid_for_their_family():
    from studio.core.blocks import load_presets

    for family, table in load_presets().items():
        for name in table:
            assert set(parse_block_weights(name, family)) == set(FAMILY_BLOCK_IDS[family])
    content = parse_block_weights("CONTENT", "sdxl")
    assert [b for b, v in content.items() if v] == ["OUT00"]


def test_format_round_trip():
    for family, spec in (("sd15", "OUTD"), ("sdxl", "STYLE")):
        w = parse_block_weights(spec, family)
        assert parse_block_weights(format_block_weights(w, family), family) == w
