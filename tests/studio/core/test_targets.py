"""Block-wise targeting: block ids, per-block rank/alpha/lr, kohya vectors and shape names."""

from __future__ import annotations

import math

import pytest

from studio.core.blocks import block_of
from studio.core.errors import ConfigError
from studio.core.keys import kohya_index
from studio.core.modules import model_module_shapes
from studio.core.targets import TargetSpec, lr_weight_vector, parse_block_map, plan_targets
from tests.fixtures.tiny import tiny_sd15_pipeline, tiny_sdxl_pipeline


@pytest.fixture(scope="module")
def sd15_shapes():
    return model_module_shapes(tiny_sd15_pipeline(seed=0))


@pytest.fixture(scope="module")
def sdxl_shapes():
    return model_module_shapes(tiny_sdxl_pipeline(seed=0))


def test_default_targets_are_kohyas(sd15_shapes):
    plan = plan_targets(sd15_shapes, "sd15", TargetSpec(rank=4))
    assert all(".attentions." in p and p.startswith("unet.") for p in plan)
    assert any(p.endswith("proj_in") for p in plan) and any(p.endswith("ff.net.2") for p in plan)
    assert {t.rank for t in plan.values()} == {4} and {t.alpha for t in plan.values()} == {4.0}
    with_te = plan_targets(sd15_shapes, "sd15", TargetSpec(rank=4, text_encoder=True))
    assert {t.block for t in with_te.values()} - {t.block for t in plan.values()} == {"BASE"}


def test_locon_adds_resnets_and_samplers(sd15_shapes):
    plan = plan_targets(sd15_shapes, "sd15", TargetSpec(rank=8, conv_rank=2, conv_alpha=1))
    convs = {p: t for p, t in plan.items() if t.conv}
    assert convs and all(len(sd15_shapes[p]) == 4 and sd15_shapes[p][2:] != (1, 1) for p in convs)
    assert {t.rank for t in convs.values()} == {2} and {t.alpha for t in convs.values()} == {1.0}
    assert "unet.down_blocks.0.downsamplers.0.conv" in plan
    assert plan["unet.down_blocks.0.resnets.0.time_emb_proj"].rank == 8  # Linear inside a resnet: main rank


def test_blocks_layers_and_per_block_rank_alpha_lr(sdxl_shapes):
    spec = TargetSpec(rank=4, blocks=["OUT00", "OUT01", "IN07"], layers=["to_q", "to_out.0"],
                      block_rank={"IN07": 0, "OUT01": 8}, block_alpha={"OUT01": 2}, block_lr={"OUT00": 3})  # fmt: skip
    plan = plan_targets(sdxl_shapes, "sdxl", spec)
    assert {t.block for t in plan.values()} == {"OUT00", "OUT01"}
    assert all(p.endswith(("to_q", "to_out.0")) for p in plan)
    assert {(t.block, t.rank, t.alpha, t.lr_scale) for t in plan.values()} == {
        ("OUT00", 4, 4.0, 3.0),
        ("OUT01", 8, 2.0, 1.0),
    }


def test_kohya_block_index():
    assert kohya_index("unet.down_blocks.0.attentions.1.proj_in", "sd15") == 2  # IN02: 26-id index 3 = k + 1
    assert kohya_index("unet.down_blocks.1.downsamplers.0.conv", "sd15") == 6  # IN06
    assert kohya_index("unet.mid_block.attentions.0.proj_in", "sd15") == 12
    assert kohya_index("unet.up_blocks.3.attentions.2.proj_out", "sd15") == 24  # OUT11
    assert kohya_index("unet.down_blocks.1.attentions.0.proj_in", "sdxl") == 5  # IN04 -> 1 + 4
    assert [kohya_index(f"unet.mid_block.{p}.x", "sdxl") for p in ("resnets.0", "attentions.0", "resnets.1")] == [
        10, 11, 12]  # fmt: skip
    assert kohya_index("unet.up_blocks.0.attentions.1.proj_in", "sdxl") == 14  # OUT01
    assert kohya_index("text_encoder.text_model.encoder.layers.0.mlp.fc1", "sd15") is None


