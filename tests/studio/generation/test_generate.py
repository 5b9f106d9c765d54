"""Generation: LoRA stacks, block weights, B-LoRA, switch, composite, PNG parameters, the CLI, bad input."""

from pathlib import Path

import numpy as np
import pytest
from PIL import Image, PngImagePlugin

import studio.generation.adapters
import studio.generation.service
from studio.app.cli import main
from studio.core.blocks import block_of
from studio.core.errors import BadFileError, ConfigError, FamilyMismatchError, StudioError
from studio.core.lora_files import B_LORA_CONTENT, B_LORA_STYLE, LoraSet, read_lora, write_lora
from studio.core.modules import apply_to_pipeline, model_module_shapes
from studio.core.samplers import SCHEDULERS
from studio.generation import (
    GenerateConfig,
    GenerationEngine,
    GenerationService,
    LoraSpec,
    config_from_record,
)
from studio.generation.records import read_record, save_png
from tests.fixtures.lora_random import default_targets, random_lora
from tests.fixtures.tiny import tiny_sd15_pipeline, tiny_sdxl_pipeline


def cfg(**values) -> GenerateConfig:
    return GenerateConfig(**({"prompt": "a red fox", "steps": 2, "seed": 3, "scheduler": "Euler"} | values))


def pixels(result_or_image) -> np.ndarray:
    image = getattr(result_or_image, "image", result_or_image)
    return np.asarray(image.convert("RGB"), dtype=np.int16)


SOME = ("to_q", "to_v", "proj_out", "mlp.fc1")  # a smaller LoRA: cheaper to load, still UNet + text encoder


def some_targets(pipe) -> list[str]:
    return [p for p in default_targets(model_module_shapes(pipe)) if p.endswith(SOME)]


@pytest.fixture(scope="module")
def sd15_loras(tiny_sd15, tmp_path_factory):
    """Two SD1.5 LoRA files: kohya with every default and conv module and alpha != rank; PEFT, rank 8."""
    folder = tmp_path_factory.mktemp("sd15_loras")
    a = random_lora(tiny_sd15, "sd15", rank=4, alpha=2.0, conv=True, seed=1, scale=0.15)
    b = random_lora(tiny_sd15, "sd15", rank=8, seed=2, scale=0.2, targets=some_targets(tiny_sd15))
    return write_lora(a, folder / "a.safetensors"), write_lora(b, folder / "b.safetensors", fmt="peft")


@pytest.fixture(scope="module")
def small_loras(tiny_sd15, tmp_path_factory):
    """Two small SD1.5 LoRAs (kohya) for the service tests."""
    folder = tmp_path_factory.mktemp("small_loras")
    made = [
        random_lora(tiny_sd15, "sd15", seed=s, scale=0.25, targets=some_targets(tiny_sd15)) for s in (5, 6)
    ]
    return write_lora(made[0], folder / "a.safetensors"), write_lora(made[1], folder / "b.safetensors")


@pytest.fixture(scope="module")
def sdxl_loras(tiny_sdxl, tmp_path_factory):
    folder = tmp_path_factory.mktemp("sdxl_loras")
    a = random_lora(tiny_sdxl, "sdxl", rank=4, seed=3, scale=0.2, targets=some_targets(tiny_sdxl))
    b = random_lora(tiny_sdxl, "sdxl", rank=4, conv=True, seed=4, scale=0.15)
    return write_lora(a, folder / "a.safetensors"), write_lora(b, folder / "b.safetensors")


@pytest.fixture(scope="module")
def sd15_gen():
    """A GenerationEngine shared by the tests that do not touch base weights (it is meant to be reused)."""
    return GenerationEngine(tiny_sd15_pipeline(seed=0), "sd15")


@pytest.fixture(scope="module")
def sdxl_gen():
    return GenerationEngine(tiny_sdxl_pipeline(seed=0), "sdxl")


@pytest.fixture(scope="module")
def service():
    return GenerationService()


# --------------------------------------------------------------------------------------------------
# merge: exact weights and block weights


