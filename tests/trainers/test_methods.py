"""Each method trains end to end on the tiny models; its file loads in diffusers and changes only its blocks."""

from __future__ import annotations

import json

import pytest
import torch

from studio.core.errors import ConfigError, FamilyMismatchError
from studio.core.lora_files import read_lora
from studio.core.options import build_config
from studio.core.orthogonal_basis import basis_slice, orthogonality_error
from tests.fixtures.tiny import tiny_sd15_pipeline, tiny_sdxl_pipeline
from tests.probes import block_changes, changed_blocks
from tests.trainers.conftest import TINY, make_images
from trainers.config import TrainConfig
from trainers.events import read_events
from trainers.loop import train

FAST = {**TINY, "max_steps": 2, "learning_rate": 1e-3, "rank": 4, "alpha": 4}


def run(pipe, family, tmp_path, name="run", **options):
    cfg = build_config(TrainConfig, {**FAST, "output_dir": str(tmp_path / name), **options})
    return train(cfg, pipe=pipe, family=family)


def test_dreambooth_sd15_with_prior_preservation_and_text_encoder(tmp_path, images, fresh_sd15_pipe):
    result = run(
        fresh_sd15_pipe, "sd15", tmp_path, method="dreambooth", data_dir=str(images),
        prompt="a photo of sks dog", use_captions=False, prior_preservation=True,
        class_prompt="a photo of a dog", num_class_images=2, class_generation_steps=1,
        train_text_encoder=True,
    )  # fmt: skip
    assert len(list((tmp_path / "run" / "class_images").glob("*.png"))) == 2
    lora = read_lora(result.path)
    assert lora.family == "sd15" and "text_encoder" in lora.components
    meta = lora.metadata
    assert meta["ss_num_reg_images"] == "2" and meta["studio_class_prompt"] == "a photo of a dog"
    assert meta["ss_steps"] == "2" and json.loads(meta["ss_tag_frequency"])
    changes = block_changes(tiny_sd15_pipeline(seed=0), "sd15", result.path)
    assert changed_blocks(changes) == set(lora.blocks)
    assert "BASE" in lora.blocks


def test_dreambooth_sdxl_loads_in_diffusers(tmp_path, images, fresh_sdxl_pipe):
    result = run(fresh_sdxl_pipe, "sdxl", tmp_path, method="dreambooth", data_dir=str(images),
                 prompt="a photo of sks dog")  # fmt: skip
    lora = read_lora(result.path)
    assert lora.family == "sdxl" and lora.metadata["ss_base_model_version"] == "sdxl_base_v1-0"
    changes = block_changes(tiny_sdxl_pipeline(seed=0), "sdxl", result.path)
    assert changed_blocks(changes) == set(lora.blocks)
    assert "BASE" not in lora.blocks


def test_style_captions_and_tag_frequency(tmp_path, images, fresh_sd15_pipe):
    result = run(fresh_sd15_pipe, "sd15", tmp_path, method="style", data_dir=str(images), prompt="sks style",
                 shuffle_caption=True, keep_tokens=1, caption_dropout_rate=0.5, repeats=2, min_snr_gamma=5.0,
                 noise_offset=0.05, gradient_checkpointing=True)  # fmt: skip
    meta = read_lora(result.path).metadata
    tags = json.loads(meta["ss_tag_frequency"])["2_images"]
    assert tags == {"sks": 2, "dog": 2, "grass": 1, "sofa": 1, "sks style": 1}
    events = read_events(result.events_path)
    assert any("1 of 3 images have no caption file" in e.get("message", "") for e in events)
    assert [e["step"] for e in events if e["event"] == "step"] == [1, 2]


def test_style_with_a_regularisation_set(tmp_path, images, fresh_sd15_pipe):
    reg = make_images(tmp_path / "reg", 2, {0: "a dog on grass", 1: "a dog on a sofa"})
    result = run(fresh_sd15_pipe, "sd15", tmp_path, method="style", data_dir=str(images), prompt="sks style",
                 reg_data_dir=str(reg), prior_loss_weight=0.5)  # fmt: skip
    meta = read_lora(result.path).metadata
    assert meta["ss_num_reg_images"] == "2" and meta["ss_num_train_images"] == "3"
    assert meta["ss_prior_loss_weight"] == "0.5"
    (reg / "img_1.txt").unlink()
    with pytest.raises(ConfigError, match="reg_data_dir"):
        run(tiny_sd15_pipeline(seed=0), "sd15", tmp_path, name="uncaptioned", method="style", data_dir=str(images),
            prompt="sks style", reg_data_dir=str(reg))  # fmt: skip
    with pytest.raises(ConfigError, match="reg_data_dir is for method style"):
        build_config(TrainConfig, {**FAST, "method": "dreambooth", "data_dir": str(images), "prompt": "a sks dog",
                                   "output_dir": str(tmp_path / "db"), "reg_data_dir": str(reg)})  # fmt: skip


