"""Regional generation: boxes with their own prompt and LoRA, blended in latent space; records and --from."""

import numpy as np
import pytest
import torch
from PIL import Image

from studio.app.cli import main
from studio.core.errors import ConfigError
from studio.core.lora_files import write_lora
from studio.generation import GenerateConfig, GenerationEngine, GenerationService
from studio.generation.composition import RegionalSampler
from studio.generation.config import Region, config_from_record
from studio.generation.records import read_record
from tests.fixtures.lora_random import random_lora
from tests.fixtures.tiny import tiny_sd15_pipeline


def cfg(**values) -> GenerateConfig:
    return GenerateConfig(**({"prompt": "a red fox", "steps": 2, "seed": 3, "scheduler": "Euler"} | values))


def pixels(image) -> np.ndarray:
    return np.asarray(getattr(image, "image", image).convert("RGB"), dtype=np.int16)


@pytest.fixture(scope="module")
def gen():
    return GenerationEngine(tiny_sd15_pipeline(seed=0), "sd15")


@pytest.fixture(scope="module")
def loras(tiny_sd15, tmp_path_factory):
    folder = tmp_path_factory.mktemp("region_loras")
    return [
        write_lora(random_lora(tiny_sd15, "sd15", rank=4, seed=s, scale=0.3), folder / f"r{s}.safetensors")
        for s in (1, 2)
    ]


def test_region_text_is_parsed_and_checked():
    region = Region.parse("0.5,0,1,1:a cat on a mat:C:/loras/cat.safetensors:0.7")
    assert region.box == (0.5, 0.0, 1.0, 1.0) and region.prompt == "a cat on a mat"
    assert str(region.lora.path) == "C:/loras/cat.safetensors" and region.lora.weight == 0.7
    assert Region.parse("0,0,32,64:a dog").fractions(64, 64) == (0.0, 0.0, 0.5, 1.0)
    for bad in ("0,0,1:a dog", "a,b,c,d:a dog", "0,0,1,1:", "0,0,1,1"):
        with pytest.raises(ConfigError, match="X0,Y0,X1,Y1:PROMPT"):
            Region.parse(bad)
    with pytest.raises(ConfigError, match="empty or outside"):
        cfg(regions=["0.6,0,0.4,1:a dog"]).check()
    with pytest.raises(ConfigError, match="mode 'merge'"):
        cfg(regions=["0,0,1,1:a dog"], mode="switch", loras=["x.safetensors"]).check()


def test_blend_follows_the_boxes():
    """Every branch predicts a constant: inside a box its value (mixed with `base` of the global one),
    the mean where boxes overlap, the global value elsewhere."""
    active = []
    values = [0.0, 10.0, 20.0]

    def unet(sample, timestep, encoder_hidden_states, return_dict=True):
        return (torch.full_like(sample, values[active[-1]]),)

    boxes = [(0.0, 0.0, 0.5, 1.0), (0.25, 0.0, 1.0, 0.5)]
    conds = [type("C", (), {"encoder_hidden_states": torch.zeros(2, 3, 4), "text_embeds": None})()] * 3
    sampler = RegionalSampler(active.append, conds, boxes, base=0.5)
    out = sampler.forward(unet, torch.zeros(2, 4, 8, 8), 1, encoder_hidden_states=None, return_dict=False)[0]
    assert out.shape == (2, 4, 8, 8) and active[-1] == 0  # back to the global stack after the step
    assert out[0, 0, 6, 0] == 5.0  # first box only: 0.5 * 10 + 0.5 * 0
    assert out[0, 0, 0, 6] == 10.0  # second box only: 0.5 * 20 + 0.5 * 0
    assert out[0, 0, 0, 3] == 7.5  # both: 0.5 * mean(10, 20) + 0.5 * 0
    assert out[0, 0, 6, 6] == 0.0  # no box: global


def test_area_regions_see_only_their_box():
    """In area mode a region's branch is called on its box of the latents alone; its prediction fills the
    box and the global one the rest."""
    seen = []

    def unet(sample, timestep, encoder_hidden_states, return_dict=True):
        seen.append(tuple(sample.shape[-2:]))
        return (sample + 1.0,)

    conds = [type("C", (), {"encoder_hidden_states": torch.zeros(1, 3, 4), "text_embeds": None})()] * 2
    sampler = RegionalSampler(lambda branch: None, conds, [(0.5, 0.0, 1.0, 0.5)], base=0.0, area=True)
    latents = torch.arange(64.0).reshape(1, 1, 8, 8)
    out = sampler.forward(unet, latents, 1, encoder_hidden_states=None, return_dict=False)[0]
    assert seen == [(8, 8), (4, 4)]  # the global prompt on the whole grid, the region on its box
    assert torch.equal(out, latents + 1.0)
    boxed = RegionalSampler(lambda branch: None, conds, [(0.5, 0.0, 1.0, 0.5)], base=0.0)
    boxed.forward(unet, latents, 1, encoder_hidden_states=None, return_dict=False)
    assert seen[-1] == (8, 8)  # mask mode: every branch sees the whole picture