def test_stack_equals_merged_weights(fresh_sd15, sd15_loras):
    a, b = sd15_loras
    gen = GenerationEngine(fresh_sd15, "sd15")
    base = pixels(gen.generate(cfg())[0].image)
    stacked = gen.generate(cfg(loras=[f"{a}:0.8", f"{b}:0.6:OUTALL"]))[0]

    gen.pool.activate([])  # reference: deltas added into the base weights, no adapter acting
    apply_to_pipeline(read_lora(a), fresh_sd15, 0.8)
    outall = stacked.record["loras"][1]["block_weights"]
    assert outall["BASE"] == outall["OUT03"] == outall["OUT11"] == 1 and outall["IN04"] == outall["M00"] == 0
    apply_to_pipeline(read_lora(b), fresh_sd15, 0.6, outall)
    merged = pixels(gen.generate(cfg())[0].image)

    assert np.abs(pixels(stacked) - base).max() > 10
    assert np.abs(pixels(stacked) - merged).max() <= 1


def test_zero_block_weights_remove_exactly_those_blocks(fresh_sd15, tiny_sd15, tmp_path):
    lora = random_lora(tiny_sd15, "sd15", rank=4, conv=True, seed=5, scale=0.15)
    # 17-value SD1.x vector (BASE, IN01, IN02, IN04, IN05, IN07, IN08, M00, OUT03..OUT11) zeroing BASE, IN04
    # and OUT05; the ids it leaves out (IN00, IN03, IN06, IN09-11, OUT00-02: conv-only here) count as 0
    vector = "0,1,1,0,1,1,1,1,1,1,0,1,1,1,1,1,1"
    kept = {"IN01", "IN02", "IN05", "IN07", "IN08", "M00", "OUT03", "OUT04"} | {
        f"OUT{i:02d}" for i in range(6, 12)
    }
    assert {"BASE", "IN00", "IN03", "IN04", "IN10", "OUT00", "OUT05"} <= set(lora.blocks) - kept
    without = LoraSet({p: m for p, m in lora.modules.items() if block_of(p) in kept}, "sd15")
    full_file = write_lora(lora, tmp_path / "full.safetensors")
    without_file = write_lora(without, tmp_path / "without.safetensors")
    gen = GenerationEngine(fresh_sd15, "sd15")
    zeroed = pixels(gen.generate(cfg(loras=[LoraSpec(full_file, 1.0, vector)]))[0])
    reference = pixels(gen.generate(cfg(loras=[LoraSpec(without_file, 1.0)]))[0])
    everything = pixels(gen.generate(cfg(loras=[LoraSpec(full_file, 1.0)]))[0])
    assert np.abs(zeroed - reference).max() <= 1
    assert np.abs(everything - reference).max() > 5


def test_b_lora_content_and_style_from_two_files(fresh_sdxl, tiny_sdxl, tmp_path):
    attn = ("attn1.to_q", "attn1.to_k", "attn1.to_v", "attn1.to_out.0", "attn2.to_q", "attn2.to_k")
    targets = [
        p
        for p in model_module_shapes(tiny_sdxl)
        if p.startswith((B_LORA_CONTENT, B_LORA_STYLE)) and p.endswith(attn)
    ]
    files = []
    for seed in (6, 7):
        lora = random_lora(tiny_sdxl, "sdxl", rank=4, seed=seed, targets=targets, scale=0.3)
        files.append(write_lora(lora, tmp_path / f"b_lora_{seed}.safetensors", fmt="peft"))
    gen = GenerationEngine(fresh_sdxl, "sdxl")
    mixed = gen.generate(cfg(b_lora_content=f"{files[0]}:0.9", b_lora_style=f"{files[1]}:0.6"))[0]

    gen.pool.activate([])
    apply_to_pipeline(
        read_lora(files[0]).subset((B_LORA_CONTENT,)), fresh_sdxl, 0.9
    )  # the delta, scaled once
    apply_to_pipeline(read_lora(files[1]).subset((B_LORA_STYLE,)), fresh_sdxl, 0.6)
    merged = pixels(gen.generate(cfg())[0])
    assert [lora["block_weights_text"] for lora in mixed.record["loras"]] == ["CONTENT", "STYLE"]
    assert np.abs(pixels(mixed) - merged).max() <= 1


# --------------------------------------------------------------------------------------------------
# switch and composite