def test_blockwise_targets_only_chosen_blocks(tmp_path, images, fresh_sd15_pipe):
    result = run(fresh_sd15_pipe, "sd15", tmp_path, method="style", data_dir=str(images), prompt="sks",
                 blocks=["IN04", "M00", "OUT05", "OUT09"], block_rank="OUT09=0,IN04=2", block_lr="M00=2",
                 conv_rank=2)  # fmt: skip
    lora = read_lora(result.path)
    assert set(lora.blocks) == {"IN04", "M00", "OUT05"}
    assert {m.rank for p, m in lora.modules.items() if ".down_blocks.1.attentions.0." in p} == {2}
    assert any(m.is_conv for m in lora.modules.values()), "conv_rank adds LoCon 3x3 modules"
    changes = block_changes(tiny_sd15_pipeline(seed=0), "sd15", result.path)
    assert changed_blocks(changes) == {"IN04", "M00", "OUT05"}


def test_b_lora_sdxl_content_and_style_halves(tmp_path, fresh_sdxl_pipe):
    one = make_images(tmp_path / "one", 1)
    result = run(fresh_sdxl_pipe, "sdxl", tmp_path, method="b_lora", data_dir=str(one), prompt="A [v]",
                 use_captions=False, crop="none", split=True)  # fmt: skip
    lora = read_lora(result.path)
    assert lora.is_b_lora and lora.blocks == ["OUT00", "OUT01"]
    assert {p.rsplit(".", 2)[-2] + "." + p.rsplit(".", 1)[-1] for p in lora.modules} <= {
        "attn1.to_q", "attn1.to_k", "attn1.to_v", "to_out.0", "attn2.to_q", "attn2.to_k", "attn2.to_v",
    }  # fmt: skip
    content, style = (result.path.with_name(f"lora_{h}.safetensors") for h in ("content", "style"))
    assert result.files == [result.path, content, style]
    assert changed_blocks(block_changes(tiny_sdxl_pipeline(seed=0), "sdxl", content)) == {"OUT00"}
    assert changed_blocks(block_changes(tiny_sdxl_pipeline(seed=0), "sdxl", style)) == {"OUT01"}
    assert changed_blocks(block_changes(tiny_sdxl_pipeline(seed=0), "sdxl", result.path)) == {
        "OUT00",
        "OUT01",
    }


def test_b_lora_refuses_sd15(tmp_path, images, fresh_sd15_pipe):
    with pytest.raises(FamilyMismatchError, match="SDXL"):
        run(fresh_sd15_pipe, "sd15", tmp_path, method="b_lora", data_dir=str(images), prompt="A [v]")


def test_orthogonal_concepts_are_mutually_orthogonal(tmp_path, images):
    loras = []
    for concept in (0, 1):
        result = run(tiny_sd15_pipeline(seed=0), "sd15", tmp_path, name=f"c{concept}", method="orthogonal",
                     data_dir=str(images), prompt="a photo of sks dog", ortho_slice=concept, ortho_seed=7,
                     ortho_num_concepts=2, save_dtype="fp32")  # fmt: skip
        loras.append(read_lora(result.path))
    a, b = loras
    assert a.metadata["studio_ortho_seed"] == "7" and a.metadata["studio_ortho_rank"] == "4"
    assert (a.metadata["studio_ortho_slice"], b.metadata["studio_ortho_slice"]) == ("0", "1")
    path = next(p for p in a.modules if p.endswith("attn1.to_q"))
    width = a.modules[path].down.shape[1]
    assert torch.equal(a.modules[path].down, basis_slice(width, 4, 0, seed=7)), "lora_A stays frozen"
    assert max(orthogonality_error(a.modules[p].down, b.modules[p].down) for p in a.modules) < 1e-5
    # The tiny model's mid block sees a 1 x 1 map: self-attention over one token ignores q and k (softmax of
    # one score is 1), so their gradient is exactly zero. Every other lora_B must have moved.
    one_token = (
        "mid_block.attentions.0.transformer_blocks.0.attn1.to_q",
        "mid_block.attentions.0.transformer_blocks.0.attn1.to_k",
    )
    moved = {p: bool(m.up.abs().max() > 0) for p, m in a.modules.items()}
    assert all(v for p, v in moved.items() if not p.endswith(one_token)), "lora_B trains"
    changes = block_changes(tiny_sd15_pipeline(seed=0), "sd15", tmp_path / "c0" / "lora.safetensors")
    assert changed_blocks(changes) == set(a.blocks)
