"""`lora-studio merge` on real files of every supported format, into-base, and every refusal."""

import json
import subprocess
import sys

import pytest
import torch
from merge_helpers import outputs_with
from safetensors.torch import save_file

from merging.into_base import merge_into_base
from studio.app.cli import main
from studio.core.blocks import block_of
from studio.core.lora_files import LoraModule, LoraSet, read_lora, write_lora
from studio.core.models import load_base
from studio.core.modules import model_module_shapes
from tests.fixtures.lora_random import random_lora
from tests.probes import unet_output


def _old_diffusers(lora: LoraSet, path):
    """Old diffusers keys: attention-processor style for attn1, `.lora.down` elsewhere."""
    state = {}
    for p, m in lora.modules.items():
        if p.endswith(("attn1.to_q", "attn1.to_out.0")):
            owner, proj = p.rsplit(".", 2)[0], ("to_out" if p.endswith("to_out.0") else "to_q")
            base = f"{owner}.processor.{proj}_lora"
        else:
            base = f"{p}.lora"
        state[f"{base}.down.weight"] = m.down.contiguous()
        state[f"{base}.up.weight"] = m.up.contiguous()
    save_file(state, path)
    return path


def _peft_with_alpha_metadata(lora: LoraSet, path):
    """Raw PEFT keys with alpha in lora_adapter_metadata (not folded into lora_B)."""
    state = {
        f"{p}.lora_{w}.weight": getattr(m, a).contiguous()
        for p, m in lora.modules.items()
        for w, a in (("A", "down"), ("B", "up"))
    }
    save_file(
        state, path, metadata={"lora_adapter_metadata": json.dumps({"unet.r": 4, "unet.lora_alpha": 2})}
    )
    return path


@pytest.fixture(scope="module")
def files(tiny_sd15, tiny_sdxl, tmp_path_factory):
    d = tmp_path_factory.mktemp("merge_cli")
    unet_only = {"text_encoder": False}
    xl_shapes = model_module_shapes(tiny_sdxl)
    b_lora_targets = [
        p for p in xl_shapes
        if p.startswith(("unet.up_blocks.0.attentions.0.", "unet.up_blocks.0.attentions.1."))
        and ".attn" in p and p.endswith(("to_q", "to_k", "to_v", "to_out.0"))
    ]  # fmt: skip
    sd15, sdxl = tiny_sd15, tiny_sdxl
    peft_raw = random_lora(sd15, "sd15", rank=4, seed=2, **unet_only)
    return {
        "sd15_kohya": write_lora(
            random_lora(sd15, "sd15", rank=4, alpha=2, seed=1, conv=True), d / "k.safetensors"
        ),
        "sd15_peft": _peft_with_alpha_metadata(peft_raw, d / "p.safetensors"),
        "sd15_old": _old_diffusers(
            random_lora(sd15, "sd15", rank=2, seed=3, **unet_only), d / "o.safetensors"
        ),
        "sdxl_kohya": write_lora(random_lora(sdxl, "sdxl", rank=8, alpha=4, seed=4), d / "xk.safetensors"),
        "sdxl_peft": write_lora(random_lora(sdxl, "sdxl", rank=2, seed=5), d / "xp.safetensors", fmt="peft"),
        "sdxl_b_lora": write_lora(
            random_lora(sdxl, "sdxl", rank=4, seed=6, targets=b_lora_targets),
            d / "xb.safetensors",
            fmt="peft",
        ),
    }


def _expect_weighted_sum(out, parts):
    merged = read_lora(out)
    expected: dict[str, torch.Tensor] = {}
    for path, weight, blocks in parts:
        for p, m in read_lora(path).modules.items():
            w = weight * (blocks.get(block_of(p), 1.0) if blocks else 1.0)
            if w:
                expected[p] = expected.get(p, 0) + w * m.delta().flatten(1)
    assert set(merged.modules) == set(expected)
    for p, delta in expected.items():
        torch.testing.assert_close(merged.modules[p].delta().flatten(1), delta, atol=1e-6, rtol=1e-5, msg=p)
    return merged