def test_switch_alternates_every_tau_steps(sd15_gen, sd15_loras):
    a, b = sd15_loras
    switched = sd15_gen.generate(cfg(loras=[str(a), str(b)], mode="switch", tau=2, steps=5))[0]
    assert switched.trace == [(0,), (0,), (1,), (1,), (0,)]
    assert switched.record["trace"] == switched.trace

    # tau >= steps: only the first LoRA ever acts, which is plain generation with that LoRA
    first_only = sd15_gen.generate(cfg(loras=[str(a), str(b)], mode="switch", tau=5, steps=5))[0]
    plain = sd15_gen.generate(cfg(loras=[str(a)], steps=5))[0]
    other = sd15_gen.generate(cfg(loras=[str(b)], steps=5))[0]
    assert first_only.trace == [(0,)] * 5
    assert np.abs(pixels(first_only) - pixels(plain)).max() <= 1
    assert np.abs(pixels(switched) - pixels(plain)).max() > 2
    assert np.abs(pixels(switched) - pixels(other)).max() > 2


@pytest.mark.parametrize("family", ["sd15", "sdxl"])
def test_batched_composite_equals_sequential(family, sd15_gen, sdxl_gen, sd15_loras, sdxl_loras):
    gen, (a, b) = (sd15_gen, sd15_loras) if family == "sd15" else (sdxl_gen, sdxl_loras)
    stack = [f"{a}:0.9", f"{b}:1.2:ALL0.5"]
    batched = gen.generate(cfg(loras=stack, mode="composite", steps=3))[0]
    sequential = gen.generate(cfg(loras=stack, mode="composite", steps=3, composite_batched=False))[0]
    merged = gen.generate(cfg(loras=stack, steps=3))[0]
    assert batched.trace == sequential.trace == [(0, 1)] * 3
    assert np.abs(pixels(batched) - pixels(sequential)).max() <= 1
    assert np.abs(pixels(batched) - pixels(merged)).max() > 2  # composite is not merge


@pytest.mark.parametrize("guidance", [7.0, 1.0])  # with and without classifier-free guidance
def test_composite_and_switch_of_one_lora_are_plain_generation(sdxl_gen, sdxl_loras, guidance):
    lora = [str(sdxl_loras[1])]
    plain = pixels(sdxl_gen.generate(cfg(loras=lora, cfg=guidance))[0])
    for mode in ("composite", "switch"):
        single = sdxl_gen.generate(cfg(loras=lora, mode=mode, cfg=guidance))[0]
        assert np.abs(pixels(single) - plain).max() <= 1


# --------------------------------------------------------------------------------------------------
# the service: caching, PNG parameters, regeneration


@pytest.fixture
def counted(monkeypatch):
    """Counts of base-model loads and LoRA file reads."""
    calls = {"load_base": 0, "read_lora": 0}
    for module, name in ((studio.generation.service, "load_base"), (studio.generation.adapters, "read_lora")):
        real = getattr(module, name)

        def wrapper(*args, _real=real, _name=name, **kwargs):
            calls[_name] += 1
            return _real(*args, **kwargs)

        monkeypatch.setattr(module, name, wrapper)
    return calls


def test_weight_changes_reuse_model_and_adapters(tiny_sd15_dir, small_loras, tmp_path, counted):
    a, b = small_loras
    service = GenerationService()
    images = []
    for weight in (0.2, 0.9, -0.5):
        config = cfg(model=str(tiny_sd15_dir), loras=[f"{a}:{weight}", f"{b}:0.5:OUTS"], out=tmp_path)
        images.append(pixels(service.generate(config)[0]))
    assert counted == {"load_base": 1, "read_lora": 2}
    assert np.abs(images[0] - images[1]).max() > 2  # the new weight did act


def test_png_regenerates_identical_pixels(service, tiny_sd15_dir, small_loras, tmp_path):
    a, b = small_loras
    config = cfg(
        model=str(tiny_sd15_dir),
        prompt="a fox, snow",
        negative_prompt="blurry",
        loras=[f"{a}:0.7:OUTALL", f"{b}:0.4"],
        scheduler="DPM++ 2M Karras",
        steps=3,
        seed=11,
        batch_count=2,
        out=tmp_path,
    )
    made = service.generate(config)
    assert [r.seed for r in made] == [11, 12] and all(r.path.is_file() for r in made)
    record = read_record(made[1].path)
    assert record["seed"] == 12 and record["loras"][0]["sha256"] == made[1].record["loras"][0]["sha256"]
    text = Image.open(made[1].path).text["parameters"]
    assert text.startswith("a fox, snow <lora:a:0.7:lbw=OUTALL> <lora:b:0.4>\nNegative prompt: blurry\n")
    assert "Sampler: DPM++ 2M, Schedule type: Karras, CFG scale: 7, Seed: 12, Size: 64x64" in text

    again = GenerationService().generate(config_from_record(record), save=False)[0]  # a fresh model load
    assert np.array_equal(pixels(again), pixels(Image.open(made[1].path)))


