"""network_type: LoCon, LoHa, LoKr and DoRA train, save in the LyCORIS / kohya layout, and read back exactly.

Independent readers: lycoris-lora's kohya loader (its own key map over the diffusers SD1.5 UNet) and, for
plain LoRA / LoCon, diffusers' load_lora_weights; the reference output is the trained model itself.
"""

from __future__ import annotations

import copy

import pytest
import torch
from safetensors import safe_open

from studio.core.errors import ConfigError
from studio.core.lora_files import read_lora
from studio.core.modules import apply_to_pipeline
from studio.core.options import build_config
from tests.fixtures.tiny import tiny_sd15_pipeline
from tests.probes import unet_output
from tests.trainers.conftest import TINY
from trainers.config import TrainConfig
from trainers.loop import train

FAST = {**TINY, "max_steps": 2, "learning_rate": 5e-2, "rank": 4, "alpha": 2, "save_dtype": "fp32"}
SUFFIXES = {
    "locon": {"lora_down.weight", "lora_up.weight", "alpha"},
    "loha": {"hada_w1_a", "hada_w1_b", "hada_w2_a", "hada_w2_b", "alpha"},
    "lokr": {"lokr_w1", "lokr_w2", "lokr_w2_a", "lokr_w2_b", "alpha"},
    "dora": {"lora_down.weight", "lora_up.weight", "alpha", "dora_scale"},
}
KIND = {"locon": "LoCon", "loha": "LoHa", "lokr": "LoKr", "dora": "DoRA"}


def trained(family, network_type, tmp_path, images, **options):
    pipe = tiny_sd15_pipeline(seed=0) if family == "sd15" else None
    if pipe is None:
        from tests.fixtures.tiny import tiny_sdxl_pipeline

        pipe = tiny_sdxl_pipeline(seed=0)
    cfg = build_config(TrainConfig, {**FAST, "output_dir": str(tmp_path / network_type), "method": "style",
                                     "data_dir": str(images), "prompt": "sks style", "conv_rank": 4,
                                     "network_type": network_type, **options})  # fmt: skip
    result = train(cfg, pipe=pipe, family=family)
    return pipe, result


def lycoris_load(unet, path) -> list:
    """What lycoris.kohya.create_network_from_weights does for the UNet (its constructor also scans the
    model for new modules to train, which the tiny UNet trips): kohya names from module names, then
    lycoris' own get_module / make_module per module, applied to the model."""
    from lycoris.kohya import get_module, make_module
    from safetensors.torch import load_file

    weights = load_file(str(path))
    names = {k.split(".")[0] for k in weights if k.startswith("lora_unet")}
    loaded = []
    for name, module in unet.named_modules():
        lora_name = f"lora_unet_{name}".replace(".", "_")
        if lora_name in names:
            lyco_type, params = get_module(weights, lora_name)
            made = make_module(lyco_type, params, lora_name, module)
            made.multiplier = 1.0
            made.apply_to()
            loaded.append(made)
    return loaded


@torch.no_grad()
def a1111_dora(unet, path) -> int:
    """A1111's network_lora + apply_weight_decompose: W' = (W + s up@down) * dora_scale / ||W + s up@down||
    per input column, written into the weights; returns how many modules it changed."""
    from safetensors.torch import load_file

    weights = load_file(str(path))
    changed = 0
    for name, module in unet.named_modules():
        key = f"lora_unet_{name}".replace(".", "_")
        if f"{key}.dora_scale" not in weights:
            continue
        down, up = weights[f"{key}.lora_down.weight"], weights[f"{key}.lora_up.weight"]
        scale = float(weights[f"{key}.alpha"]) / down.shape[0]
        w = module.weight
        updown = (up.flatten(1) @ down.flatten(1)).reshape(w.shape[0], *down.shape[1:]) * scale
        merged = w + updown.reshape(w.shape)
        norm = merged.transpose(0, 1).reshape(merged.shape[1], -1).norm(dim=1, keepdim=True)
        norm = norm.reshape(merged.shape[1], *[1] * (w.dim() - 1)).transpose(0, 1)
        w.copy_(merged * (weights[f"{key}.dora_scale"] / norm))
        changed += 1
    return changed


