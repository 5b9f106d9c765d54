"""ZipLoRA: the layer follows peft's contract, the objective goes down, the saved file is the merged model."""

import pytest
import torch
from PIL import Image
from torch import nn

from merging import MergeConfig, read_mergers, run_merge
from merging.sources import Factors, load_sources
from merging.ziplora_layer import ZipLoraLayer, ZipLoraModel
from studio.app.workspace import Workspace
from studio.core.errors import ConfigError, StudioError
from studio.core.lora_files import LoraSet, read_lora, write_lora
from studio.core.lora_ref import parse_lora_ref
from studio.core.modules import model_module_shapes
from studio.core.options import build_config
from tests.fixtures.lora_random import random_lora
from tests.probes import unet_output

FAST = {"steps": 6, "reference_count": 1, "reference_steps": 2, "eval_samples": 2, "probes": 8}


@pytest.mark.parametrize("base", [nn.Linear(6, 5), nn.Conv2d(3, 4, 3, padding=1, stride=2)])
def test_layer_contract(base):
    """Merged forward == base + sum of get_delta_weight; merge/unmerge keep outputs; masks pick adapters."""
    g = torch.Generator().manual_seed(0)
    in_flat = base.weight[0].numel()
    layer = ZipLoraLayer(base)
    layer.update_layer(
        "s0",
        Factors(torch.randn(base.weight.shape[0], 2, generator=g), torch.randn(2, in_flat, generator=g)),
        True,
    )
    layer.update_layer(
        "s1",
        Factors(torch.randn(base.weight.shape[0], 3, generator=g), torch.randn(3, in_flat, generator=g)),
        True,
    )
    with torch.no_grad():
        for m in layer.merger.values():
            m.copy_(torch.rand(m.shape, generator=g))
    x = (
        torch.randn(2, 4, 6, generator=g)
        if isinstance(base, nn.Linear)
        else torch.randn(2, 3, 8, 8, generator=g)
    )
    fn = (
        nn.functional.linear
        if isinstance(base, nn.Linear)
        else (lambda x, w: base._conv_forward(x, w, base.bias))
    )
    with torch.no_grad():
        full = fn(x, base.weight + layer.get_delta_weight("s0") + layer.get_delta_weight("s1"))
        if isinstance(base, nn.Linear):
            full = full + base.bias
        out = layer(x)
        torch.testing.assert_close(out, full, atol=1e-5, rtol=1e-5)
        layer.merge()
        torch.testing.assert_close(layer(x), out, atol=1e-5, rtol=1e-5)
        layer.unmerge()
        torch.testing.assert_close(layer(x), out, atol=1e-5, rtol=1e-5)
        layer.disabled = True
        torch.testing.assert_close(layer(x), base(x))
        layer.disabled, layer.use_mergers = False, False
        layer.sample_mask = torch.tensor([[1.0, 1, 0, 0, 0], [0, 0, 1, 1, 1]])  # sample 0: s0, sample 1: s1
        picked = layer(x)
        layer.sample_mask = None
        for b, name in enumerate(("s0", "s1")):
            delta = layer.lora_B[name] @ layer.lora_A[name].flatten(1)
            expect = fn(x[b : b + 1], base.weight + delta.reshape(base.weight.shape))
            if isinstance(base, nn.Linear):
                expect = expect + base.bias
            torch.testing.assert_close(picked[b : b + 1], expect, atol=1e-5, rtol=1e-5)


def _pair(pipe, family, tmp_path, targets_b=None, scale=0.3):
    a = random_lora(pipe, family, rank=4, alpha=2.0, seed=1, scale=scale, text_encoder=False)
    b = random_lora(pipe, family, rank=2, seed=2, scale=scale, text_encoder=False, targets=targets_b)
    return write_lora(a, tmp_path / "subject.safetensors"), write_lora(
        b, tmp_path / "style.safetensors", fmt="peft"
    )