def test_cli_regenerates_a_switch_image_from_its_png(service, tiny_sd15_dir, small_loras, tmp_path, capsys):
    a, b = small_loras
    config = cfg(model=str(tiny_sd15_dir), loras=[f"{a}:0.8", str(b)], mode="switch", tau=1, steps=3)
    config.scheduler, config.out = "euler a", tmp_path / "one"
    first = service.generate(config)[0].path
    assert main(["generate", "--from", str(first), "--out", str(tmp_path / "two")]) == 0
    second = tmp_path / "two" / "00000-3.png"
    assert str(second) in capsys.readouterr().out
    assert np.array_equal(pixels(Image.open(first)), pixels(Image.open(second)))
    assert read_record(second)["trace"] == [[0], [1], [0]]
    assert "LoRA mode: switch, LoRA tau: 1" in Image.open(second).text["parameters"]


def test_output_never_overwrites(sd15_gen, tmp_path):
    existing = tmp_path / "00000-3.png"
    existing.write_bytes(b"not mine")
    result = sd15_gen.generate(cfg())[0]
    paths = [save_png(result.image, result.record, tmp_path) for _ in range(2)]
    assert [p.name for p in paths] == ["00001-3.png", "00002-3.png"]
    assert existing.read_bytes() == b"not mine"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["00000-3.png", "00001-3.png", "00002-3.png"]


@pytest.mark.parametrize("name", list(SCHEDULERS))
def test_every_scheduler_runs(sdxl_gen, name):
    result = sdxl_gen.generate(cfg(scheduler=name, width=96, height=64))[0]
    assert result.image.size == (96, 64) and result.record["scheduler"] == name


# --------------------------------------------------------------------------------------------------
# bad input: one clear error, and the engine keeps working


def test_bad_stacks_fail_clearly_and_nothing_breaks(sdxl_gen, sd15_loras, sdxl_loras):
    a = str(sdxl_loras[0])
    before = pixels(sdxl_gen.generate(cfg(loras=[a]))[0])
    cases = [
        (
            cfg(loras=[str(sd15_loras[0])]),
            FamilyMismatchError,
            "a.safetensors is a Stable Diffusion 1.5 LoRA",
        ),
        (cfg(loras=[f"{a}:1:NOPE"]), ConfigError, "unknown block-weight preset 'NOPE' for SDXL"),
        (cfg(loras=[f"{a}:1:1,0,1"]), ConfigError, "12 \\(SDXL\\), 17 \\(SD1.x\\).*got 3"),
        (cfg(loras=[f"{a}:1:{','.join(['1'] * 17)}"]), ConfigError, "would zero OUT00-OUT02"),
        (cfg(mode="switch"), ConfigError, "mode 'switch' .* stack is empty"),
        (cfg(mode="composite"), ConfigError, "mode 'composite' .* stack is empty"),
        (cfg(loras=[a], steps=0), ConfigError, "steps must be at least 1"),
        (cfg(loras=[a], width=70), ConfigError, "width must be a positive multiple of 8"),
        (cfg(loras=[a], scheduler="DPM fast"), ConfigError, "unknown scheduler 'DPM fast'"),
    ]
    for config, error, message in cases:
        with pytest.raises(error, match=message):
            sdxl_gen.generate(config)
    with pytest.raises(ConfigError, match="too many ':' parts"):  # FILE[:WEIGHT[:BLOCKS]] has three parts
        cfg(loras=[f"{a}:1:IN01:1"])
    assert np.array_equal(pixels(sdxl_gen.generate(cfg(loras=[a]))[0]), before)