def test_block_dims_vectors(sd15_shapes, sdxl_shapes):
    dims = [0] * 25
    dims[5], dims[14] = 2, 6  # IN05 and OUT01 (OUT01 has no attention in SD1.5: no module there)
    dims[16] = 3  # OUT03
    alphas = [1.0] * 25
    plan = plan_targets(sd15_shapes, "sd15", TargetSpec(rank=4, block_dims=dims, block_alphas=alphas))
    assert {(t.block, t.rank, t.alpha) for t in plan.values()} == {("IN05", 2, 1.0), ("OUT03", 3, 1.0)}
    with pytest.raises(ConfigError, match="25 values .* got 23 .*SDXL length"):
        plan_targets(sd15_shapes, "sd15", TargetSpec(block_dims=[4] * 23))
    xl = [0] * 23
    xl[11] = 4  # middle block attention
    plan = plan_targets(sdxl_shapes, "sdxl", TargetSpec(block_dims=xl))
    assert {t.block for t in plan.values()} == {"M00"} and all(".attentions.0." in p for p in plan)


def test_lr_weight_shapes_match_kohya():
    assert lr_weight_vector("sine", 3, "w") == pytest.approx([0.0, math.sin(math.pi / 4), 1.0])
    assert lr_weight_vector("cosine", 3, "w") == pytest.approx([1.0, math.sin(math.pi / 4), 0.0])
    assert lr_weight_vector("reverse_linear+0.5", 3, "w") == pytest.approx([1.5, 1.0, 0.5])
    assert lr_weight_vector("1,0,2", 3, "w") == [1.0, 0.0, 2.0]
    with pytest.raises(ConfigError, match="needs 12 values"):
        lr_weight_vector("1,2", 12, "down_lr_weight")


def test_lr_weights_and_zero_threshold(sd15_shapes, sdxl_shapes):
    spec = TargetSpec(rank=4, down_lr_weight="zeros", mid_lr_weight="0.5", up_lr_weight="linear",
                      block_lr_zero_threshold=0.2)  # fmt: skip
    plan = plan_targets(sd15_shapes, "sd15", spec)
    assert not any(t.block.startswith("IN") for t in plan.values())  # lr weight 0 -> no module at all
    assert {t.lr_scale for t in plan.values() if t.block == "M00"} == {0.5}
    assert plan[next(p for p in plan if block_of(p) == "OUT11")].lr_scale == pytest.approx(1.0)
    assert not any(t.block in ("OUT00", "OUT01", "OUT02") for t in plan.values())
    xl = plan_targets(sdxl_shapes, "sdxl", TargetSpec(mid_lr_weight="1,2,3", up_lr_weight="zeros+1"))
    assert {t.lr_scale for t in xl.values() if t.block == "M00"} == {2.0}  # only the attention part has LoRA
    with pytest.raises(ConfigError, match="mid_lr_weight needs 3"):
        plan_targets(sdxl_shapes, "sdxl", TargetSpec(mid_lr_weight="1"))


def test_errors_name_the_problem(sd15_shapes):
    with pytest.raises(ConfigError, match="unknown block id 'OUT12'"):
        plan_targets(sd15_shapes, "sd15", TargetSpec(blocks=["OUT12"]))
    with pytest.raises(ConfigError, match="no module .* gets a LoRA"):
        plan_targets(sd15_shapes, "sd15", TargetSpec(blocks=["OUT00"]))  # SD1.5 OUT00 has no attention
    with pytest.raises(ConfigError, match="BLOCK=value"):
        parse_block_map("OUT00:3", "sd15", "block_rank")
    assert parse_block_map({"out01": 2}, "sdxl", "block_lr") == {"OUT01": 2.0}