def test_ziplora_lowers_the_objective_and_its_file_is_the_merged_model(tiny_sd15, fresh_sd15, tmp_path):
    pa, pb = _pair(tiny_sd15, "sd15", tmp_path)
    ws = Workspace.create(tmp_path / "ws")
    out = ws.loras / "zip.safetensors"
    cfg = build_config(
        MergeConfig, sources=[str(pa), f"{pb}:0.8"], method="ziplora", model="unused", out=str(out),
        prompts=["a sks dog", "a cat in zwx style"], lr=0.05, **FAST,
    )  # fmt: skip
    before = unet_output(tiny_sd15)
    result = run_merge(cfg, pipe=tiny_sd15)
    assert torch.equal(unet_output(tiny_sd15), before), "the given pipeline is left as it was"

    info = result.report.details["ziplora"]
    losses = [h["loss"] for h in info["history"]]
    assert losses[-1] < losses[0]
    assert info["objective"]["ziplora"] < info["objective"]["plain_sum"]
    assert all(row.model_error < row.model_error_sum for row in result.report.sources)
    assert result.report.ranks == [6]
    assert result.report.warnings == []

    # rebuild the merged model from the sources and the mergers stored in the file's metadata
    mergers = read_mergers(out)
    assert set(mergers) == set(read_lora(pa).modules) and result.sidecar is not None
    assert ws.lora_files() == ["loras/zip.safetensors"], "the mergers' sidecar is not offered as a LoRA"
    sources, _ = load_sources([parse_lora_ref(str(pa)), parse_lora_ref(f"{pb}:0.8")])
    model = ZipLoraModel(fresh_sd15, {f"s{i}": s.factors() for i, s in enumerate(sources)})
    model.load_mergers({p: {f"s{k}": v for k, v in per.items()} for p, per in mergers.items()})
    with model.installed():
        model.set_mode("merged")
        zipped = unet_output(fresh_sd15)
    assert (zipped - before).abs().max() > 1e-2
    fresh_sd15.load_lora_weights(str(out), adapter_name="zip")  # diffusers, as any user loads it
    torch.testing.assert_close(unet_output(fresh_sd15), zipped, atol=1e-4, rtol=1e-4)


def test_a_fit_that_only_fades_the_loras_says_so(tiny_sd15, tmp_path):
    """A similarity term far above the reconstruction shrinks every merger alike, and the strong LoRA's
    effect is kept worse than by the plain sum (the weak one barely touches it there): the report warns."""
    strong = random_lora(tiny_sd15, "sd15", rank=4, seed=1, scale=0.3, text_encoder=False)
    weak = random_lora(tiny_sd15, "sd15", rank=4, seed=2, scale=0.003, text_encoder=False)
    pa = write_lora(strong, tmp_path / "strong.safetensors")
    pb = write_lora(weak, tmp_path / "weak.safetensors")
    cfg = build_config(
        MergeConfig, sources=[str(pa), str(pb)], method="ziplora", model="unused",
        out=str(tmp_path / "zip.safetensors"), prompts=["a sks dog", "a cat in zwx style"], lr=0.1,
        similarity_weight=100.0, **FAST,
    )  # fmt: skip
    result = run_merge(cfg, pipe=tiny_sd15)
    faded = [w for w in result.report.warnings if w.startswith("the mergers faded every LoRA")]
    assert len(faded) == 1 and "--similarity-weight" in faded[0]
    worse = [w for w in result.report.warnings if "worse than the plain sum" in w]
    assert len(worse) == 1 and "strong.safetensors's effect" in worse[0] and "--method concat" in worse[0]
    strong_row = result.report.sources[0]
    assert strong_row.model_error > 1.1 * strong_row.model_error_sum


def test_a_fit_that_diverges_stops_with_a_clear_error_and_writes_nothing(tiny_sd15, tmp_path):
    pa, pb = _pair(tiny_sd15, "sd15", tmp_path)
    out = tmp_path / "zip.safetensors"
    cfg = build_config(
        MergeConfig, sources=[str(pa), str(pb)], method="ziplora", model="unused", out=str(out),
        prompts=["a sks dog", "a cat in zwx style"], lr=1e30, **FAST,
    )  # fmt: skip
    before = unet_output(tiny_sd15)
    with pytest.raises(
        StudioError, match=r"the fit diverged and nothing was written. Lower --lr \(now 1e\+30\)"
    ):
        run_merge(cfg, pipe=tiny_sd15)
    assert not out.exists() and not list(tmp_path.glob("zip*"))
    assert torch.equal(unet_output(tiny_sd15), before), "the given pipeline is left as it was"
    fast = build_config(
        MergeConfig, sources=[str(pa), str(pb)], method="ziplora-fast", model="unused", out=str(out),
        prompts=["a sks dog", "a cat in zwx style"], fast_lr=1e30, **FAST,
    )  # fmt: skip
    with pytest.raises(StudioError, match=r"Lower --fast-lr \(now 1e\+30\)"):
        run_merge(fast, pipe=tiny_sd15)
    assert not list(tmp_path.glob("zip*"))


