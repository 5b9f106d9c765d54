"""Training the demo base models: size buckets and starting from a shipped model (a few steps: the
wiring; the shipped models' metadata.json records the real runs)."""

from __future__ import annotations

import json

import pytest
import torch
from diffusers import UNet2DConditionModel

from studio.core.errors import ConfigError
from studio.core.model_paths import demo_model_path
from studio.demo.buckets import parse_buckets
from studio.demo.train_base import parse_plan, run


def test_bucket_lists_are_checked():
    assert parse_buckets("64x64, 32X64,") == [(64, 64), (32, 64)]
    assert parse_buckets("") == []
    for bad, words in (("64", "WIDTHxHEIGHT"), ("64x60", "multiple of 8"), ("0x64", "multiple of 8")):
        with pytest.raises(ConfigError, match=words):
            parse_buckets(bad)


def test_a_bucketed_run_starts_from_a_shipped_model(tmp_path):
    sd15 = demo_model_path("sd15")
    args = ["--family", "sd15", "--out", str(tmp_path / "out"), "--work", str(tmp_path / "work"),
            "--vae-from", str(sd15 / "vae"), "--init-from", str(sd15), "--buckets", "64x64,32x64,64x32",
            "--unet-images", "8", "--bucket-images", "4", "--unet-steps", "3", "--unet-batch", "2",
            "--unet-lr", "0"]  # fmt: skip
    plan = parse_plan(args)
    assert plan.init_from == str(sd15) and plan.buckets == "64x64,32x64,64x32"
    run(plan, "test")
    cached = sorted(p.name for p in (tmp_path / "work").glob("latents*.safetensors"))
    assert cached == ["latents.safetensors", "latents_32x64.safetensors", "latents_64x32.safetensors"]
    meta = json.loads((tmp_path / "out" / "metadata.json").read_text())
    assert meta["plan"]["buckets"] == "64x64,32x64,64x32" and meta["unet_steps_done"] == 3
    # learning rate 0: the weights are the shipped model's (stored in fp16 both times)
    trained = UNet2DConditionModel.from_pretrained(tmp_path / "out" / "unet")
    shipped = UNet2DConditionModel.from_pretrained(sd15 / "unet")
    for (name, a), b in zip(trained.state_dict().items(), shipped.state_dict().values()):
        assert torch.equal(a, b), name


def test_a_model_of_another_size_is_refused(tmp_path):
    plan = parse_plan(["--family", "sd15", "--out", str(tmp_path / "o"), "--work", str(tmp_path / "w"),
                       "--vae-from", str(demo_model_path("sd15") / "vae"), "--init-from",
                       str(demo_model_path("sd15-128"))])  # fmt: skip
    with pytest.raises(ConfigError, match="another shape"):
        run(plan, "test")