def test_cli_merges_every_format_exactly(files, tmp_path, capsys):
    out = tmp_path / "sd15.safetensors"
    args = [
        f"{files['sd15_kohya']}:0.5",
        f"{files['sd15_peft']}:0.8",
        f"{files['sd15_old']}:1.2",
        "--out",
        str(out),
    ]
    assert main(["merge", *args]) == 0
    printed = capsys.readouterr().out
    assert "merge (concat): 3 sources" in printed and f"wrote lora: {out}" in printed
    assert {m.scale for m in read_lora(files["sd15_peft"]).modules.values()} == {0.5}  # alpha from metadata
    _expect_weighted_sum(
        out,
        [(files["sd15_kohya"], 0.5, None), (files["sd15_peft"], 0.8, None), (files["sd15_old"], 1.2, None)],
    )

    out = tmp_path / "sdxl.safetensors"
    style_only = {"OUT00": 0.0}  # the B-LoRA's style half: OUT01 only
    args = [
        f"{files['sdxl_kohya']}:0.7",
        f"{files['sdxl_b_lora']}:1:{','.join(['0'] * 7 + ['1'] + ['0'] * 4)}",
    ]
    assert main(["merge", *args, "--out", str(out), "--format", "peft"]) == 0
    merged = _expect_weighted_sum(
        out, [(files["sdxl_kohya"], 0.7, None), (files["sdxl_b_lora"], 1.0, {**style_only, "OUT01": 1.0})]
    )
    assert merged.source_format == "peft"


def test_cli_as_a_user_runs_it(files, tmp_path):
    out = tmp_path / "ties.safetensors"
    cmd = [sys.executable, "-m", "studio.app.cli", "merge", "--preset", "merge_ties", "--set", "rank=3", "--json",
           f"{files['sdxl_kohya']}:0.6", str(files["sdxl_peft"]), "--out", str(out)]  # fmt: skip
    done = subprocess.run(
        cmd, capture_output=True, text=True, timeout=300, env={**_env(), "OMP_NUM_THREADS": "1"}
    )
    assert done.returncode == 0, done.stderr
    printed = json.loads(done.stdout)
    assert printed["outputs"]["lora"] == str(out) and printed["report"]["method"] == "ties"
    merged = read_lora(out)
    report = json.loads(merged.metadata["studio_merge_report"])
    assert merged.ranks == [3] and report["details"]["density"] == 0.5 and len(report["sources"]) == 2
    assert {s["label"] for s in report["sources"]} == {"xk.safetensors", "xp.safetensors"}


@pytest.mark.parametrize(
    "case, message",
    [
        ("families", "different model families: .* is SDXL"),
        ("shapes", "adapts it with shape .* cannot be merged"),
        ("exists", "already exists; choose another name or pass --overwrite"),
        ("weight", "weight 'half' is not a number"),
        ("missing", "nope.safetensors: no such file"),
        ("blocks", "block weights '1,0,0'.*12 \\(SDXL\\), 17 \\(SD1.x\\)"),
        ("into_base", "--into-base .* give the model with --model"),
    ],
)
def test_cli_refusals(case, message, files, tmp_path, capsys):
    out = tmp_path / "out.safetensors"
    k = str(files["sd15_kohya"])
    if case == "shapes":
        lora = read_lora(files["sd15_kohya"])
        path = next(p for p in lora.modules if p.endswith("attn2.to_k"))
        m = lora.modules[path]
        bad = LoraSet({path: LoraModule(torch.zeros(m.rank, m.down.shape[1] + 3), m.up, m.alpha)}, "sd15")
        args = [k, str(write_lora(bad, tmp_path / "bad.safetensors"))]
    elif case == "exists":
        out.write_bytes(b"keep me")
        args = [k]
    argv = {
        "families": [k, str(files["sdxl_kohya"])],
        "weight": [f"{k}:half"],
        "missing": [str(tmp_path / "nope.safetensors")],
        "blocks": [f"{k}:1:1,0,0"],
        "into_base": [k, "--into-base", str(tmp_path / "model.safetensors")],
    }.get(case) or args
    assert main(["merge", *argv, "--out", str(out)]) == 1
    err = capsys.readouterr().err
    assert err.startswith("error: ") and "Traceback" not in err
    assert __import__("re").search(message, err), err
    if case == "exists":
        assert out.read_bytes() == b"keep me"