def test_ziplora_fast_sdxl_and_layers_of_one_lora_stay_as_they_are(tiny_sdxl, tmp_path):
    only_attn1 = [p for p in model_module_shapes(tiny_sdxl) if ".attn1." in p]
    pa, pb = _pair(tiny_sdxl, "sdxl", tmp_path, targets_b=only_attn1, scale=0.12)
    refs = tmp_path / "subject_images"  # the subject's own images; the style's are generated from its prompt
    refs.mkdir()
    for i in range(2):
        pixels = torch.rand(64, 64, 3, generator=torch.Generator().manual_seed(i))
        Image.fromarray((pixels * 255).byte().numpy()).save(refs / f"{i}.png")
    cfg = build_config(
        MergeConfig, sources=[str(pa), str(pb)], method="ziplora-fast", model="unused",
        out=str(tmp_path / "fast.safetensors"), prompts=["a sks dog", "zwx style"],
        references=[str(refs), ""], fast_steps=60, **FAST,
    )  # fmt: skip
    result = run_merge(cfg, pipe=tiny_sdxl)
    info = result.report.details["ziplora"]
    assert info["history"][-1]["loss"] < info["history"][0]["loss"]
    assert info["objective"]["ziplora"] < info["objective"]["plain_sum"]
    subject = read_lora(pa)
    for path, m in result.lora.modules.items():
        if ".attn1." in path:
            assert m.rank == 6
        else:  # only the subject LoRA acts here: its merger stayed at 1, the module is that LoRA
            torch.testing.assert_close(
                m.delta().flatten(1), subject.modules[path].delta().flatten(1), atol=1e-6, rtol=1e-5
            )


def test_ziplora_refusals(tiny_sd15, tmp_path):
    shapes = model_module_shapes(tiny_sd15)
    attn1 = [p for p in shapes if ".attn1." in p]
    attn2 = [p for p in shapes if ".attn2." in p]
    pa = write_lora(random_lora(tiny_sd15, "sd15", targets=attn1), tmp_path / "a.safetensors")
    pb = write_lora(random_lora(tiny_sd15, "sd15", targets=attn2), tmp_path / "b.safetensors")
    base = {"method": "ziplora", "model": "unused", "out": str(tmp_path / "z.safetensors")}
    with pytest.raises(StudioError, match="nothing in common.*concat"):
        run_merge(
            build_config(MergeConfig, sources=[str(pa), str(pb)], prompts=["a", "b"], **base), pipe=tiny_sd15
        )
    with pytest.raises(ConfigError, match="one prompt per source"):
        run_merge(build_config(MergeConfig, sources=[str(pa), str(pb)], prompts=["a"], **base))
    with pytest.raises(ConfigError, match="two or more"):
        run_merge(build_config(MergeConfig, sources=[str(pa)], prompts=["a"], **base))
    missing = str(tmp_path / "no_images")
    with pytest.raises(ConfigError, match="no_images does not exist"):
        cfg = build_config(
            MergeConfig, sources=[str(pa), str(pa)], prompts=["a", "a"], references=[missing, ""], **base
        )
        run_merge(cfg, pipe=tiny_sd15)
    with pytest.raises(ConfigError, match="--model"):
        run_merge(build_config(MergeConfig, sources=[str(pa), str(pb)], prompts=["a", "b"], method="ziplora",
                               out=str(tmp_path / "z.safetensors")))  # fmt: skip
    assert not (tmp_path / "z.safetensors").exists()
    assert isinstance(LoraSet, type)


@pytest.mark.gpu
def test_ziplora_on_cuda(tmp_path):
    from tests.fixtures.tiny import tiny_sd15_pipeline

    pipe = tiny_sd15_pipeline(seed=0).to("cuda")
    pa, pb = _pair(pipe, "sd15", tmp_path)
    out = tmp_path / "zip.safetensors"
    cfg = build_config(
        MergeConfig, sources=[str(pa), str(pb)], method="ziplora", model="unused", out=str(out),
        prompts=["a sks dog", "zwx style"], device="cuda", **FAST,
    )  # fmt: skip
    result = run_merge(cfg, pipe=pipe)
    info = result.report.details["ziplora"]
    assert info["objective"]["ziplora"] < info["objective"]["plain_sum"]
    assert read_lora(out).ranks == [6]
