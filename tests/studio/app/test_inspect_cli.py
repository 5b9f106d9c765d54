"""`lora-studio inspect` on files of every supported format, as a user runs it."""

import json
import subprocess
import sys

import pytest
from safetensors.torch import save_file

from studio.core.lora_files import write_lora
from tests.fixtures.lora_random import random_lora


def run_cli(*args):
    return subprocess.run(
        [sys.executable, "-m", "studio.app.cli", *map(str, args)], capture_output=True, text=True, timeout=120
    )


@pytest.fixture(scope="module")
def lora_files(tiny_sd15, tiny_sdxl, tmp_path_factory):
    d = tmp_path_factory.mktemp("loras")
    files = {
        "sd15_kohya": write_lora(
            random_lora(tiny_sd15, "sd15", rank=4, alpha=2, conv=True), d / "a.safetensors"
        ),
        "sdxl_kohya": write_lora(random_lora(tiny_sdxl, "sdxl", rank=8), d / "b.safetensors"),
        "sdxl_peft": write_lora(random_lora(tiny_sdxl, "sdxl", rank=2), d / "c.safetensors", fmt="peft"),
    }
    old = random_lora(tiny_sd15, "sd15", rank=2, text_encoder=False)
    save_file(
        {
            f"{p}.lora.{w}.weight": getattr(m, w).contiguous()
            for p, m in old.modules.items()
            for w in ("down", "up")
        },
        d / "old.safetensors",
    )
    files["sd15_old"] = d / "old.safetensors"
    return files


def test_inspect_every_format(lora_files):
    expected = {
        "sd15_kohya": ("sd15", "kohya", [4]),
        "sdxl_kohya": ("sdxl", "kohya", [8]),
        "sdxl_peft": ("sdxl", "peft", [2]),
        "sd15_old": ("sd15", "diffusers_old", [2]),
    }
    result = run_cli("inspect", "--json", *lora_files.values())
    assert result.returncode == 0, result.stderr
    infos = json.loads(result.stdout)
    for (name, (family, fmt, ranks)), info in zip(expected.items(), infos):
        assert (info["family"], info["format"], info["ranks"]) == (family, fmt, ranks), name
        assert info["size_bytes"] > 0 and info["blocks"]
    assert infos[0]["conv_modules"] > 0 and infos[0]["alphas"] == [2.0]
    assert infos[1]["text_encoders"] == ["text_encoder", "text_encoder_2"]
    assert infos[3]["text_encoders"] == []


def test_inspect_text_output(lora_files):
    result = run_cli("inspect", lora_files["sdxl_kohya"])
    assert result.returncode == 0, result.stderr
    out = result.stdout
    assert "family        SDXL" in out and "rank          8" in out and "OUT00" in out
    assert "ss_base_model_version: sdxl_base_v1-0" in out


def test_inspect_bad_file_one_line_error(tmp_path):
    bad = tmp_path / "bad.safetensors"
    bad.write_bytes(b"garbage!garbage!")
    result = run_cli("inspect", bad)
    assert result.returncode == 1
    assert result.stderr.startswith("error: ") and "bad.safetensors" in result.stderr
    assert "Traceback" not in result.stderr


def test_help_and_inspect_answer_without_torch(lora_files, tiny_sdxl, tmp_path):
    """The command line stays fast: --help and inspect (LyCORIS files and PEFT folders too) import no torch,
    diffusers or peft. Timings are in bench/results/cli_cpu.md."""
    from tests.fixtures.lycoris_files import lycoris_lora

    state, _ = lycoris_lora(tiny_sdxl, "sdxl", "lokr_decomposed")
    save_file(state, tmp_path / "lokr.safetensors")
    heavy = "[m for m in ('torch', 'diffusers', 'peft', 'transformers') if m in sys.modules]"
    for args in (["--help"], ["inspect", str(lora_files["sdxl_kohya"]), str(tmp_path / "lokr.safetensors")]):
        code = (
            "import sys, contextlib, io\nfrom studio.app.cli import main\n"
            f"with contextlib.redirect_stdout(io.StringIO()) as out:\n"
            f"    try:\n        main({args!r})\n    except SystemExit:\n        pass\n"
            f"print({heavy}, 'LoKr' in out.getvalue() or 'usage' in out.getvalue())"
        )
        done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
        assert done.stdout.strip() == "[] True", (args, done.stdout, done.stderr[-500:])
