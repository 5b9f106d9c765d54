"""Generation speed with LoRA stacks, switch and composite, against the same pipeline without LoRAs.

In one run, per model: seconds per image for
  - the base pipeline (no LoRA),
  - stacks of 1 / 2 / 4 LoRAs, unfused (peft layers) and fused (deltas merged into the weights),
  - LoRA Switch with 2 LoRAs (target: within 5 % of plain single-LoRA generation),
  - LoRA Composite with K = 2 and 4, batched (one UNet call per step) against K sequential passes per
    step (the reference implementation's way),
and the cost of a weight change between images (set_scale on the pre-collected peft layers), next to
diffusers' `set_adapters` on the same adapters. The LoRA files are read and injected before any timing;
each timing is the median of --repeats runs taken round robin over the cases (a shared machine's load
spreads over all of them); the switch from one case's stack to the next (unfusing, fusing) is done
untimed with GenerationEngine.prepare, so each figure is the steady cost of an image.

Models: "tiny" (tests.fixtures.tiny, 64 px) and "sd15": the real SD1.5 architecture (UNet, CLIP-L, VAE from
studio/core/configs/sd15) with random weights, at a reduced resolution (--size). Random LoRAs of --rank on
kohya's default targets (attention + text encoder).

    python bench/bench_generate.py                         # both models, writes bench/results/generate_cpu.md
    python bench/bench_generate.py --models tiny --repeats 5
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import sys
import tempfile
import time
import warnings
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))  # the tiny models and random LoRAs of tests/fixtures

from studio.core.lora_files import write_lora  # noqa: E402
from studio.generation import GenerateConfig, GenerationEngine, LoraSpec  # noqa: E402
from tests.fixtures.lora_random import random_lora  # noqa: E402


def real_sd15_pipeline():
    """SD1.5's real architecture with random weights, built from the shipped configs (nothing downloaded)."""
    from diffusers import AutoencoderKL, PNDMScheduler, StableDiffusionPipeline, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    from studio.core.models import CONFIGS
    from studio.core.tokenizers import clip_tokenizer

    torch.manual_seed(0)
    folder = CONFIGS / "sd15"
    pipe = StableDiffusionPipeline(
        vae=AutoencoderKL.from_config(AutoencoderKL.load_config(folder / "vae")),
        text_encoder=CLIPTextModel(CLIPTextConfig.from_json_file(folder / "text_encoder" / "config.json")),
        tokenizer=clip_tokenizer(),
        unet=UNet2DConditionModel.from_config(UNet2DConditionModel.load_config(folder / "unet")),
        scheduler=PNDMScheduler.from_config(PNDMScheduler.load_config(folder / "scheduler")),
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )
    pipe.set_progress_bar_config(disable=True)
    return pipe


def tiny_pipeline():
    from tests.fixtures.tiny import tiny_sd15_pipeline

    return tiny_sd15_pipeline(seed=0)


def make_loras(pipe, n: int, rank: int, folder: Path) -> list[Path]:
    return [
        write_lora(random_lora(pipe, "sd15", rank=rank, seed=i, scale=0.02), folder / f"lora{i}.safetensors")
        for i in range(n)
    ]


def timed(gen: GenerationEngine, cfg: GenerateConfig) -> tuple[float, float]:
    """(CPU seconds, wall seconds) of one image. CPU time of this process is the main figure: with one
    torch thread it is what the image costs, whatever other jobs on a shared machine take from it."""
    gen.prepare(cfg)  # untimed: leaving the previous case's state (e.g. unfusing it), fusing this one
    cpu, wall = time.process_time(), time.perf_counter()
    gen.generate(cfg)
    return time.process_time() - cpu, time.perf_counter() - wall


def cases(files: list[Path]) -> list[tuple[str, dict]]:
    def stack(k: int) -> list[LoraSpec]:
        return [LoraSpec(f, 0.8) for f in files[:k]]

    out = [("base (no LoRA)", {})]
    for k in (1, 2, 4):
        out.append((f"merge {k} LoRA unfused", {"loras": stack(k), "fuse": "off"}))
    for k in (1, 2, 4):
        out.append((f"merge {k} LoRA fused", {"loras": stack(k), "fuse": "on"}))
    out.append(("switch K=2, tau=2", {"loras": stack(2), "mode": "switch", "tau": 2}))
    for k in (2, 4):
        out.append((f"composite K={k} batched", {"loras": stack(k), "mode": "composite"}))
        out.append(
            (
                f"composite K={k} sequential",
                {"loras": stack(k), "mode": "composite", "composite_batched": False},
            )
        )
    return out