def test_area_and_mask_regions_differ_and_are_recorded(tiny_sd15_dir, loras, tmp_path):
    a, b = loras
    service = GenerationService()
    regions = [f"0,0,0.5,1:a red cat:{b}:0.9"]
    area = service.generate(cfg(model=str(tiny_sd15_dir), regions=regions, region_mode="area", steps=3,
                                out=tmp_path / "area"))[0].path  # fmt: skip
    mask = service.generate(cfg(model=str(tiny_sd15_dir), regions=regions, steps=3), save=False)[0]
    assert not np.array_equal(pixels(Image.open(area)), pixels(mask))
    record = read_record(area)
    assert record["region_mode"] == "area" and "Region mode: area" in Image.open(area).text["parameters"]
    assert config_from_record(record).region_mode == "area"
    with pytest.raises(ConfigError, match="region_mode"):
        cfg(region_mode="crop").check()


def test_small_area_boxes_get_a_note(gen, tiny_sd15_dir, tmp_path, capsys):
    """A box under half the model's native size (64 px here) on a side is drawn as a picture that small in
    area mode: the result says so, once per run on the command line; mask mode and big boxes have no note."""
    small = ["0,0,0.25,1:a red cat", "0.5,0,1,1:a blue dog"]
    notes = gen.notes(cfg(regions=small, region_mode="area"), 64, 64)
    assert len(notes) == 1 and notes[0].startswith("region 1 is 16x64 px in area mode")
    assert gen.notes(cfg(regions=small), 64, 64) == ()
    assert gen.notes(cfg(regions=small, region_mode="area"), 256, 256) == ()  # bigger image, bigger boxes
    argv = ["generate", "--model", str(tiny_sd15_dir), "--prompt", "a fox", "--steps", "1", "--batch-count", "2",
            "--region-mode", "area", "--region", small[0], "--out", str(tmp_path)]  # fmt: skip
    assert main(argv) == 0
    assert capsys.readouterr().err.count("note: region 1 is 16x64 px in area mode") == 1


def test_a_region_over_the_whole_image_is_its_own_generation(gen, loras):
    """With base 0 and one box covering everything, the image is the region's prompt and LoRA alone."""
    a, b = loras
    regional = gen.generate(cfg(loras=[f"{a}:0.6"], regions=[f"0,0,1,1:a blue cat:{b}:0.8"], region_base=0.0))
    plain = gen.generate(cfg(prompt="a blue cat", loras=[f"{a}:0.6", f"{b}:0.8"]))
    assert np.abs(pixels(regional[0]) - pixels(plain[0])).max() <= 1
    assert not np.array_equal(pixels(plain[0]), pixels(gen.generate(cfg(loras=[f"{a}:0.6"]))[0]))


def test_regions_are_recorded_and_regenerated(tiny_sd15_dir, loras, tmp_path, capsys):
    a, b = loras
    service = GenerationService()
    config = cfg(model=str(tiny_sd15_dir), loras=[f"{a}:0.5"], out=tmp_path / "one", steps=3,
                 regions=["0,0,32,64:a green dog", f"0.5,0,1,1:a red cat:{b}:0.9"])  # fmt: skip
    first = service.generate(config)[0].path
    record = read_record(first)
    assert [r["prompt"] for r in record["regions"]] == ["a green dog", "a red cat"]
    assert record["regions"][1]["lora"]["weight"] == 0.9 and len(record["regions"][1]["lora"]["sha256"]) == 64
    text = Image.open(first).text["parameters"]
    assert 'Regions: "0,0,32,64: a green dog | 0.5,0,1,1: a red cat <lora:r2:0.9>"' in text
    assert config_from_record(record).regions[1].lora.sha256 == record["regions"][1]["lora"]["sha256"]
    assert main(["generate", "--from", str(first), "--out", str(tmp_path / "two")]) == 0
    second = tmp_path / "two" / "00000-3.png"
    assert np.array_equal(pixels(Image.open(first)), pixels(Image.open(second)))
    without = service.generate(cfg(model=str(tiny_sd15_dir), loras=[f"{a}:0.5"], steps=3), save=False)[0]
    assert not np.array_equal(pixels(without), pixels(Image.open(first)))  # the regions changed the image


def test_region_outside_the_image_fails_clearly(gen):
    with pytest.raises(ConfigError, match="outside the 64x64 image"):
        gen.generate(cfg(regions=["0,0,32,128:a dog"]))
