"""LoRA adapters in a pipeline: exact weights and block weights, per-sample adapters, fusing, caching."""

import copy
import os

import numpy as np
import pytest
import torch

import studio.generation.adapters
from studio.core.errors import FamilyMismatchError
from studio.core.lora_files import LoraSet, read_lora, write_lora
from studio.core.modules import apply_to_pipeline, model_module_shapes
from studio.generation.adapters import AdapterPool
from tests.fixtures.lora_random import default_targets, random_lora


def image(pipe, seed=0, steps=2):
    g = torch.Generator().manual_seed(seed)
    return pipe(
        "a red fox", num_inference_steps=steps, height=64, width=64, generator=g, output_type="np"
    ).images[0]


def save(lora: LoraSet, path, fmt="kohya"):
    return write_lora(lora, path, fmt=fmt)


def small_lora(pipe, family, seed, conv=False, **kwargs) -> LoraSet:
    """A LoRA on a sample of modules (UNet attention and 1x1 proj, text encoder, 3x3 convs when conv)."""
    ends = ("to_q", "to_v", "proj_in", "q_proj") + (("conv1", "downsamplers.0.conv") if conv else ())
    targets = [p for p in default_targets(model_module_shapes(pipe), conv=conv) if p.endswith(ends)]
    return random_lora(pipe, family, targets=targets, seed=seed, conv=conv, **kwargs)


def test_stack_equals_merged_weights(fresh_sdxl, tmp_path):
    """SDXL here (kohya files name its modules by the original UNet paths); SD1.5 in test_generate."""
    family, pipe = "sdxl", fresh_sdxl
    # kohya file with conv modules and alpha != rank; PEFT file with another rank and block weights
    a = save(
        random_lora(pipe, family, rank=4, alpha=2.0, conv=True, seed=1, scale=0.1), tmp_path / "a.safetensors"
    )
    b = save(random_lora(pipe, family, rank=8, seed=2, scale=0.1), tmp_path / "b.safetensors", fmt="peft")
    block_weights = {"BASE": 0.5, "OUT04": 0.0, "OUT05": 2.0, "M00": -1.0}
    base = image(pipe)
    pool = AdapterPool(pipe, family)
    pool.activate([(pool.load(a), 0.7, None), (pool.load(b), -0.4, block_weights)])
    stacked = image(pipe)

    pool.activate([])  # adapters stay loaded but nothing acts: the reference is merged into the base weights
    # equal to float32 rounding: BLAS may take another code path once the layers are wrapped (seen with MKL
    # on Intel CPUs), while any LoRA that still acted would move pixels by more than 0.02 (asserted below)
    np.testing.assert_allclose(image(pipe), base, rtol=0, atol=1e-5)
    apply_to_pipeline(read_lora(a), pipe, 0.7)
    apply_to_pipeline(read_lora(b), pipe, -0.4, block_weights)
    merged = image(pipe)

    assert np.abs(stacked - base).max() > 0.02  # the LoRAs do change the image
    np.testing.assert_allclose(stacked, merged, atol=2e-5)