@pytest.mark.parametrize("network_type", ["locon", "loha", "lokr", "dora"])
def test_network_types_save_what_lycoris_and_kohya_load(network_type, tmp_path, images):
    pipe, result = trained("sd15", network_type, tmp_path, images, train_text_encoder=True)
    reference = unet_output(pipe)  # the trained model, its layers still attached
    with safe_open(str(result.path), "pt") as f:
        keys, meta = list(f.keys()), f.metadata()
    suffixes = {k.split(".", 1)[1] for k in keys}
    assert suffixes <= SUFFIXES[network_type] and "alpha" in suffixes
    assert any(k.startswith("lora_te_") for k in keys) and any("resnets_0_conv1" in k for k in keys)
    if network_type != "locon":
        assert meta["ss_network_module"] == "lycoris.kohya"

    lora = read_lora(result.path)
    assert KIND[network_type] in lora.kinds
    fresh = tiny_sd15_pipeline(seed=0)
    ours = copy.deepcopy(fresh)
    apply_to_pipeline(lora, ours)
    torch.testing.assert_close(unet_output(ours), reference, atol=2e-5, rtol=1e-4)
    assert (unet_output(fresh) - reference).abs().max() > 1e-3  # training changed something

    if network_type == "locon":  # plain kohya LoCon: diffusers reads it too
        theirs = copy.deepcopy(fresh)
        theirs.load_lora_weights(str(result.path), adapter_name="x")
    elif network_type == "dora":  # A1111's DoRA (per input column), which LyCORIS' loader does not read
        theirs = copy.deepcopy(fresh)
        assert a1111_dora(theirs.unet, result.path) == sum(p.startswith("unet.") for p in lora.modules)
    else:  # lycoris-lora's own kohya loading: its key map over the diffusers UNet, its module parsing
        theirs = copy.deepcopy(fresh)
        assert len(lycoris_load(theirs.unet, result.path)) == sum(p.startswith("unet.") for p in lora.modules)
    torch.testing.assert_close(unet_output(theirs), reference, atol=2e-5, rtol=1e-4)


def test_sdxl_loha_round_trip(tmp_path, images):
    pipe, result = trained("sdxl", "loha", tmp_path, images)
    reference = unet_output(pipe)
    lora = read_lora(result.path)
    assert lora.family == "sdxl" and lora.kinds == ["LoHa"]
    from tests.fixtures.tiny import tiny_sdxl_pipeline

    ours = tiny_sdxl_pipeline(seed=0)
    apply_to_pipeline(lora, ours)
    torch.testing.assert_close(unet_output(ours), reference, atol=2e-5, rtol=1e-4)


def test_methods_that_need_plain_lora_refuse_other_types(tmp_path, images):
    with pytest.raises(ConfigError, match="orthogonal adaptation freezes LoRA's down factors"):
        trained("sd15", "loha", tmp_path, images, method="orthogonal")


def test_tensorboard_logs_beside_events(tmp_path, images):
    """log_with = tensorboard: the loss, learning rate and sample images, read back with TensorBoard's own
    reader."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    _, result = trained("sd15", "lora", tmp_path, images, log_with="tensorboard", max_steps=3,
                        sample_every=2, sample_prompts=["a sks shape"], sample_steps=1)  # fmt: skip
    logs = EventAccumulator(str(result.path.parent / "logs"), size_guidance={"images": 0})
    logs.Reload()
    assert [e.step for e in logs.Scalars("train/loss")] == [1, 2, 3]
    assert len(logs.Scalars("train/lr")) == 3
    images_logged = logs.Images("samples/0")
    assert [e.step for e in images_logged] == [2] and images_logged[0].width == 64
