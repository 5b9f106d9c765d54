"""`lora-studio train` runs every shipped training preset end to end on the tiny models."""

from __future__ import annotations

import pytest

from studio.app.cli import main
from studio.core.lora_files import read_lora
from studio.core.options import PRESETS_DIR, build_config, load_preset
from tests.trainers.conftest import make_images
from trainers.config import TrainConfig

PRESETS = sorted(p.stem for p in PRESETS_DIR.glob("train_*.toml"))
SMALL = ["max_steps=2", "resolution=64", "bucket_step=64", "min_bucket_reso=64", "max_bucket_reso=128",
         "rank=4", "alpha=4", "conv_rank=0", "batch_size=1", "repeats=1", "lr_warmup_steps=1",
         "checkpoint_every=1", "sample_every=2", "sample_steps=1", "ortho_num_concepts=2"]  # fmt: skip


def test_presets_load_into_train_config():
    assert {"train_dreambooth_sd15", "train_dreambooth_sdxl", "train_style_sd15", "train_style_sdxl",
            "train_b_lora_sdxl", "train_blockwise_sd15", "train_orthogonal_sd15"} <= set(PRESETS)  # fmt: skip
    for name in PRESETS:
        build_config(TrainConfig, load_preset(name))


@pytest.mark.parametrize("preset", PRESETS)
def test_cli_runs_preset(preset, tmp_path, sd15_dir, sdxl_dir, capsys):
    model = sdxl_dir if "sdxl" in preset else sd15_dir
    data = make_images(tmp_path / "data", 1 if "b_lora" in preset else 2, {0: "sks, dog"})
    out = tmp_path / "out"
    argv = ["train", "--preset", preset.removeprefix("train_"), "--model", str(model), "--data-dir", str(data),
            "--output-dir", str(out), "--prompt", "a photo of sks dog", "--no-progress-bar",
            "--sample-prompts", "a dog, on grass|a cat"]  # fmt: skip
    for item in SMALL:
        argv += ["--set", item]
    if "b_lora" in preset:
        argv += ["--split"]
    assert main(argv) == 0
    printed = capsys.readouterr().out
    assert "saved" in printed
    lora = read_lora(out / "lora.safetensors")
    assert (
        lora.metadata["ss_steps"] == "2" and lora.metadata["studio_method"] == load_preset(preset)["method"]
    )
    assert len(list((out / "samples").glob("step-000002-*.png"))) == 2
    assert len(list((out / "checkpoints").glob("step-*"))) >= 1
    if "b_lora" in preset:
        assert (out / "lora_content.safetensors").exists() and (out / "lora_style.safetensors").exists()


def test_cli_user_error_is_one_line(tmp_path, sd15_dir, capsys):
    code = main(["train", "--preset", "style_sd15", "--model", str(sd15_dir), "--data-dir", str(tmp_path / "x"),
                 "--output-dir", str(tmp_path / "out")])  # fmt: skip
    err = capsys.readouterr().err
    assert code == 1 and err.startswith("error: data_dir:") and "Traceback" not in err
    assert err.count("\n") == 1, "found before the model is loaded: one line, nothing else"
    assert main(["train", "--preset", "style_sd15", "--set", "max_steps=-3"]) == 1
    assert "max_steps must be at least 1" in capsys.readouterr().err


def test_print_config_merges_preset_flags_and_set(capsys):
    assert main(["train", "--preset", "b_lora_sdxl", "--rank", "8", "--set", "learning_rate=1e-4",
                 "--print-config"]) == 0  # fmt: skip
    printed = capsys.readouterr().out
    assert '"rank": 8' in printed and '"learning_rate": 0.0001' in printed and '"method": "b_lora"' in printed
