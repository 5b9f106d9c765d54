"""Merge benchmarks: time and peak memory of every method on SD1.5 / SDXL-shaped LoRAs, and ZipLoRA against
the reference implementation's algorithm.

Part "methods": two random LoRAs (rank 32 and 16, fp16, kohya's default targets with the text encoders) shaped
from the real SD1.5 / SDXL configs (studio/core/configs, built on the meta device: no weights). Each method runs in
a fresh subprocess: wall time of each phase (read, merge, report, write) and the process's peak RSS.

Part "model": the methods that run the base model (ziplora, ziplora-fast, fusion) on the built-in demo models
(studio/demo/weights), two random rank-4 LoRAs on the attention projections: wall time and peak RSS of the whole
`lora-studio merge` process, against an SVD merge of the same pair.

Part "real": fusion and ZipLoRA-fast on random-weight models of the real SD1.5 / SDXL architectures (written once
under --real-cache), two rank-8 LoRAs on the attention projections, at --real-resolution: the same measures.

Part "ziplora": ZipLoRA against the reference implementation's algorithm (bench/ziplora_reference.py).

    python bench/bench_merge.py                      # every part, writes bench/results/merge_cpu.md
    python bench/bench_merge.py --part ziplora --zip-steps 50
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from types import SimpleNamespace

import torch
from records import cpu_name, previous_notes  # bench/ is on the path when run as a script
from ziplora_reference import part_ziplora, zip_table

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
METHODS = ("concat", "svd", "ties", "dare", "magnitude", "orthogonal")


# ----------------------------------------------------------------------------------------------------
# part 1: every method on real SD1.5 / SDXL shapes


def meta_pipe(family: str):
    """UNet and text encoders of the real config, on the meta device (shapes only)."""
    from accelerate import init_empty_weights
    from diffusers import UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    folder = ROOT / "studio" / "core" / "configs" / family
    with init_empty_weights():
        unet = UNet2DConditionModel.from_config(UNet2DConditionModel.load_config(folder / "unet"))
        te = CLIPTextModel(CLIPTextConfig.from_json_file(folder / "text_encoder" / "config.json"))
        te2 = None
        if family == "sdxl":
            te2 = CLIPTextModelWithProjection(
                CLIPTextConfig.from_json_file(folder / "text_encoder_2" / "config.json")
            )
    return SimpleNamespace(unet=unet, text_encoder=te, text_encoder_2=te2)


def make_sources(family: str, folder: Path, ranks=(32, 16)) -> list[Path]:
    from studio.core.lora_files import write_lora
    from tests.fixtures.lora_random import random_lora

    pipe = meta_pipe(family)
    paths = []
    for seed, rank in enumerate(ranks, start=1):
        lora = random_lora(pipe, family, rank=rank, alpha=rank / 2, seed=seed, scale=0.02)
        paths.append(write_lora(lora, folder / f"{family}_r{rank}.safetensors", dtype=torch.float16))
    return paths


def rss_mb(field: str = "VmRSS") -> float:
    """This process's resident memory (VmRSS) or its peak (VmHWM). The peak is read here rather than from
    getrusage, whose figure for a process forked from a larger one starts at that one's size."""
    with open("/proc/self/status") as f:
        line = next(x for x in f if x.startswith(field))
    return int(line.split()[1]) / 1024


def apply_variant(variant: str) -> dict:
    """The levers of the dense merges, one at a time against the default (see merging/ties_dare.py): an exact
    k-th value instead of the sampled threshold (or a sample 4x or 16x larger), peft's stacked sign election and
    disjoint mean instead of the running sums, whole modules at once instead of blocks of rows, 2 power
    iterations instead of 1, 10 extra columns in the SVD's sketch instead of 4, one worker thread (on every
    core) instead of one per core, a randomized SVD of the merged matrix instead of the sources' span."""
    import merging.linear
    import merging.ties_dare as td

    options = {}
    for part in filter(None, variant.split("+")):
        if part == "exact-threshold":
            td.THRESHOLD_SAMPLE = 1 << 62
        elif part.startswith("sample"):
            td.THRESHOLD_SAMPLE = 1 << int(part[6:])
        elif part == "randomized-svd":
            td._sketch_matrix = lambda *args: None
        elif part == "unblocked":
            td.BLOCK = 1 << 62
        elif part == "peft-combine":
            from peft.utils import merge_utils

            def peft_combine(tasks, weights, sign, out, work=()):
                stacked = torch.stack(tasks)
                weighted = stacked * torch.tensor(weights).reshape(-1, *[1] * (stacked.dim() - 1))
                if sign is None:
                    return out.copy_(weighted.sum(0))
                mask = merge_utils.calculate_majority_sign_mask(stacked, method=sign)
                return out.copy_(merge_utils.disjoint_merge(weighted, mask))

            td._combine = peft_combine
        elif part.startswith("oversample"):
            merging.linear.OVERSAMPLE = int(part[10:])
        elif part.startswith("niter"):
            merging.linear.POWER_ITERATIONS = int(part[5:])
        elif part.startswith("workers"):
            options["workers"] = int(part[7:])
        else:
            raise SystemExit(f"unknown variant {part!r}")
    return options


