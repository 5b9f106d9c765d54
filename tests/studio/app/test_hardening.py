"""The findings of a hostile probe, each reproduced and shown refused: paths out of the workspace, pickles
that run code, control characters, disk errors, stale temporary files, logins beyond this machine."""

from __future__ import annotations

import os
import pickle
from pathlib import Path

import pytest
import torch

from studio.app import form_configs
from studio.app.cli import main
from studio.app.commands.ui import login, register
from studio.app.workspace import Workspace
from studio.core.errors import ConfigError, StudioError
from studio.core.lora_files import read_lora, write_lora
from tests.fixtures.lora_random import random_lora
from tests.trainers.conftest import make_images


@pytest.fixture
def ws(tmp_path):
    ws = Workspace.create(tmp_path / "ws")
    make_images(ws.datasets / "dogs", 2, {0: "a sks dog", 1: "a sks dog"})
    return ws


def train_form(**more):
    toml = "\n".join(
        f"{k} = {v!r}" if not isinstance(v, bool) else f"{k} = {str(v).lower()}" for k, v in more.items()
    )
    return {"method": "style", "preset": "", "model": "demo:sd15", "dataset": "dogs", "name": "dog", "prompt": "x",
            "steps": 2, "rank": 4, "learning_rate": 1e-3, "batch_size": 1, "resolution": 64, "more": toml}  # fmt: skip


@pytest.mark.parametrize(
    "field, value",
    [("output_dir", "/tmp/elsewhere"), ("data_dir", "/etc"), ("class_data_dir", "../../x"), ("reg_data_dir", "/etc"),
     ("model", "/etc/passwd"), ("resume", "/tmp/some/checkpoint"), ("output_dir", "runs/../../x")],
)  # fmt: skip
def test_more_options_cannot_point_a_job_outside_the_workspace(ws, field, value):
    with pytest.raises(ConfigError, match=f"{field}: .*outside the workspace"):
        form_configs.train_config(ws, train_form(**{field: value}))


def test_paths_from_the_more_options_are_kept_and_made_absolute(ws):
    cfg = form_configs.train_config(ws, train_form(output_dir="runs/elsewhere", resume="latest"))
    assert cfg.output_dir == str(ws.root / "runs" / "elsewhere") and cfg.resume == "latest"


def test_regularisation_dataset_comes_from_the_workspace(ws):
    cfg = form_configs.train_config(ws, {**train_form(), "reg_dataset": "dogs"})
    assert cfg.reg_data_dir == str(ws.datasets / "dogs")
    with pytest.raises(ConfigError, match="no dataset 'cats'"):
        form_configs.train_config(ws, {**train_form(), "reg_dataset": "cats"})
    with pytest.raises(ConfigError):
        form_configs.train_config(ws, {**train_form(), "reg_dataset": "../dogs"})
    with pytest.raises(ConfigError, match="regularisation dataset is for the style method"):
        form_configs.train_config(ws, {**train_form(), "method": "dreambooth", "reg_dataset": "dogs"})
    with pytest.raises(
        ConfigError, match="reg_data_dir is for method style"
    ):  # the same through More options
        form_configs.train_config(
            ws, train_form(reg_data_dir=str(ws.datasets / "dogs")) | {"method": "dreambooth"}
        )


def test_pickle_needs_the_studio_flag(ws):
    with pytest.raises(ConfigError, match="--allow-pickle"):
        form_configs.train_config(ws, train_form(allow_pickle=True))
    assert form_configs.train_config(ws, train_form(allow_pickle=True), allow_pickle=True).allow_pickle


def test_merge_and_generate_paths_are_confined(ws, tiny_sd15):
    lora = write_lora(random_lora(tiny_sd15, "sd15"), ws.loras / "a.safetensors")
    form = {"sources": [str(lora), str(lora)], "method": "concat", "name": "m", "density": 0.5}
    assert form_configs.merge_config(ws, form).out == str(ws.loras / "m.safetensors")
    with pytest.raises(ConfigError, match="outside the workspace"):
        form_configs.merge_config(ws, {**form, "sources": [str(lora), "/etc/passwd"]})
    values = {
        "prompt": "x",
        "steps": 2,
        "cfg": 7,
        "seed": 1,
        "size": 0,
        "count": 1,
        "loras": ["/tmp/x.safetensors"],
    }
    with pytest.raises(ConfigError, match="outside the workspace"):
        form_configs.generate_config(ws, values)


def test_merge_more_options_reach_the_merge_and_stay_in_the_workspace(ws, tiny_sd15):
    lora = write_lora(random_lora(tiny_sd15, "sd15"), ws.loras / "a.safetensors")
    form = {"sources": [str(lora), str(lora)], "method": "fusion", "name": "m", "density": 0.5,
            "model": "demo:sd15", "prompts": "a sks shape | a zwx shape"}  # fmt: skip
    more = 'fusion_ridge = 0.02\nfusion_order = "sequential"'
    cfg = form_configs.merge_config(ws, {**form, "more": more})
    assert (cfg.fusion_ridge, cfg.fusion_order) == (0.02, "sequential")
    for hostile in (
        'into_base = "/tmp/base.safetensors"',
        'out = "../x.safetensors"',
        'references = ["/etc", ""]',
    ):
        with pytest.raises(ConfigError, match="outside the workspace"):
            form_configs.merge_config(ws, {**form, "more": hostile})
    with pytest.raises(ConfigError, match="not valid TOML"):
        form_configs.merge_config(ws, {**form, "more": "fusion_ridge = "})
    with pytest.raises(ConfigError, match="fusion_order"):
        form_configs.merge_config(ws, {**form, "more": 'fusion_order = "sideways"'})