def test_per_sample_adapters_match_one_adapter_at_a_time(fresh_sd15, tmp_path):
    """Batched composite's building block: sample i runs through adapter i only, conv layers included."""
    conv_lora = small_lora(fresh_sd15, "sd15", 4, conv=True, scale=0.2)
    assert any(m.is_conv and m.down.shape[2:] == (3, 3) for m in conv_lora.modules.values())
    pool = AdapterPool(fresh_sd15, "sd15")
    a = pool.load(save(conv_lora, tmp_path / "a.safetensors"))
    b = pool.load(save(small_lora(fresh_sd15, "sd15", 5, scale=0.2), tmp_path / "b.safetensors"))
    pool.activate([(a, 0.9, None), (b, 1.1, None)])
    g = torch.Generator().manual_seed(0)
    x = torch.randn(2, 4, 8, 8, generator=g)
    context = torch.randn(2, 77, 32, generator=g)
    unet = fresh_sd15.unet
    with torch.no_grad():
        pool.set_active([a.name])
        only_a = unet(x, 500, context).sample
        pool.set_active([b.name])  # a's layers, conv ones included, are now inactive
        only_b = unet(x, 500, context).sample
        with pool.per_sample([a.name, b.name]):
            mixed = unet(x, 500, context).sample
    torch.testing.assert_close(mixed[0], only_a[0], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(mixed[1], only_b[1], atol=1e-5, rtol=1e-5)
    assert (only_a[0] - only_b[0]).abs().max() > 1e-3


def test_fuse_gives_the_same_image_and_unfuses_back(fresh_sd15, tmp_path):
    pool = AdapterPool(fresh_sd15, "sd15")
    a = pool.load(
        save(random_lora(fresh_sd15, "sd15", conv=True, seed=6, scale=0.1), tmp_path / "a.safetensors")
    )
    pool.activate([(a, 0.8, {"OUT05": 0.0})])
    unfused = image(fresh_sd15)
    pool.fuse(("a", 0.8))
    assert pool.fused_signature == ("a", 0.8)
    fused = image(fresh_sd15)
    pool.unfuse()
    np.testing.assert_allclose(fused, unfused, atol=2e-5)
    np.testing.assert_allclose(image(fresh_sd15), unfused, atol=2e-5)


def test_files_are_read_once_and_again_when_changed(fresh_sd15, tmp_path, monkeypatch):
    reads = []
    real = studio.generation.adapters.read_lora
    monkeypatch.setattr(
        studio.generation.adapters, "read_lora", lambda *a, **k: reads.append(a[0]) or real(*a, **k)
    )
    path = save(small_lora(fresh_sd15, "sd15", 7), tmp_path / "a.safetensors")
    pool = AdapterPool(fresh_sd15, "sd15")
    first = pool.load(path)
    for weight in (0.2, 0.5, 1.0):
        pool.activate([(pool.load(path), weight, None)])
    assert len(reads) == 1 and pool.reads == 1

    write_lora(small_lora(fresh_sd15, "sd15", 8), path, overwrite=True)
    os.utime(path, ns=(first.key[1] + 10**9, first.key[1] + 10**9))
    second = pool.load(path)
    assert len(reads) == 2 and second.name != first.name
    assert [a.name for a in pool.adapters] == [second.name]
    assert first.name not in fresh_sd15.unet.peft_config


def test_least_recently_used_adapter_is_evicted(fresh_sd15, tmp_path):
    pool = AdapterPool(fresh_sd15, "sd15", max_adapters=2)
    files = [save(small_lora(fresh_sd15, "sd15", s), tmp_path / f"{s}.safetensors") for s in range(3)]
    a, b = pool.load(files[0]), pool.load(files[1])
    pool.activate([(a, 1.0, None)])
    c = pool.load(files[2])  # loading never evicts: a stack may need more adapters than max_adapters
    assert [x.name for x in pool.adapters] == [a.name, b.name, c.name]
    pool.activate([(a, 1.0, None), (c, 1.0, None)])  # b is the least recently used one not in the stack
    assert [x.name for x in pool.adapters] == [a.name, c.name]
    assert b.name not in fresh_sd15.unet.peft_config
    layers = [m for m in fresh_sd15.unet.modules() if hasattr(m, "lora_A")]
    assert not any(b.name in m.lora_A for m in layers)


def test_lora_of_the_other_family_is_refused(fresh_sd15, tiny_sdxl, tmp_path):
    path = save(small_lora(tiny_sdxl, "sdxl", 9), tmp_path / "xl_style.safetensors")
    pool = AdapterPool(fresh_sd15, "sd15")
    with pytest.raises(FamilyMismatchError, match="xl_style.safetensors.*SDXL LoRA.*Stable Diffusion 1.5"):
        pool.load(path)
    assert pool.adapters == [] and not hasattr(fresh_sd15.unet, "peft_config")


@pytest.mark.parametrize("kind", ["loha", "lokr_decomposed", "dora", "loha_tucker"])
def test_lycoris_adapters_unfused_fused_and_per_sample(fresh_sdxl, kind, tmp_path):
    """LyCORIS files in a stack beside a plain LoRA on the same modules: at weight 1 the model does what
    lycoris-lora's own modules do; at other weights and block weights unfused = fused = merged into the
    weights; per-sample runs give each sample its own adapter."""
    from safetensors.torch import save_file

    from tests.fixtures.lycoris_files import lycoris_lora
    from tests.probes import unet_output

    pipe = fresh_sdxl
    state, applied = lycoris_lora(pipe, "sdxl", kind)
    lyco = tmp_path / f"{kind}.safetensors"
    save_file(state, str(lyco))
    with applied():
        reference = unet_output(pipe)
    plain = save(small_lora(pipe, "sdxl", 3, scale=0.2), tmp_path / "plain.safetensors")
    pool = AdapterPool(pipe, "sdxl")
    a, b = pool.load(lyco), pool.load(plain)
    assert any(k in a.kinds for k in ("LoHa", "LoKr", "DoRA"))
    pool.activate([(a, 1.0, None)])
    torch.testing.assert_close(unet_output(pipe), reference, atol=2e-5, rtol=1e-4)

    block_weights = {"BASE": 0.5, "IN04": 2.0}
    pool.activate([(a, 0.6, block_weights), (b, -0.7, None)])
    unfused = unet_output(pipe)
    pool.fuse(("ab",))
    fused = unet_output(pipe)
    pool.unfuse()
    torch.testing.assert_close(unet_output(pipe), unfused)
    pool.activate([])
    merged = copy.deepcopy(pipe)
    apply_to_pipeline(read_lora(lyco), merged, 0.6, block_weights)
    apply_to_pipeline(read_lora(plain), merged, -0.7)
    for got in (unfused, fused):
        torch.testing.assert_close(got, unet_output(merged), atol=2e-5, rtol=1e-4)

    pool.activate([(a, 1.0, None), (b, 1.0, None)])
    g = torch.Generator().manual_seed(0)
    cfg = pipe.unet.config
    x, context = (
        torch.randn(2, 4, 8, 8, generator=g),
        torch.randn(2, 77, cfg.cross_attention_dim, generator=g),
    )
    pooled = cfg.projection_class_embeddings_input_dim - 6 * cfg.addition_time_embed_dim
    extra = {"text_embeds": torch.randn(2, pooled, generator=g), "time_ids": torch.ones(2, 6) * 64}
    with torch.no_grad():
        pool.set_active([a.name])
        only_a = pipe.unet(x, 500, context, added_cond_kwargs=extra).sample
        pool.set_active([b.name])
        only_b = pipe.unet(x, 500, context, added_cond_kwargs=extra).sample
        with pool.per_sample([a.name, b.name]):
            mixed = pipe.unet(x, 500, context, added_cond_kwargs=extra).sample
    torch.testing.assert_close(mixed[0], only_a[0], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(mixed[1], only_b[1], atol=1e-5, rtol=1e-5)
