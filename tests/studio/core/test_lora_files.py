"""LoRA files: every format reads into the same deltas, writes load in diffusers, bad files fail clearly."""

import copy
import json
import struct

import pytest
import torch
from safetensors.torch import save_file

from studio.core.errors import BadFileError, FamilyMismatchError, KeyMismatchError
from studio.core.lora_files import LoraModule, LoraSet, check_against_model, read_lora, write_lora
from studio.core.modules import apply_to_pipeline, model_module_shapes
from tests.fixtures.lora_random import random_lora
from tests.probes import unet_output


def assert_same_deltas(a: LoraSet, b: LoraSet, atol=1e-6):
    assert set(a.modules) == set(b.modules)
    for path in a.modules:
        da, db = a.modules[path].delta(), b.modules[path].delta()
        torch.testing.assert_close(da.reshape(db.shape), db, atol=atol, rtol=1e-5, msg=path)


@pytest.fixture(params=["sd15", "sdxl"])
def family_pipe(request, tiny_sd15, tiny_sdxl):
    return request.param, (tiny_sd15 if request.param == "sd15" else tiny_sdxl)


def text_out(pipe):
    ids = pipe.tokenizer(
        ["a photo of sks dog"], padding="max_length", max_length=77, return_tensors="pt"
    ).input_ids
    with torch.no_grad():
        return pipe.text_encoder(ids)[0]


@pytest.mark.parametrize("fmt", ["kohya", "peft"])
def test_round_trip_same_deltas(family_pipe, fmt, tmp_path):
    family, pipe = family_pipe
    lora = random_lora(pipe, family, rank=4, alpha=2.0, conv=True)
    path = write_lora(lora, tmp_path / f"l.{fmt}.safetensors", fmt=fmt)
    back = read_lora(path)
    assert back.family == family and back.source_format == fmt
    assert_same_deltas(lora, back)
    again = read_lora(write_lora(back, tmp_path / "again.safetensors", fmt=fmt))
    assert_same_deltas(lora, again)


def test_kohya_keys_and_metadata(tiny_sdxl, tmp_path):
    lora = random_lora(tiny_sdxl, "sdxl", rank=2)
    path = write_lora(lora, tmp_path / "xl.safetensors")
    back = read_lora(path)
    keys = list(back.metadata)
    assert back.metadata["ss_base_model_version"] == "sdxl_base_v1-0"
    assert back.metadata["modelspec.architecture"] == "stable-diffusion-xl-v1-base/lora"
    assert "ss_network_dim" in keys
    from safetensors import safe_open

    with safe_open(str(path), "pt") as f:
        names = list(f.keys())
    assert any(k.startswith("lora_unet_output_blocks_0_1_") for k in names), (
        "SDXL kohya keys use original paths"
    )
    assert any(k.startswith("lora_te1_") for k in names) and any(k.startswith("lora_te2_") for k in names)


