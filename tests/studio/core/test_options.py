"""Typed configs: defaults < preset < flags < --set, with clear errors."""

import argparse
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import pytest

from studio.core.errors import ConfigError
from studio.core.options import add_config_args, build_config, config_from_args, load_preset


@dataclass
class Demo:
    steps: int = field(default=20, metadata={"help": "denoising steps"})
    lr: float = field(default=1e-4, metadata={"help": "learning rate"})
    cache: bool = field(default=True, metadata={"help": "cache latents"})
    mode: Literal["merge", "switch"] = field(default="merge", metadata={"help": "composition mode"})
    blocks: list[str] = field(default_factory=list, metadata={"help": "block ids"})
    out: Path | None = field(default=None, metadata={"help": "output file"})


def test_layering(tmp_path):
    preset = tmp_path / "p.toml"
    preset.write_text('[demo]\nsteps = 30\nlr = 0.01\nblocks = ["OUT00", "OUT01"]\n')
    parser = argparse.ArgumentParser()
    parser.add_argument("--preset")
    parser.add_argument("--set", action="append")
    add_config_args(parser, Demo)
    args = parser.parse_args(["--preset", str(preset), "--lr", "0.5", "--no-cache", "--set", "mode=switch"])
    cfg = config_from_args(Demo, args, preset_kind="demo")
    assert (cfg.steps, cfg.lr, cfg.cache, cfg.mode, cfg.blocks) == (
        30,
        0.5,
        False,
        "switch",
        ["OUT00", "OUT01"],
    )
    assert build_config(Demo, {"out": "x.safetensors"}).out == Path("x.safetensors")
    assert build_config(Demo, {"blocks": "IN01,IN02"}).blocks == ["IN01", "IN02"]


def test_errors():
    with pytest.raises(ConfigError, match="unknown option 'stepz'.*steps"):
        build_config(Demo, {"stepz": 3})
    with pytest.raises(ConfigError, match="steps: cannot read 'many' as int"):
        build_config(Demo, {"steps": "many"})
    with pytest.raises(ConfigError, match="'composite' is not one of merge, switch"):
        build_config(Demo, {"mode": "composite"})
    with pytest.raises(ConfigError, match="no preset 'nope'"):
        load_preset("nope")