def child(method: str, sources: list[str], rank: int, out: str, variant: str = "") -> dict:
    """One merge, phase by phase (runs in its own process)."""
    options = apply_variant(variant)
    from merging import MergeConfig, merge_factors
    from merging.output import write_merge
    from merging.report import build_report
    from merging.sources import layouts, load_sources, lora_from_factors
    from studio.core.options import build_config

    cfg = build_config(MergeConfig, sources=sources, method=method, rank=rank, out=out)
    timings = {}
    start = time.perf_counter()
    srcs, family = load_sources(cfg.source_refs())
    timings["read"] = time.perf_counter() - start
    before = rss_mb()
    start = time.perf_counter()
    if options and method in ("ties", "dare", "dare-ties", "magnitude"):
        from merging.run import Merged
        from merging.ties_dare import dense_merge

        factors, _ = dense_merge(
            srcs, method, rank=rank, density=cfg.density, sign_method=cfg.sign_method, **options
        )
        merged = Merged(factors)
    else:
        merged = merge_factors(cfg, srcs)
    timings["merge"] = time.perf_counter() - start
    start = time.perf_counter()
    report = build_report(method, srcs, merged.factors, probes=cfg.probes)
    timings["report"] = time.perf_counter() - start
    start = time.perf_counter()
    lora = lora_from_factors(merged.factors, layouts(srcs), family)
    path, _ = write_merge(lora, out, family=family, method=method, sources=srcs, report=report)
    timings["write"] = time.perf_counter() - start
    peak = rss_mb("VmHWM")
    return {
        **{k: round(v, 2) for k, v in timings.items()},
        "modules": len(merged.factors),
        "rank": "-".join(map(str, sorted({report.ranks[0], report.ranks[-1]}))),
        "file_mb": round(path.stat().st_size / 2**20, 1),
        "exactness": report.exactness,
        "rss_before_mb": round(before),
        "peak_rss_mb": round(peak),
    }


def part_methods(families: list[str], rank: int, work: Path, methods=None, variants=("",),
                 source_ranks=(32, 16)) -> list[dict]:  # fmt: skip
    rows = []
    for family in families:
        sources = make_sources(family, work, source_ranks)
        for method, variant in [(m, v) for m in (methods or METHODS) for v in variants]:
            out = work / f"{family}_{method}_{variant or 'default'}.safetensors"
            cmd = [sys.executable, __file__, "--child", method, "--rank", str(rank), "--out", str(out)]
            cmd += ["--variant", variant] if variant else []
            cmd += [f"{s}:0.7" for s in sources]
            done = subprocess.run(cmd, capture_output=True, text=True, timeout=3600)
            if done.returncode != 0:
                raise SystemExit(f"{family} {method} failed:\n{done.stderr[-3000:]}")
            row = {"family": family, "method": method + (f" [{variant}]" if variant else ""),
                   **json.loads(done.stdout.strip().splitlines()[-1])}  # fmt: skip
            rows.append(row)
            print(row, flush=True)
    return rows


# ----------------------------------------------------------------------------------------------------
# part 2: the methods that run the base model


MODEL_METHODS = ("svd", "ziplora-fast", "ziplora", "fusion")