def weight_change_ms(
    gen: GenerationEngine, files: list[Path], repeats: int = 50
) -> tuple[float, float | None]:
    """(our weight change, diffusers set_adapters on the same adapters), milliseconds, 2 LoRAs."""
    adapters = [gen.pool.load(f) for f in files[:2]]
    ours = []
    for i in range(repeats):
        start = time.perf_counter()
        gen.pool.activate([(adapters[0], 0.5 + i % 2 * 0.1, None), (adapters[1], 0.7, None)])
        ours.append(time.perf_counter() - start)
    theirs = []
    try:
        for i in range(min(repeats, 10)):
            start = time.perf_counter()
            gen.pipe.set_adapters([a.name for a in adapters], [0.5 + i % 2 * 0.1, 0.7])
            theirs.append(time.perf_counter() - start)
    except Exception as exc:  # diffusers may not see adapters it did not load itself
        print(f"  set_adapters not comparable here: {type(exc).__name__}: {exc}", file=sys.stderr)
    gen.pool.activate([])
    median = statistics.median
    return median(ours) * 1e3, (median(theirs) * 1e3 if theirs else None)


def run_model(pipe, size: int, steps: int, repeats: int, rank: int, folder: Path) -> dict:
    """Time every case; repeats go round robin over the cases so that load from other jobs on a shared
    machine spreads over all of them instead of landing on one."""
    files = make_loras(pipe, 4, rank, folder)
    gen = GenerationEngine(pipe, "sd15")
    base = {
        "prompt": "a photo of a fox in the snow",
        "steps": steps,
        "seed": 1,
        "scheduler": "DPM++ 2M Karras",
    }
    base |= {"width": size, "height": size}
    loads = []
    for f in files:  # every file is read and injected once, before any timing
        start = time.perf_counter()
        gen.pool.load(f)
        loads.append(time.perf_counter() - start)
    configs = [(label, GenerateConfig(**base, **values)) for label, values in cases(files)]
    gen.generate(configs[0][1])  # warm-up (first-call allocations)
    times: dict[str, list[tuple[float, float]]] = {label: [] for label, _ in configs}
    for r in range(repeats):
        for label, cfg in configs:
            times[label].append(timed(gen, cfg))
            cpu, wall = times[label][-1]
            print(f"  run {r + 1}/{repeats}  {label:28s} {cpu:8.3f} CPU s {wall:8.3f} wall s", flush=True)
    median = statistics.median
    rows = [(label, median(c for c, _ in t), median(w for _, w in t)) for label, t in times.items()]
    ours, theirs = weight_change_ms(gen, files)
    return {
        "rows": rows,
        "load_s": statistics.median(loads),
        "weight_change_ms": ours,
        "set_adapters_ms": theirs,
        "fuse_ms": fuse_ms(gen, files),
        "fixed_s": fixed_cost(pipe, size),
        "size": size,
        "steps": steps,
        "repeats": repeats,
        "rank": rank,
        "threads": torch.get_num_threads(),
    }


def fuse_ms(gen: GenerationEngine, files: list[Path]) -> float:
    """Milliseconds to fuse a 1-LoRA stack into the weights and unfuse it again."""
    adapter = gen.pool.load(files[0])
    gen.pool.activate([(adapter, 0.8, None)])
    start = time.perf_counter()
    gen.pool.fuse(("bench",))
    gen.pool.unfuse()
    return (time.perf_counter() - start) * 1e3