@pytest.mark.parametrize("fmt", ["kohya", "peft"])
def test_written_file_loads_in_diffusers_with_same_outputs(family_pipe, fmt, tmp_path):
    family, pipe = family_pipe
    lora = random_lora(pipe, family, rank=4, alpha=8.0, seed=3, scale=0.2)
    path = write_lora(lora, tmp_path / "l.safetensors", fmt=fmt)

    ours = copy.deepcopy(pipe)
    apply_to_pipeline(lora, ours)
    theirs = copy.deepcopy(pipe)
    theirs.load_lora_weights(str(path), adapter_name="x")

    base = unet_output(pipe)
    expected = unet_output(ours)
    assert (expected - base).abs().max() > 1e-3, "the LoRA must change the UNet output"
    torch.testing.assert_close(unet_output(theirs), expected, atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(text_out(theirs), text_out(ours), atol=1e-4, rtol=1e-4)


def test_reads_old_diffusers_keys(tiny_sd15, tmp_path):
    lora = random_lora(tiny_sd15, "sd15", rank=2, text_encoder=True)
    state = {}
    for path, m in lora.modules.items():
        if path.endswith(("attn1.to_q", "attn1.to_out.0")):  # attention-processor style keys
            owner, proj = path[: path.index(".to_")], path.split(".")[-2 if path.endswith("to_out.0") else -1]
            base = f"{owner}.processor.{proj}_lora"
        elif path.startswith("text_encoder."):
            base = f"{path}.lora_linear_layer"
        else:
            base = f"{path}.lora"
        state[f"{base}.down.weight"] = m.down.contiguous()
        state[f"{base}.up.weight"] = m.up.contiguous()
    save_file(state, tmp_path / "old.safetensors")
    back = read_lora(tmp_path / "old.safetensors")
    assert back.source_format == "diffusers_old"
    assert_same_deltas(lora, back)


def test_kohya_without_alpha_means_scale_one(tiny_sd15, tmp_path):
    lora = random_lora(tiny_sd15, "sd15", rank=4, alpha=1.0, text_encoder=False)
    path = write_lora(lora, tmp_path / "a.safetensors")
    from safetensors.torch import load_file

    state = {k: v for k, v in load_file(path).items() if not k.endswith(".alpha")}
    save_file(state, tmp_path / "noalpha.safetensors")
    back = read_lora(tmp_path / "noalpha.safetensors")
    assert all(m.alpha is None and m.scale == 1.0 for m in back.modules.values())


def test_peft_alpha_from_adapter_metadata(tiny_sd15, tmp_path):
    lora = random_lora(tiny_sd15, "sd15", rank=4, text_encoder=False)
    state = {}
    for path, m in lora.modules.items():
        state[f"{path}.lora_A.weight"] = m.down.contiguous()
        state[f"{path}.lora_B.weight"] = m.up.contiguous()
    meta = {"lora_adapter_metadata": json.dumps({"unet.r": 4, "unet.lora_alpha": 2})}
    save_file(state, tmp_path / "p.safetensors", metadata=meta)
    back = read_lora(tmp_path / "p.safetensors")
    assert {m.scale for m in back.modules.values()} == {0.5}


def test_b_lora_detected(tiny_sdxl, tmp_path):
    shapes = model_module_shapes(tiny_sdxl)
    targets = [
        p
        for p in shapes
        if p.startswith(("unet.up_blocks.0.attentions.0.", "unet.up_blocks.0.attentions.1."))
        and p.rsplit(".", 1)[-1] in ("to_q", "to_k", "to_v", "0")
        and ".attn" in p
    ]
    lora = random_lora(tiny_sdxl, "sdxl", rank=2, targets=targets)
    back = read_lora(write_lora(lora, tmp_path / "b.safetensors", fmt="peft"))
    assert back.is_b_lora and back.blocks == ["OUT00", "OUT01"]
    content = back.subset(("unet.up_blocks.0.attentions.0.",))
    assert content.blocks == ["OUT00"]


# ---------------------------------------------------------------------------------------------- bad input


def test_truncated_file(tiny_sd15, tmp_path):
    path = write_lora(random_lora(tiny_sd15, "sd15"), tmp_path / "t.safetensors")
    data = path.read_bytes()
    (tmp_path / "cut.safetensors").write_bytes(data[: len(data) // 2])
    with pytest.raises(BadFileError, match=r"cut\.safetensors.*truncated"):
        read_lora(tmp_path / "cut.safetensors")
    (tmp_path / "tiny.safetensors").write_bytes(b"\x01\x02")
    with pytest.raises(BadFileError, match="empty or truncated"):
        read_lora(tmp_path / "tiny.safetensors")


def test_not_safetensors_and_bad_headers(tmp_path):
    (tmp_path / "junk.safetensors").write_bytes(b"PK\x03\x04" + b"\x00" * 100)
    with pytest.raises(BadFileError, match="junk.safetensors"):
        read_lora(tmp_path / "junk.safetensors")
    bad_json = b"{not json"
    (tmp_path / "badjson.safetensors").write_bytes(struct.pack("<Q", len(bad_json)) + bad_json)
    with pytest.raises(BadFileError, match="malformed"):
        read_lora(tmp_path / "badjson.safetensors")
    header = json.dumps({"__metadata__": {"x": 1}}).encode()
    (tmp_path / "badmeta.safetensors").write_bytes(struct.pack("<Q", len(header)) + header)
    with pytest.raises(BadFileError, match="metadata"):
        read_lora(tmp_path / "badmeta.safetensors")
    with pytest.raises(BadFileError, match="no such file"):
        read_lora(tmp_path / "missing.safetensors")


def test_pickle_refused_unless_allowed(tiny_sd15, tmp_path):
    lora = random_lora(tiny_sd15, "sd15", rank=2, text_encoder=False)
    from studio.core.lora_files import to_kohya_state_dict

    torch.save(to_kohya_state_dict(lora, "sd15"), tmp_path / "l.pt")
    with pytest.raises(BadFileError, match="pickle.*--allow-pickle"):
        read_lora(tmp_path / "l.pt")
    assert_same_deltas(lora, read_lora(tmp_path / "l.pt", allow_pickle=True))


def test_full_checkpoint_is_not_a_lora(tmp_path):
    save_file(
        {"model.diffusion_model.input_blocks.0.0.weight": torch.zeros(2, 2)}, tmp_path / "ckpt.safetensors"
    )
    with pytest.raises(KeyMismatchError, match="no LoRA keys.*full model checkpoint"):
        read_lora(tmp_path / "ckpt.safetensors")


def test_wrong_family_and_shapes(tiny_sd15, tiny_sdxl, tmp_path):
    sd15_lora = read_lora(write_lora(random_lora(tiny_sd15, "sd15"), tmp_path / "a.safetensors"))
    with pytest.raises(FamilyMismatchError, match="Stable Diffusion 1.5 LoRA but the model is SDXL"):
        check_against_model(sd15_lora, "sdxl", model_module_shapes(tiny_sdxl))
    shapes = model_module_shapes(tiny_sd15)
    path = next(p for p in sd15_lora.modules if p.endswith("attn2.to_k"))
    bad = LoraSet(dict(sd15_lora.modules), "sd15", path=tmp_path / "a.safetensors")
    m = bad.modules[path]
    bad.modules[path] = LoraModule(torch.zeros(m.rank, m.down.shape[1] + 1), m.up, m.alpha)
    with pytest.raises(KeyMismatchError, match="attn2.to_k has shape"):
        check_against_model(bad, "sd15", shapes)
    stray = LoraSet({"unet.not_a_module": m}, None, path=tmp_path / "s.safetensors")
    with pytest.raises(KeyMismatchError, match="none of its 1 modules exist"):
        check_against_model(stray, "sd15", shapes)


def test_write_is_atomic_and_refuses_overwrite(tiny_sd15, tmp_path):
    lora = random_lora(tiny_sd15, "sd15", rank=2)
    path = write_lora(lora, tmp_path / "w.safetensors")
    before = path.read_bytes()
    from studio.core.errors import StudioError

    with pytest.raises(StudioError, match="already exists"):
        write_lora(lora, path)
    assert path.read_bytes() == before
    assert [p.name for p in tmp_path.iterdir()] == ["w.safetensors"]  # no temp files left behind