def part_model(families: list[str], work: Path, steps: int) -> list[dict]:
    """ZipLoRA, ZipLoRA-fast and fusion on the built-in demo models, next to an SVD merge of the same pair:
    each a whole `lora-studio merge` process, its wall time and peak RSS (the operating system's count)."""
    from studio.core.lora_files import write_lora
    from studio.demo import load_demo_pipeline
    from tests.fixtures.lora_random import random_lora

    rows = []
    for family in families:
        pipe = load_demo_pipeline(family)
        attn = _attention_paths(pipe)
        paths = [
            write_lora(
                random_lora(pipe, family, rank=4, seed=s, scale=0.12, targets=attn),
                work / f"{family}_m{s}.safetensors",
            )
            for s in (1, 2)
        ]
        model = ROOT / "studio" / "demo" / "weights" / family
        for method in MODEL_METHODS:
            cmd = [*(f"{p}:0.8" for p in paths), "--method", method, "--rank", "8", "--overwrite",
                   "--out", str(work / f"{family}_{method}.safetensors")]  # fmt: skip
            if method != "svd":
                cmd += ["--model", str(model), "--steps", str(steps), "--prompt", "a photo of a red circle",
                        "--prompt", "a drawing in zwx style"]  # fmt: skip
            timed = _timed_merge(cmd, work / f"{family}_{method}.log")
            row = {
                "family": family,
                "method": method,
                **timed,
                "steps": steps if "ziplora" in method else "-",
            }
            rows.append(row)
            print(row, flush=True)
    return rows


def model_table(rows: list[dict]) -> list[str]:
    lines = ["| model | method | steps | wall s | x SVD | peak RSS MB |", "|---|---|---|---|---|---|"]
    svd = {r["family"]: r["wall_s"] for r in rows if r["method"] == "svd"}
    for r in rows:
        ratio = f"{r['wall_s'] / svd[r['family']]:.1f}x" if svd.get(r["family"]) else "-"
        lines.append(
            f"| {r['family']} | {r['method']} | {r['steps']} | {r['wall_s']} | {ratio} | {r['peak_rss_mb']} |"
        )
    return lines


REAL_METHODS = ("svd", "fusion", "ziplora-fast")


def part_real(
    families: list[str], work: Path, cache: Path, resolution: int, methods=REAL_METHODS, dtype: str = "fp32"
) -> list[dict]:
    """Fusion and ZipLoRA-fast at real SD1.5 / SDXL shapes: a random-weight model of the real architecture
    (bench_train.build_real, fp16 on disk, run in fp32), two random rank-8 LoRAs on the attention
    projections, one reference image each at `resolution`; each a whole `lora-studio merge` process (the model
    run in `dtype`: fp32, or bf16 to halve its memory)."""
    import numpy as np
    from bench_train import build_real
    from PIL import Image

    from studio.core.lora_files import write_lora
    from tests.fixtures.lora_random import random_lora

    rows = []
    for family in families:
        model = build_real(family, cache / f"real-{family}")
        shapes = meta_pipe(family)
        attn = _attention_paths(shapes)
        paths, refs = [], []
        for s in (1, 2):
            lora = random_lora(shapes, family, rank=8, seed=s, scale=0.05, targets=attn)
            paths.append(write_lora(lora, work / f"{family}_real{s}.safetensors"))
            folder = work / f"{family}_refs{s}"
            folder.mkdir(exist_ok=True)
            noise = np.random.default_rng(s).integers(0, 256, (resolution, resolution, 3), dtype=np.uint8)
            Image.fromarray(noise).save(folder / "0.png")
            refs.append(folder)
        for method in methods:
            cmd = [*(f"{p}:0.8" for p in paths), "--method", method, "--rank", "16", "--overwrite",
                   "--out", str(work / f"{family}_real_{method}.safetensors")]  # fmt: skip
            if method != "svd":
                cmd += ["--model", str(model), "--resolution", str(resolution),
                        "--prompt", "a photo of sks dog", "--prompt", "a painting in zwx style",
                        "--references", str(refs[0]), "--references", str(refs[1]), "--dtype", dtype]  # fmt: skip
            row = _timed_merge(cmd, work / f"{family}_real_{method}.log")
            rows.append({"family": family, "method": method, "resolution": resolution, **row} | (
                {"dtype": dtype} if method != "svd" and dtype != "fp32" else {}))  # fmt: skip
            print(rows[-1], flush=True)
    return rows


def _attention_paths(pipe) -> list[str]:
    from studio.core.modules import model_module_shapes

    ends = ("to_q", "to_k", "to_v", "to_out.0")
    return [
        p for p in model_module_shapes(pipe) if p.startswith("unet.") and ".attn" in p and p.endswith(ends)
    ]


# Runs a command and prints its peak RSS. A child forked from this (large) process starts with this process's
# resident pages counted in its peak, which exec keeps; forked from this small wrapper, it does not.
PEAK_WRAPPER = (
    "import resource, subprocess, sys; code = subprocess.call(sys.argv[1:]); "
    "print('PEAK', resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss); sys.exit(code)"
)