@torch.no_grad()
def fixed_cost(pipe, size: int) -> float:
    """Seconds of the work every image does outside the denoising loop: prompt encoding and VAE decoding."""
    start = time.perf_counter()
    pipe.encode_prompt("a photo of a fox in the snow", pipe.unet.device, 1, True, None)
    pipe.vae.decode(torch.randn(1, 4, size // 8, size // 8) / pipe.vae.config.scaling_factor)
    return time.perf_counter() - start


NOTES = """How to read these figures:
- "unfused": peft LoRA layers run next to the base weights (cost grows with the number of LoRAs);
  "fused": the stack's deltas are merged into the weights, so an image costs what the base model costs.
  `--fuse auto` fuses on a GPU while the same stack makes several images, and unfuses when it changes.
- Switch runs one LoRA at a time, so it should cost what one unfused LoRA costs; its extras are one
  text-encoder pass per LoRA (each LoRA's own text-encoder part) and a switch of active adapters every tau steps.
- Composite: batched = one UNet call of batch K x 2 per step, each sample through its own adapter (peft's
  mixed-batch path); sequential = K calls of batch 2. On a CPU a UNet call is compute-bound, so batching
  saves the per-call overhead (large on the tiny model, small on the real architecture), not the arithmetic;
  on a GPU a batch of K x 2 also fills the device far better than K small calls (not measured here).
- A weight change between images sets each peft layer's scale (no file read, no re-injection); diffusers'
  set_adapters walks every module instead.
- Ratios use the process's CPU time (one torch thread), which other jobs on a shared machine barely move;
  wall time is shown too and is noisier.
"""


def machine() -> str:
    from records import cpu_name  # bench/ is on the path when run as a script

    cpu = cpu_name()
    load = ", ".join(f"{x:.1f}" for x in os.getloadavg()) if hasattr(os, "getloadavg") else "n/a"
    return (
        f"CPU {cpu}, {os.cpu_count()} cores, torch {torch.__version__}, "
        f"Python {platform.python_version()}, load average at the end {load}"
    )


def table(name: str, result: dict) -> list[str]:
    rows = {label: cpu for label, cpu, _ in result["rows"]}
    base, single = rows["base (no LoRA)"], rows["merge 1 LoRA unfused"]
    lines = [
        f"### {name}: {result['size']} px, {result['steps']} steps (DPM++ 2M Karras, CFG 7), LoRA rank "
        f"{result['rank']}, {result['threads']} torch threads, median of {result['repeats']}",
        "",
        "| case | CPU s / image | vs base | vs 1 LoRA unfused | wall s / image |",
        "|---|---|---|---|---|",
    ]
    for label, cpu, wall in result["rows"]:
        lines.append(f"| {label} | {cpu:.3f} | {cpu / base:.2f}x | {cpu / single:.2f}x | {wall:.3f} |")
    switch = rows["switch K=2, tau=2"] / single
    lines += [
        "",
        f"- switch vs plain single-LoRA generation: {100 * (switch - 1):+.1f} % (target: within 5 %)",
    ]
    for k in (2, 4):
        ratio = rows[f"composite K={k} batched"] / rows[f"composite K={k} sequential"]
        lines.append(f"- composite K={k}: batched / sequential = {ratio:.2f}")
    theirs = result["set_adapters_ms"]
    lines.append(
        f"- weight change between images (set_scale on pre-collected layers, 2 LoRAs): "
        f"{result['weight_change_ms']:.2f} ms"
        + (f"; diffusers set_adapters on the same adapters: {theirs:.1f} ms" if theirs else "")
    )
    lines.append(f"- first load of one LoRA file (read + inject; once per file): {result['load_s']:.2f} s")
    lines.append(f"- fuse + unfuse of a 1-LoRA stack: {result['fuse_ms']:.0f} ms")
    lines.append(f"- fixed cost in every image (prompt encoding + VAE decode): {result['fixed_s']:.2f} s")
    return lines + [""]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--models", default="tiny,sd15", help="comma list of tiny, sd15")
    parser.add_argument("--repeats", type=int, default=3, help="timed runs per case, tiny model (median)")
    parser.add_argument("--sd15-repeats", type=int, default=1, help="timed runs per case, real architecture")
    parser.add_argument("--tiny-steps", type=int, default=20)
    parser.add_argument("--steps", type=int, default=6, help="steps, real architecture")
    parser.add_argument("--size", type=int, default=128, help="pixels, real architecture")
    parser.add_argument("--rank", type=int, default=16)
    parser.add_argument(
        "--threads", type=int, default=1, help="torch threads, real architecture (1: steadiest when shared)"
    )
    parser.add_argument(
        "--tiny-threads", type=int, default=1, help="torch threads, tiny model (overhead-bound)"
    )
    parser.add_argument("--out", type=Path, default=ROOT / "bench" / "results" / "generate_cpu.md")
    args = parser.parse_args(argv)
    warnings.filterwarnings("ignore")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    threads = args.threads or torch.get_num_threads()
    torch.set_flush_denormal(True)
    results = {}
    with tempfile.TemporaryDirectory() as tmp:
        for name in args.models.split(","):
            print(f"{name}: building the pipeline and the LoRAs", flush=True)
            torch.set_num_threads(args.tiny_threads if name == "tiny" else threads)
            if name == "tiny":
                pipe = tiny_pipeline()
                results[name] = run_model(pipe, 64, args.tiny_steps, args.repeats, 4, Path(tmp) / name)
            elif name == "sd15":
                pipe = real_sd15_pipeline()
                results[name] = run_model(
                    pipe, args.size, args.steps, args.sd15_repeats, args.rank, Path(tmp) / name
                )
            else:
                parser.error(f"unknown model {name!r}")
    lines = ["# Generation speed: generate_cpu", "", f"Machine: {machine()}", ""]
    titles = {
        "tiny": "tiny SD1.5-shaped model (tests.fixtures.tiny)",
        "sd15": "SD1.5 architecture, random weights",
    }
    for name, result in results.items():
        lines += table(titles[name], result)
    lines.append(NOTES)
    lines.append(
        f"Produced by: python bench/bench_generate.py {' '.join(argv if argv is not None else sys.argv[1:])}"
    )
    text = "\n".join(lines) + "\n"
    print("\n" + text)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(text, encoding="utf-8")
    return 0


if __name__ == "__main__":
    sys.exit(main())