def test_a_merge_preset_applies_under_the_form(ws, tiny_sd15):
    lora = write_lora(random_lora(tiny_sd15, "sd15"), ws.loras / "a.safetensors")
    form = {"sources": [str(lora), str(lora)], "method": "fusion", "name": "m", "density": 0.5,
            "model": "demo:sd15", "prompts": "a sks shape | a zwx shape", "preset": "fusion_subjects"}  # fmt: skip
    cfg = form_configs.merge_config(ws, form)
    assert (cfg.fusion_ridge, cfg.reference_captions, cfg.fusion_order) == (0.01, True, "text-first")
    cfg = form_configs.merge_config(ws, {**form, "more": "fusion_ridge = 0.1"})  # the form's own options win
    assert cfg.fusion_ridge == 0.1
    with pytest.raises(ConfigError, match="preset"):
        form_configs.merge_config(ws, {**form, "preset": "nonesuch"})


class Boom:
    """A pickle that would create a file when unpickled, if its code ran."""

    def __init__(self, target: str):
        self.target = target

    def __reduce__(self):
        return (Path.touch, (Path(self.target),))


def test_pickle_files_never_run_code(tmp_path, capsys):
    evidence = tmp_path / "pwned"
    hostile = tmp_path / "hostile.pt"
    hostile.write_bytes(pickle.dumps({"lora_unet_x.lora_down.weight": Boom(str(evidence))}))
    assert main(["inspect", "--allow-pickle", str(hostile)]) == 1
    err = capsys.readouterr().err
    assert "cannot read this pickle file as tensors" in err and "Traceback" not in err
    assert not evidence.exists()
    with pytest.raises(StudioError, match="pickle"):
        read_lora(hostile)  # not even opened without --allow-pickle


def test_control_characters_in_metadata_are_escaped(tiny_sd15, tmp_path, capsys):
    path = write_lora(random_lora(tiny_sd15, "sd15"), tmp_path / "ansi.safetensors",
                      metadata={"ss_output_name": "\x1b[2J\x1b[1;1Hfake\r\nerror: x", "title": "\u202eevil"})  # fmt: skip
    assert main(["inspect", str(path)]) == 0
    out = capsys.readouterr().out
    assert "\x1b" not in out and "\r" not in out and "\u202e" not in out
    assert "\\x1b[2J" in out and "\\u202e" in out


def test_serving_beyond_this_machine_needs_a_login(tmp_path, monkeypatch):
    import argparse

    parser = argparse.ArgumentParser()
    register(parser.add_subparsers())
    monkeypatch.delenv("LORA_STUDIO_PASSWORD", raising=False)
    assert login(parser.parse_args(["ui"])) is None  # this machine only: no login needed
    with pytest.raises(ConfigError, match="needs a login"):
        login(parser.parse_args(["ui", "--host", "0.0.0.0"]))
    monkeypatch.setenv("LORA_STUDIO_PASSWORD", "correct horse")
    assert login(parser.parse_args(["ui", "--host", "0.0.0.0"])) == ("studio", "correct horse")
    secret = tmp_path / "pw"
    secret.write_text("battery staple\n")
    args = parser.parse_args(["ui", "--host", "192.168.1.5", "--password-file", str(secret), "--user", "me"])
    assert login(args) == ("me", "battery staple")


def test_bad_input_never_shows_a_traceback(tmp_path, capsys):
    bad = tmp_path / "x.safetensors"
    bad.write_bytes(os.urandom(64))
    for argv in (["inspect", str(bad)], ["merge", str(bad), str(bad), "--out", str(tmp_path / "m.safetensors")],
                 ["generate", "--prompt", "x", "--lora", str(bad), "--out", str(tmp_path)]):  # fmt: skip
        assert main(argv) == 1
        err = capsys.readouterr().err
        assert err.startswith("error: ") and err.count("\n") == 1 and "Traceback" not in err
    with pytest.raises(StudioError):
        main(["--debug", "inspect", str(bad)])


def test_unexpected_errors_are_one_line_unless_debug(monkeypatch, capsys):
    import studio.app.commands.inspect as inspect_command

    def broken(args):
        raise RuntimeError("something deep\nwith a second line")

    monkeypatch.setattr(inspect_command, "run", broken)
    assert main(["inspect", "x"]) == 1
    assert (
        capsys.readouterr().err
        == "error: RuntimeError: something deep (unexpected; run with --debug for the full traceback and report it)\n"
    )
    with pytest.raises(RuntimeError):
        main(["--debug", "inspect", "x"])


def test_non_float_and_nan_loras_are_refused_everywhere(tiny_sd15, tmp_path):
    lora = random_lora(tiny_sd15, "sd15")
    path = next(iter(lora.modules))
    lora.modules[path].up[0, 0] = float("nan")
    nan = write_lora(lora, tmp_path / "nan.safetensors")
    with pytest.raises(StudioError, match=f"module {path}: its up factor holds NaN"):
        read_lora(nan)
    lora.modules[path].up[0, 0] = 0.0
    lora.modules[path].down = lora.modules[path].down.to(torch.int8)
    with pytest.raises(StudioError, match="int8; LoRA factors are float16"):
        read_lora(write_lora(lora, tmp_path / "int.safetensors"))


def test_the_learnt_trigger_words_field_lists_words_and_refuses_a_bad_one(ws):
    cfg = form_configs.train_config(ws, {**train_form(), "token_words": "sks, ohwx"})
    assert cfg.token_words == ["sks", "ohwx"]
    assert form_configs.train_config(ws, {**train_form(), "token_words": "  "}).token_words == []
    with pytest.raises(ConfigError, match="one word, without spaces or dots"):
        form_configs.train_config(ws, {**train_form(), "token_words": "sks.v2"})