def _timed_merge(args: list[str], log: Path) -> dict:
    """Wall seconds and peak RSS of one `lora-studio merge` process."""
    start = time.perf_counter()
    cmd = [sys.executable, "-c", PEAK_WRAPPER, sys.executable, "-m", "studio.app.cli", "merge", *args]
    with open(log, "w") as out:
        done = subprocess.run(cmd, cwd=log.parent, env={**os.environ, "PYTHONPATH": str(ROOT)},
                              stdout=out, stderr=subprocess.STDOUT)  # fmt: skip
    text = log.read_text()
    if done.returncode != 0:
        raise SystemExit(f"merge {' '.join(args)} failed:\n{text[-3000:]}")
    peak = int(text.rsplit("PEAK ", 1)[1].split()[0])
    return {"wall_s": round(time.perf_counter() - start, 1), "peak_rss_mb": round(peak / 1024)}


def real_table(rows: list[dict]) -> list[str]:
    """The rows, then each run's command and machine (rows may come from several runs)."""
    runs = list(dict.fromkeys((r.get("command", ""), r.get("machine", "")) for r in rows))
    lines = ["| model | method | resolution | wall s | peak RSS MB | run |", "|---|---|---|---|---|---|"]
    for r in rows:
        run = runs.index((r.get("command", ""), r.get("machine", ""))) + 1
        lines.append(
            f"| {r['family']} | {r['method']}{', ' + r['dtype'] + ' model' if 'dtype' in r else ''} | "
            f"{r['resolution']} | {r['wall_s']} | {r['peak_rss_mb']} | {run} |"
        )
    lines.append("")
    lines += [f"Run {i}: `{command}`; {where}" for i, (command, where) in enumerate(runs, 1)]
    return lines


# ----------------------------------------------------------------------------------------------------
# results


def machine() -> str:
    cpu = cpu_name()
    load = ", ".join(f"{x:.1f}" for x in os.getloadavg())
    return (
        f"CPU {cpu}, {os.cpu_count()} cores, torch {torch.__version__} ({torch.get_num_threads()} threads), "
        f"Python {platform.python_version()}; load average at the end {load} (machine shared with other work)"
    )


def methods_table(rows: list[dict]) -> list[str]:
    lines = [
        "| model | method | read s | merge s | report s | write s | peak RSS MB | modules | rank | file MB | "
        "difference from exact sum |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        lines.append(
            f"| {r['family']} | {r['method']} | {r['read']} | {r['merge']} | {r['report']} | {r['write']} | "
            f"{r['peak_rss_mb']} | {r['modules']} | {r['rank']} | {r['file_mb']} | {r['exactness']:.3g} |"
        )
    return lines


def write_results(name: str, results: dict, setup: dict) -> Path:
    """Write bench/results/<name>.md; parts not run this time are kept from the previous file."""
    path = ROOT / "bench" / "results" / f"{name}.md"
    data = _previous_data(path)
    if results.get("methods"):
        data["methods"] = {"machine": machine(), "rows": results["methods"], **setup}
    if results.get("model"):
        data["model"] = {"machine": machine(), "rows": results["model"], "command": setup["command"]}
    if results.get("real"):  # rows of other models and methods are kept: each row says its run
        run = {"machine": machine(), "command": setup["command"]}
        new = [row | run for row in results["real"]]
        key = lambda r: (r["family"], r["method"], r["resolution"], r.get("dtype", "fp32"))  # noqa: E731
        done = {key(r) for r in new}
        kept = data.get("real", {}).get("rows", [])
        data["real"] = {"rows": [r for r in kept if key(r) not in done] + new}
    zip_results = results.get("ziplora", [])
    for result in zip_results:
        data.setdefault("ziplora", {})[result["size"]] = {"machine": machine(), **result}
    lines = [f"# Merge benchmark ({name})", "", "Written by bench/bench_merge.py.", ""]
    if "methods" in data:
        part = data["methods"]
        ranks = " + ".join(map(str, part.get("source_ranks", (32, 16))))
        lines += [f"## Methods on SD1.5 / SDXL-shaped LoRAs (ranks {ranks}, fp16, with text encoders)", ""]
        lines += [f"Machine: {part['machine']}", ""]
        lines += [f"Command: `{part['command']}`", ""] if "command" in part else []
        lines += methods_table(part["rows"]) + [""]
    titles = {
        "model": "Methods that run the base model (built-in demo models, 2 LoRAs of rank 4, rank 8 out)",
        "real": "Fusion and ZipLoRA-fast at real shapes (random weights, 2 LoRAs of rank 8 on the attention)",
    }
    if "model" in data:
        part = data["model"]
        lines += [f"## {titles['model']}", "", f"Machine: {part['machine']}", ""]
        lines += [f"Command: `{part['command']}`", ""] + model_table(part["rows"]) + [""]
    if "real" in data:
        lines += [f"## {titles['real']}", ""] + real_table(data["real"]["rows"]) + [""]
    for result in data.get("ziplora", {}).values():
        model = (
            "tiny SDXL" if result["size"] == "tiny" else "small SDXL-shaped model (UNet widths 128/256/256)"
        )
        lines += [
            f"## ZipLoRA against the reference algorithm ({model}, {result['side']} px, 2 LoRAs of rank 4)",
            "",
        ]
        lines += [f"Machine: {result['machine']}", ""] + zip_table(result) + [""]
        lines += ["Objective curves (step, train seconds, objective):", "", "```"]
        for k, v in result["runs"].items():
            lines.append(f"{k}: " + ", ".join(f"({s}, {t:.1f}, {o:.5g})" for s, t, o in v["points"]))
        lines += ["```", ""]
    lines += [previous_notes(path, "<!-- data: "), f"<!-- data: {json.dumps(data)} -->", ""]
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("\n".join(lines))
    return path


