"""The GPU check: one command that measures training and generation on a CUDA machine in under 10 minutes.

    python bench/gpu_check.py --reference <diffusers>/examples/dreambooth/train_dreambooth_lora.py \\
        --reference-sdxl <diffusers>/examples/dreambooth/train_dreambooth_lora_sdxl.py

Models: SD1.5 and SDXL in their real architectures with random weights, built from studio/core/configs
(nothing is downloaded) and saved once as fp16 diffusers folders in a scratch folder.
Training (lora-studio against diffusers' DreamBooth LoRA examples, identical settings: 512 px SD1.5 /
1024 px SDXL, batch 1, rank 16 on the attention projections, bf16, lr 1e-4): steady-state s/step from a
long and a short run, peak allocated CUDA memory, MFU; lora-studio also with gradient checkpointing,
8-bit Adam (bitsandbytes) and xformers when installed, and on every GPU at once (accelerate) when there are
several. Generation (fp16, 25 steps): base, 1 and 4 LoRAs unfused / fused, LoRA Switch, batched and
sequential LoRA Composite with 4 LoRAs.
Targets: training >= 1.3x the examples' speed at <= 0.8x their memory; switch <= 1.05x a single LoRA;
batched composite with 4 LoRAs <= 0.6x four sequential passes. Results: bench/results/gpu_<device>.md.

`--tiny` runs the same code on the tiny test models (any device, CPU included) to check the script itself.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from bench import bench_train  # noqa: E402

# dense bf16 peak TFLOP/s for MFU (vendor figures, no sparsity); other devices get no MFU
PEAK_TFLOPS = {"H100": 989.0, "H200": 989.0, "A100": 312.0, "L40S": 362.0, "4090": 165.0, "A10": 125.0}
SETTINGS = {"sd15": {"resolution": 512}, "sdxl": {"resolution": 1024}}


def unet_tflop_per_image(model: Path, family: str, resolution: int) -> float | None:
    """Training FLOPs per image (3 x the UNet forward's, counted by torch), in TFLOP."""
    try:
        from diffusers import UNet2DConditionModel
        from torch.utils.flop_counter import FlopCounterMode

        unet = UNet2DConditionModel.from_pretrained(model / "unet", torch_dtype=torch.bfloat16).to("cuda")
        latent = torch.randn(1, 4, resolution // 8, resolution // 8, device="cuda", dtype=torch.bfloat16)
        context = torch.randn(1, 77, unet.config.cross_attention_dim, device="cuda", dtype=torch.bfloat16)
        extra = {}
        if family == "sdxl":
            pooled = (
                unet.config.projection_class_embeddings_input_dim - 6 * unet.config.addition_time_embed_dim
            )
            extra = {"added_cond_kwargs": {"text_embeds": torch.randn(1, pooled, device="cuda", dtype=torch.bfloat16),
                                           "time_ids": torch.ones(1, 6, device="cuda", dtype=torch.bfloat16)}}  # fmt: skip
        with torch.no_grad(), FlopCounterMode(display=False) as counter:
            unet(latent, 500, context, **extra)
        del unet
        torch.cuda.empty_cache()
        return 3 * counter.get_total_flops() / 1e12
    except Exception as exc:  # a counter that cannot trace this torch build: no MFU, the rest stands
        print(f"flop count failed: {type(exc).__name__}: {exc}", file=sys.stderr)
        return None


def peak_tflops() -> float | None:
    name = torch.cuda.get_device_name(0) if torch.cuda.is_available() else ""
    return next((v for k, v in PEAK_TFLOPS.items() if k in name), None)


def training_rows(
    a, family: str, model: Path, data: Path, tmp: Path, env_ref: dict, env_ours: dict
) -> list[dict]:
    args = argparse.Namespace(resolution=a.resolution or SETTINGS[family]["resolution"], batch=1, rank=16,
                              lr=1e-4, precision=a.precision, steps=a.steps, steps_short=a.steps_short,
                              threads=a.threads)  # fmt: skip
    ours = {"lora-studio": [], "lora-studio + gradient checkpointing": ["gradient_checkpointing=true"]}
    if torch.cuda.is_available() and _importable("bitsandbytes"):
        ours["lora-studio + 8-bit Adam"] = ["optimizer=adamw8bit"]
    if _importable("xformers"):
        ours["lora-studio + xformers"] = ["attention=xformers"]
    rows = []
    for name, extra in ours.items():

        def argv(n, extra=extra, name=name):
            base = bench_train.ours_argv(args, model, data, tmp / f"{family}-{len(rows)}-{n}", n, cache=True)
            return base + [item for e in extra for item in ("--set", e)]

        rows.append({"family": family, "trainer": name, **bench_train.measure("ours", argv, env_ours, args)})
    gpus = torch.cuda.device_count()
    if gpus > 1:
        rows.append({"family": family, "trainer": f"lora-studio on {gpus} GPUs (accelerate)",
                     **multi_gpu(args, model, data, tmp / f"{family}-multi", gpus, env_ours)})  # fmt: skip
    script = a.reference if family == "sd15" else a.reference_sdxl
    if script:
        ref = bench_train.measure("ref", lambda n: bench_train.reference_argv(args, script, model, data,
                                                                            tmp / f"{family}-ref-{n}", n), env_ref, args)  # fmt: skip
        rows.append({"family": family, "trainer": "diffusers example", **ref})
    tflop = unet_tflop_per_image(model, family, args.resolution) if torch.cuda.is_available() else None
    for row in rows:
        row["resolution"] = args.resolution
        if tflop and peak_tflops() and "images_per_s" in row:
            gpus_used = gpus if "GPUs" in row["trainer"] else 1
            row["mfu"] = row["images_per_s"] * tflop / (peak_tflops() * gpus_used)
    return rows


def multi_gpu(args, model: Path, data: Path, out: Path, gpus: int, env: dict) -> dict:
    """Steady-state images/s of lora-studio on every GPU (each process batch 1: the global batch is gpus)."""
    times = {}
    for n in (args.steps_short, args.steps):
        argv = bench_train.ours_argv(args, model, data, out / str(n), n, cache=True)
        command = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", str(gpus),
                   "--mixed_precision", args.precision, "-m", "studio.app.cli", *argv]  # fmt: skip
        start = time.perf_counter()
        done = subprocess.run(command, env=env, capture_output=True, text=True, cwd=ROOT)
        if done.returncode:
            return {"error": " | ".join(done.stderr.strip().splitlines()[-4:])}
        times[n] = time.perf_counter() - start
    seconds = times[args.steps] - times[args.steps_short]
    return {"images_per_s": (args.steps - args.steps_short) * gpus / seconds,
            "step_s": seconds / (args.steps - args.steps_short)}  # fmt: skip


def generation_rows(a, family: str, model: Path, tmp: Path) -> list[dict]:
    from studio.core.lora_files import write_lora
    from studio.core.models import load_base
    from studio.generation import GenerateConfig, GenerationEngine, LoraSpec
    from tests.fixtures.lora_random import random_lora

    loaded = load_base(model, dtype=None if not torch.cuda.is_available() else "fp16")
    files = [write_lora(random_lora(loaded.pipe, family, rank=16, seed=i, scale=0.02), tmp / f"{family}-l{i}.safetensors",
                        overwrite=True) for i in range(4)]  # fmt: skip
    engine = GenerationEngine(loaded.pipe, family)
    size = a.resolution or SETTINGS[family]["resolution"]
    base = {
        "prompt": "a photo of a fox in the snow",
        "steps": a.gen_steps,
        "seed": 1,
        "width": size,
        "height": size,
    }
    stack = lambda k: [LoraSpec(f, 0.8) for f in files[:k]]  # noqa: E731
    cases = {
        "base (no LoRA)": {}, "1 LoRA unfused": {"loras": stack(1), "fuse": "off"},
        "1 LoRA fused": {"loras": stack(1), "fuse": "on"}, "4 LoRAs unfused": {"loras": stack(4), "fuse": "off"},
        "4 LoRAs fused": {"loras": stack(4), "fuse": "on"}, "switch K=4": {"loras": stack(4), "mode": "switch", "fuse": "off"},
        "composite K=4 batched": {"loras": stack(4), "mode": "composite"},
        "composite K=4 sequential": {"loras": stack(4), "mode": "composite", "composite_batched": False},
    }  # fmt: skip
    timings = {name: [] for name in cases}
    for _ in range(a.repeats):
        for name, extra in cases.items():
            cfg = GenerateConfig(**base, **extra)
            engine.prepare(cfg)
            _sync()
            start = time.perf_counter()
            engine.generate(cfg)
            _sync()
            timings[name].append(time.perf_counter() - start)
    return [{"family": family, "case": name, "s_per_image": statistics.median(t), "resolution": size}
            for name, t in timings.items()]  # fmt: skip


def _sync() -> None:
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def _importable(name: str) -> bool:
    return subprocess.run([sys.executable, "-c", f"import {name}"], capture_output=True).returncode == 0


def write_report(a, device: str, train: list[dict], gen: list[dict], seconds: float) -> Path:
    lines = [f"# GPU check: {device}", "", f"Machine: {bench_train.machine()}; {torch.cuda.device_count()} GPU(s); "
             f"check took {seconds / 60:.1f} min", "", "Command: `python bench/gpu_check.py " + " ".join(sys.argv[1:]) + "`",
             "", "## Training (steady state, batch 1 per GPU, rank 16, attention projections)", "",
             "| family | px | trainer | images/s | s/step | peak memory (MB) | MFU | speed vs diffusers | memory vs diffusers |",
             "|---|---|---|---|---|---|---|---|---|"]  # fmt: skip
    for family in ("sd15", "sdxl"):
        rows = [r for r in train if r["family"] == family]
        ref = next((r for r in rows if r["trainer"] == "diffusers example" and "images_per_s" in r), {})
        for r in rows:
            if "error" in r:
                lines.append(
                    f"| {family} | {r.get('resolution', '')} | {r['trainer']} | failed: {r['error'][:200]} | | | | | |"
                )
                continue
            speed = f"{r['images_per_s'] / ref['images_per_s']:.2f}x" if ref else "-"
            mem = f"{r['peak_mb'] / ref['peak_mb']:.2f}x" if ref and r.get("peak_mb") else "-"
            mfu = f"{100 * r['mfu']:.1f} %" if r.get("mfu") else "-"
            lines.append(f"| {family} | {r['resolution']} | {r['trainer']} | {r['images_per_s']:.3f} | {r['step_s']:.3f} | "
                         f"{r.get('peak_mb', 0):.0f} | {mfu} | {speed} | {mem} |")  # fmt: skip
    lines += [
        "",
        f"## Generation ({a.gen_steps} steps, fp16)",
        "",
        "| family | px | case | s / image | vs base |",
        "|---|---|---|---|---|",
    ]
    for family in ("sd15", "sdxl"):
        rows = {r["case"]: r for r in gen if r["family"] == family}
        for name, r in rows.items():
            ratio = r["s_per_image"] / rows["base (no LoRA)"]["s_per_image"]
            lines.append(f"| {family} | {r['resolution']} | {name} | {r['s_per_image']:.3f} | {ratio:.2f}x |")
        if rows:
            switch = rows["switch K=4"]["s_per_image"] / rows["1 LoRA unfused"]["s_per_image"]
            batched = (
                rows["composite K=4 batched"]["s_per_image"] / rows["composite K=4 sequential"]["s_per_image"]
            )
            lines.append(f"\n{family}: switch / single LoRA {switch:.2f} (target <= 1.05); batched / sequential composite "
                         f"{batched:.2f} (target <= 0.6)\n")  # fmt: skip
    folder = a.work if a.tiny else ROOT / "bench" / "results"  # a script check is not a result
    out = folder / f"gpu_{re.sub(r'[^A-Za-z0-9]+', '_', device).strip('_').lower()}.md"
    out.write_text("\n".join(lines) + "\n")
    (out.with_suffix(".json")).write_text(
        json.dumps({"training": train, "generation": gen}, indent=1, default=str)
    )
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--reference", type=Path, help="diffusers' examples/dreambooth/train_dreambooth_lora.py")
    p.add_argument("--reference-sdxl", type=Path, help="diffusers' train_dreambooth_lora_sdxl.py")
    p.add_argument("--reference-path", help="extra PYTHONPATH for the references' packages")
    p.add_argument("--family", choices=["sd15", "sdxl", "both"], default="both")
    p.add_argument("--work", type=Path, help="scratch folder for the models (kept between runs)")
    p.add_argument("--steps", type=int, default=12)
    p.add_argument("--steps-short", type=int, default=4)
    p.add_argument("--gen-steps", type=int, default=25)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--precision", default="bf16")
    p.add_argument("--threads", type=int, default=4)
    p.add_argument("--resolution", type=int, help="override 512 / 1024 (e.g. a small check on the CPU)")
    p.add_argument("--tiny", action="store_true", help="tiny test models: check the script on any machine")
    a = p.parse_args()
    started = time.time()
    device = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "cpu"
    if not torch.cuda.is_available() and not a.tiny:
        raise SystemExit("no CUDA device: run on a GPU machine, or pass --tiny to check the script here")
    a.work = work = a.work or Path(tempfile.mkdtemp(prefix="gpu-check-"))
    env_ours = dict(os.environ, HF_HUB_OFFLINE="1", PYTHONPATH=str(ROOT))
    env_ref, _ = bench_train.reference_env(work, a.reference_path)
    train, gen = [], []
    for family in ("sd15", "sdxl") if a.family == "both" else (a.family,):
        model = (bench_train.build_model(family, "tiny", work / f"tiny-{family}") if a.tiny
                 else bench_train.build_real(family, work / f"real-{family}"))  # fmt: skip
        data = bench_train.make_images(
            work / f"images-{family}", 4, a.resolution or SETTINGS[family]["resolution"]
        )
        train += training_rows(a, family, model, data, work, env_ref, env_ours)
        gen += generation_rows(a, family, model, work)
        print(json.dumps(train[-1], default=str), flush=True)
    out = write_report(a, device + (" (tiny check)" if a.tiny else ""), train, gen, time.time() - started)
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