def test_block_weights_that_switch_a_lora_off_are_refused(sdxl_gen, tiny_sdxl, tmp_path):
    only_out00 = [
        p for p in model_module_shapes(tiny_sdxl) if p.startswith(B_LORA_CONTENT) and p.endswith("to_q")
    ]
    path = write_lora(random_lora(tiny_sdxl, "sdxl", targets=only_out00), tmp_path / "content.safetensors")
    with pytest.raises(
        ConfigError, match="content.safetensors: the block weights 'STYLE' switch off every block"
    ):
        sdxl_gen.generate(cfg(b_lora_style=str(path)))


def test_from_refuses_images_without_our_record(tmp_path, capsys):
    plain = tmp_path / "plain.png"
    Image.new("RGB", (8, 8)).save(plain)
    foreign = tmp_path / "a1111.png"
    info = PngImagePlugin.PngInfo()
    info.add_text("parameters", "a cat\nSteps: 20, Sampler: Euler a, Seed: 1")
    Image.new("RGB", (8, 8)).save(foreign, pnginfo=info)
    not_png = tmp_path / "notes.png"
    not_png.write_text("hello")
    for path, message in (
        (plain, "carries no generation parameters"),
        (foreign, "A1111-style parameters but no LoRA Studio record"),
        (not_png, "not a readable image"),
    ):
        assert main(["generate", "--from", str(path)]) == 1
        err = capsys.readouterr().err
        assert message in err and str(path) in err and "Traceback" not in err


def test_changed_files_are_refused_when_regenerating(service, tiny_sd15_dir, tiny_sd15, tmp_path):
    lora = tmp_path / "mine.safetensors"
    write_lora(random_lora(tiny_sd15, "sd15", seed=8, targets=some_targets(tiny_sd15)), lora)
    made = service.generate(cfg(model=str(tiny_sd15_dir), loras=[str(lora)], out=tmp_path))[0]
    record = read_record(made.path)
    write_lora(random_lora(tiny_sd15, "sd15", seed=9, targets=some_targets(tiny_sd15)), lora, overwrite=True)
    with pytest.raises(
        BadFileError, match="mine.safetensors: this file has changed since the image was made"
    ):
        service.generate(config_from_record(record), save=False)
    record["model"]["hash"] = "0" * 64
    with pytest.raises(StudioError, match="not the one the image was made with"):
        service.generate(config_from_record(record), save=False)


def test_lora_spec_parsing():
    assert LoraSpec.parse("x.safetensors") == LoraSpec(Path("x.safetensors"))
    spec = LoraSpec.parse("C:/loras/x.safetensors:-0.5:0,1,1,1,1,1,1,1,1,1,1,1")
    assert (str(spec.path), spec.weight, spec.block_weights) == (
        "C:/loras/x.safetensors",
        -0.5,
        "0," + "1," * 10 + "1",
    )
    assert LoraSpec.parse("C:/loras/x.safetensors").weight == 1.0
    with pytest.raises(ConfigError, match="needs 'path'"):
        GenerateConfig(loras=[{"file": "x"}])


def test_missing_demo_model_asks_for_model(monkeypatch):
    import studio.core.model_paths

    def missing(family="sd15"):
        raise StudioError("missing")

    monkeypatch.setattr(studio.core.model_paths, "demo_model_path", missing)
    with pytest.raises(ConfigError, match="pass --model"):
        GenerationService().generate(cfg(), save=False)


@pytest.mark.gpu
def test_cuda_half_precision_fused_and_composite(sd15_loras):
    import torch

    pipe = tiny_sd15_pipeline(seed=0).to("cuda", torch.float16)
    gen = GenerationEngine(pipe, "sd15")
    stack = [f"{sd15_loras[0]}:0.8", f"{sd15_loras[1]}:0.5:OUTALL"]
    unfused = gen.generate(cfg(loras=stack, fuse="off"))[0]
    fused = gen.generate(cfg(loras=stack, batch_count=2))  # auto: a stack kept for several images is fused
    assert not unfused.record["fused"] and fused[0].record["fused"] and fused[0].record["dtype"] == "fp16"
    assert np.abs(pixels(fused[0]) - pixels(unfused)).max() <= 3
    batched = gen.generate(cfg(loras=stack, mode="composite"))[0]
    sequential = gen.generate(cfg(loras=stack, mode="composite", composite_batched=False))[0]
    assert np.abs(pixels(batched) - pixels(sequential)).max() <= 3
