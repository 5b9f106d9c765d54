"""LyCORIS (LoHa, LoKr, Tucker, DoRA), PEFT folders and LDM-named SD1.5 files: read as their makers mean them.

The reference is always another implementation: lycoris-lora's own modules (their forward on the model)
for LyCORIS files, peft's own model for PEFT files and DoRA, and our plain LoRA for renamed keys.
"""

import copy
import json

import pytest
import torch
from peft import LoraConfig, get_peft_model, get_peft_model_state_dict
from safetensors.torch import save_file

from studio.core.errors import BadFileError, KeyMismatchError
from studio.core.keys import kohya_module_name, unet_diffusers_to_ldm
from studio.core.lora_files import read_lora, write_lora
from studio.core.lora_summary import summarize_lora
from studio.core.modules import apply_to_pipeline
from tests.fixtures.lora_random import random_lora
from tests.fixtures.lycoris_files import KINDS, lycoris_lora
from tests.probes import unet_output

EXPECTED_KIND = {
    "loha": "LoHa", "loha_tucker": "LoHa", "lokr": "LoKr", "lokr_decomposed": "LoKr", "lokr_full": "LoKr",
    "tucker": "LoCon (Tucker)", "dora": "DoRA", "dora_out": "DoRA", "loha_dora": "LoHa (DoRA)",
}  # fmt: skip


@pytest.fixture(params=["sd15", "sdxl"])
def family_pipe(request, tiny_sd15, tiny_sdxl):
    return request.param, (tiny_sd15 if request.param == "sd15" else tiny_sdxl)


@pytest.mark.parametrize("kind", list(KINDS))
def test_lycoris_file_changes_the_model_as_lycoris_does(family_pipe, kind, tmp_path):
    family, pipe = family_pipe
    state, applied = lycoris_lora(pipe, family, kind)
    path = tmp_path / f"{kind}.safetensors"
    save_file(state, str(path))
    base = unet_output(pipe)
    with applied():
        reference = unet_output(pipe)
    assert (reference - base).abs().max() > 1e-2  # the file does something

    lora = read_lora(path)
    summary = summarize_lora(path)  # what inspect reads, without torch
    assert lora.family == summary.family == family
    assert EXPECTED_KIND[kind] in lora.kinds and lora.kinds == summary.kinds
    assert lora.ranks == summary.ranks and summary.alphas == lora.alphas
    ours = copy.deepcopy(pipe)
    apply_to_pipeline(lora, ours)
    torch.testing.assert_close(unet_output(ours), reference, atol=2e-5, rtol=1e-4)


@pytest.mark.parametrize("kind", ["loha", "lokr", "dora", "tucker"])
def test_lycoris_kinds_written_back_read_the_same(tiny_sdxl, kind, tmp_path):
    state, _ = lycoris_lora(tiny_sdxl, "sdxl", kind)
    save_file(state, str(tmp_path / "in.safetensors"))
    lora = read_lora(tmp_path / "in.safetensors")
    again = read_lora(write_lora(lora, tmp_path / "out.safetensors"))
    assert again.kinds == lora.kinds
    for path, m in lora.modules.items():
        base = torch.randn(m.weight_shape) if m.needs_base else None
        torch.testing.assert_close(again.modules[path].delta(base), m.delta(base))
    if kind == "tucker":  # a Tucker core folds into plain factors exactly: PEFT keys can hold it
        peft = read_lora(write_lora(lora, tmp_path / "peft.safetensors", fmt="peft"))
        for path, m in lora.modules.items():
            torch.testing.assert_close(peft.modules[path].delta().reshape(m.weight_shape), m.delta())
    else:
        with pytest.raises(Exception, match="PEFT key layout cannot hold"):
            write_lora(lora, tmp_path / "peft.safetensors", fmt="peft")


def peft_unet(pipe, tmp_path, **config):
    """A peft LoRA (or DoRA) on the tiny UNet with random non-zero factors, saved by peft itself."""
    model = get_peft_model(copy.deepcopy(pipe.unet), LoraConfig(**config))
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_" in name:
                p.copy_(torch.randn_like(p) * 0.1)
            elif "magnitude" in name:
                p.mul_(1.2)
    model.save_pretrained(tmp_path / "adapter")
    return model, tmp_path / "adapter"


def assert_acts_like_peft(pipe, lora, model) -> None:
    """The LoRA merged into the pipeline's weights gives what peft's own model computes."""
    ours = copy.deepcopy(pipe)
    apply_to_pipeline(lora, ours)
    theirs = copy.copy(pipe)
    theirs.unet = model
    torch.testing.assert_close(unet_output(ours), unet_output(theirs), atol=2e-5, rtol=1e-4)


def test_peft_folder_is_read_at_its_true_strength(tiny_sd15, tmp_path):
    """adapter_config.json with lora_alpha 8, r 4 (scale 2) and an alpha_pattern, as peft's save_pretrained
    writes it; the reference is peft's own model."""
    config = dict(r=4, lora_alpha=8, target_modules=["to_q", "to_k", "proj_in"], alpha_pattern={"to_k": 2})
    model, folder = peft_unet(tiny_sd15, tmp_path, **config)
    saved = json.loads((folder / "adapter_config.json").read_text())
    assert saved["lora_alpha"] == 8 and saved["alpha_pattern"] == {"to_k": 2}
    lora = read_lora(folder)
    assert lora.source_format == "peft" and set(lora.alphas) == {2.0, 8.0}
    assert summarize_lora(folder).alphas == lora.alphas
    assert_acts_like_peft(tiny_sd15, lora, model)