def _previous_data(path: Path) -> dict:
    if not path.exists():
        return {}
    text = path.read_text()
    start = text.rfind("<!-- data: ")
    if start < 0:
        return {}
    return json.loads(text[start + len("<!-- data: ") : text.index(" -->", start)])


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--part", default="methods,model,ziplora", help="methods, model, real and/or ziplora")
    parser.add_argument("--model-steps", type=int, default=20, help="ziplora steps in part model")
    parser.add_argument("--real-resolution", type=int, default=512, help="image size in part real")
    parser.add_argument(
        "--real-cache", default="/tmp/lora-studio-real", help="where part real keeps its models"
    )
    parser.add_argument(
        "--real-dtype", default="fp32", choices=("fp32", "bf16"), help="model dtype in part real"
    )
    parser.add_argument("--families", default="sd15,sdxl")
    parser.add_argument("--rank", type=int, default=32, help="rank of svd/ties/dare/magnitude results")
    parser.add_argument("--zip-steps", type=int, default=100)
    parser.add_argument("--eval-every", type=int, default=10)
    parser.add_argument(
        "--zip-size", default="tiny", help="tiny (64 px) and/or small (4x wider UNet, 128 px)"
    )
    parser.add_argument("--name", default="merge_cpu")
    parser.add_argument("--methods", help="only these methods (comma-separated; default: all)")
    parser.add_argument(
        "--variants",
        default="",
        help="dense-merge levers to compare, comma-separated "
        "('' = the default; exact-threshold, sampleN (2**N entries), unblocked, peft-combine, randomized-svd, "
        "niterN, oversampleN, workersN, joined with +)",
    )
    parser.add_argument("--source-ranks", default="32,16", help="ranks of the two random source LoRAs")
    parser.add_argument("--child", help=argparse.SUPPRESS)
    parser.add_argument("--variant", default="", help=argparse.SUPPRESS)
    parser.add_argument("--out", help=argparse.SUPPRESS)
    parser.add_argument("sources", nargs="*", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        print(json.dumps(child(args.child, args.sources, args.rank, args.out, args.variant)))
        return
    parts = set(args.part.split(","))
    ranks = tuple(int(r) for r in args.source_ranks.split(","))
    families = args.families.split(",")
    results = {}
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        if "methods" in parts:
            chosen = args.methods.split(",") if args.methods else None
            variants = tuple(args.variants.split(",")) if args.variants else ("",)
            results["methods"] = part_methods(families, args.rank, work, chosen, variants, ranks)
            print("\n".join(methods_table(results["methods"])))
        if "model" in parts:
            results["model"] = part_model(families, work, args.model_steps)
            print("\n".join(model_table(results["model"])))
        if "real" in parts:
            chosen = args.methods.split(",") if args.methods else REAL_METHODS
            results["real"] = part_real(
                families, work, Path(args.real_cache), args.real_resolution, chosen, args.real_dtype
            )
            print("\n".join(real_table(results["real"])))
        if "ziplora" in parts:
            results["ziplora"] = [
                part_ziplora(work, args.zip_steps, args.eval_every, z) for z in args.zip_size.split(",")
            ]
            for zip_result in results["ziplora"]:
                print("\n".join(zip_table(zip_result)))
    setup = {"source_ranks": ranks, "command": "python bench/bench_merge.py " + " ".join(sys.argv[1:])}
    print(f"wrote {write_results(args.name, results, setup)}")


if __name__ == "__main__":
    main()