def test_family_that_files_do_not_tell(tiny_sd15, tmp_path, capsys):
    path = "unet.down_blocks.1.attentions.0.transformer_blocks.0.attn1.to_q"
    m = random_lora(tiny_sd15, "sd15", targets=[path]).modules[path]
    save_file(
        {f"{path}.lora_A.weight": m.down, f"{path}.lora_B.weight": m.up}, tmp_path / "plain.safetensors"
    )
    argv = ["merge", str(tmp_path / "plain.safetensors"), "--out", str(tmp_path / "out.safetensors")]
    assert main(argv) == 1
    assert "pass --family sd15 or --family sdxl" in capsys.readouterr().err
    assert main([*argv, "--family", "sd15"]) == 0
    assert read_lora(tmp_path / "out.safetensors").family == "sd15"


def test_ziplora_cli_refuses_loras_with_nothing_in_common(tiny_sd15, tiny_sd15_dir, tmp_path, capsys):
    shapes = model_module_shapes(tiny_sd15)
    a = write_lora(
        random_lora(tiny_sd15, "sd15", targets=[p for p in shapes if ".attn1." in p]),
        tmp_path / "a.safetensors",
    )
    b = write_lora(
        random_lora(tiny_sd15, "sd15", targets=[p for p in shapes if ".attn2." in p]),
        tmp_path / "b.safetensors",
    )
    argv = ["merge", "--method", "ziplora", "--model", str(tiny_sd15_dir), str(a), str(b),
            "--prompt", "a, b", "--prompt", "c", "--out", str(tmp_path / "z.safetensors")]  # fmt: skip
    assert main(argv) == 1
    assert "nothing in common to merge" in capsys.readouterr().err


def test_into_base_checkpoint(files, tiny_sd15_dir, tiny_sd15_config, fresh_sd15, tmp_path):
    out = tmp_path / "baked.safetensors"
    assert (
        main(["merge", f"{files['sd15_kohya']}:0.8", "--model", str(tiny_sd15_dir), "--into-base", str(out)])
        == 0
    )
    baked = load_base(out, config_dir=tiny_sd15_config, device="cpu").pipe
    expected, _ = outputs_with(fresh_sd15, [(read_lora(files["sd15_kohya"]), 0.8, None)])
    torch.testing.assert_close(unet_output(baked), expected, atol=1e-5, rtol=1e-5)


def test_into_base_restores_a_shared_pipeline(files, fresh_sd15, tmp_path):
    before = {k: v.clone() for k, v in fresh_sd15.unet.state_dict().items()}
    merge_into_base(read_lora(files["sd15_kohya"]), fresh_sd15, "sd15", tmp_path / "x.safetensors")
    assert all(torch.equal(v, before[k]) for k, v in fresh_sd15.unet.state_dict().items())
    assert (tmp_path / "x.safetensors").stat().st_size > 0


def _env():
    import os

    return dict(os.environ)


def test_every_merge_preset_is_a_valid_merge():
    from merging.config import MergeConfig
    from studio.core.options import build_config, load_preset, preset_names

    assert {"ties", "ziplora", "fusion_subjects"} <= set(preset_names("merge"))
    given = {"sources": ["a.safetensors", "b.safetensors"], "out": "m.safetensors", "model": "base",
             "prompts": ["a sks dog", "a zwx cat"]}  # fmt: skip
    for name in preset_names("merge"):
        build_config(MergeConfig, load_preset(name, "merge") | given).check()