def test_peft_rslora_and_rank_pattern(tiny_sd15, tmp_path):
    config = dict(
        r=4, lora_alpha=8, use_rslora=True, target_modules=["to_q", "to_v"], rank_pattern={"to_v": 2}
    )
    model, folder = peft_unet(tiny_sd15, tmp_path, **config)
    lora = read_lora(folder)
    assert lora.ranks == [2, 4]
    assert_acts_like_peft(tiny_sd15, lora, model)


def test_peft_dora_keys(tiny_sd15, tmp_path):
    """PEFT's DoRA spelling (lora_magnitude_vector, normalised per output row) in a diffusers-style file."""
    model, _ = peft_unet(
        tiny_sd15, tmp_path, r=4, lora_alpha=4, use_dora=True, target_modules=["to_q", "to_k"]
    )
    state = {
        "unet." + k.removeprefix("base_model.model."): v for k, v in get_peft_model_state_dict(model).items()
    }
    assert any("lora_magnitude_vector" in k for k in state)
    save_file(state, str(tmp_path / "dora.safetensors"))
    lora = read_lora(tmp_path / "dora.safetensors")
    assert lora.kinds == ["DoRA"]
    assert_acts_like_peft(tiny_sd15, lora, model)


def test_sd15_file_with_original_ldm_names(tiny_sd15, tmp_path):
    """lora_unet_input_blocks_1_1_proj_in...: SD1.5 modules named by the original UNet paths."""
    lora = random_lora(tiny_sd15, "sd15", rank=4, alpha=2.0, conv=True)
    kohya = write_lora(lora, tmp_path / "diffusers_names.safetensors")
    state = read_lora(kohya)
    renamed = {}
    for path, m in state.modules.items():
        component, _, rest = path.partition(".")
        name = kohya_module_name(path, "sd15")
        if component == "unet":
            name = "lora_unet_" + unet_diffusers_to_ldm(rest, "sd15").replace(".", "_")
        renamed |= {
            f"{name}.lora_down.weight": m.down,
            f"{name}.lora_up.weight": m.up,
            f"{name}.alpha": torch.tensor(2.0),
        }
    assert any(k.startswith("lora_unet_input_blocks_1_1_") for k in renamed)
    save_file(renamed, str(tmp_path / "ldm_names.safetensors"))
    back = read_lora(tmp_path / "ldm_names.safetensors")
    assert back.family == "sd15" and set(back.modules) == set(lora.modules)
    for path, m in lora.modules.items():
        torch.testing.assert_close(back.modules[path].delta(), m.delta())


def test_damaged_lycoris_files_get_one_line_errors(tiny_sd15, tmp_path):
    state, _ = lycoris_lora(tiny_sd15, "sd15", "loha")
    key = next(k for k in state if k.endswith("hada_w2_b"))
    cases = {
        "missing": {k: v for k, v in state.items() if k != key},
        "shape": state | {key: torch.zeros(3, 7)},
        "nan": state | {key: torch.full_like(state[key], float("nan"))},
        "int": state | {key: state[key].to(torch.int32)},
        "oft": {"lora_unet_mid_block_attentions_0_proj_in.oft_blocks": torch.zeros(4, 8, 8)},
    }
    for name, broken in cases.items():
        path = tmp_path / f"{name}.safetensors"
        save_file(broken, str(path))
        for read in (read_lora, summarize_lora):
            with pytest.raises((BadFileError, KeyMismatchError)) as err:
                read(path)
            assert str(path) in str(err.value) and "\n" not in str(err.value), (name, str(err.value))


def test_lokr_without_alpha_is_scale_one(tiny_sd15, tmp_path):
    """ComfyUI and LyCORIS read a LoKr without alpha at scale 1: kron(w1, w2a @ w2b) as it stands."""
    state, _ = lycoris_lora(tiny_sd15, "sd15", "lokr_decomposed")
    bare = {k: v for k, v in state.items() if not k.endswith(".alpha")}
    save_file(bare, str(tmp_path / "bare.safetensors"))
    lora = read_lora(tmp_path / "bare.safetensors")
    for path, m in lora.modules.items():
        f = m.factors_
        w1 = f["lokr_w1"] if "lokr_w1" in f else f["lokr_w1_a"] @ f["lokr_w1_b"]
        w2 = f["lokr_w2"] if "lokr_w2" in f else f["lokr_w2_a"] @ f["lokr_w2_b"].flatten(1)
        expected = torch.kron(w1, w2.flatten(1))
        torch.testing.assert_close(m.delta().flatten(1), expected, msg=path)


def test_generate_with_a_lycoris_file_fused_and_unfused(tiny_sd15_dir, tiny_sd15, tmp_path):
    """`lora-studio generate --lora loha.safetensors` as a user runs it: the LoRA shows, fused or not."""
    import numpy as np
    from PIL import Image

    from studio.app.cli import main

    state, _ = lycoris_lora(tiny_sd15, "sd15", "loha")
    save_file(state, str(tmp_path / "loha.safetensors"))
    common = ["generate", "--model", str(tiny_sd15_dir), "--prompt", "a red circle", "--steps", "2",
              "--seed", "3", "--width", "64", "--height", "64"]  # fmt: skip
    pixels = {}
    for name, extra in (("base", []), ("unfused", ["--lora", f"{tmp_path / 'loha.safetensors'}:0.8", "--fuse", "off"]),
                        ("fused", ["--lora", f"{tmp_path / 'loha.safetensors'}:0.8", "--fuse", "on"])):  # fmt: skip
        assert main([*common, *extra, "--out", str(tmp_path / name)]) == 0
        (png,) = (tmp_path / name).glob("*.png")
        pixels[name] = np.asarray(Image.open(png), dtype=np.float32)
    assert np.abs(pixels["unfused"] - pixels["base"]).max() > 2
    assert np.abs(pixels["unfused"] - pixels["fused"]).max() <= 2
