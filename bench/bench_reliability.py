"""Reliability: broken LoRA files through inspect, merge and generate, and hostile paths through the page's
forms; counts what ended in a clear error, what worked, and what crashed. Writes bench/results/reliability.md.

    python bench/bench_reliability.py                    # about two minutes on a 2-core CPU
"""

from __future__ import annotations

import argparse
import collections
import platform
import resource
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))  # the fixtures of tests/fixtures

from merging import MergeConfig, run_merge  # noqa: E402
from studio.app import form_configs  # noqa: E402
from studio.app.workspace import Workspace  # noqa: E402
from studio.core.errors import StudioError  # noqa: E402
from studio.core.lora_files import read_lora, write_lora  # noqa: E402
from studio.core.options import build_config  # noqa: E402
from studio.generation import GenerateConfig, GenerationEngine  # noqa: E402
from tests.fixtures.broken_files import broken_files  # noqa: E402
from tests.fixtures.lora_random import random_lora  # noqa: E402
from tests.fixtures.tiny import tiny_sd15_pipeline, tiny_sdxl_pipeline  # noqa: E402


def attempt(fn, *args) -> str:
    """'ok', 'clear error' (a StudioError) or 'crash: <type>'."""
    try:
        fn(*args)
        return "ok"
    except StudioError:
        return "clear error"
    except Exception as exc:
        return f"crash: {type(exc).__name__}"


def fuzz(folder: Path) -> tuple[dict, float, float]:
    pipes = {"sd15": tiny_sd15_pipeline(0), "sdxl": tiny_sdxl_pipeline(0)}
    valid = {
        "sd15": write_lora(random_lora(pipes["sd15"], "sd15", rank=4, alpha=2.0, conv=True), folder / "sd15_kohya.safetensors"),
        "sdxl": write_lora(random_lora(pipes["sdxl"], "sdxl", rank=2, seed=1), folder / "sdxl_peft.safetensors", fmt="peft"),
        "sdxl-k": write_lora(random_lora(pipes["sdxl"], "sdxl", rank=3, alpha=1.5, seed=2), folder / "sdxl_kohya.safetensors"),
    }  # fmt: skip
    engines = {family: GenerationEngine(pipe, family) for family, pipe in pipes.items()}
    counts: dict[str, collections.Counter] = {k: collections.Counter() for k in ("read", "merge", "generate")}
    slowest, before = 0.0, resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    for name, path in broken_files(list(valid.values()), folder / "broken"):
        family = "sd15" if "-sd15_" in name else "sdxl"
        start = time.perf_counter()
        counts["read"][attempt(read_lora, path)] += 1
        partner = valid["sd15" if family == "sd15" else "sdxl-k"]
        cfg = build_config(
            MergeConfig, sources=[str(path), str(partner)], out=str(folder / f"{name}.m.safetensors")
        )
        counts["merge"][attempt(run_merge, cfg)] += 1
        gen = GenerateConfig(prompt="a red circle", loras=[str(path)], steps=1, seed=1, scheduler="Euler")
        counts["generate"][attempt(engines[family].generate, gen)] += 1
        slowest = max(slowest, time.perf_counter() - start)
    grown = (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before) / 1024
    return counts, slowest, grown


PATH_PROBES = [
    "/etc/passwd",
    "../../etc",
    "datasets/../../x",
    "/tmp/elsewhere",
    "~/x",
    "runs/../../../x",
    "link/x",
]
TOML_FIELDS = ["output_dir", "data_dir", "class_data_dir", "reg_data_dir", "model", "resume"]


def probes(folder: Path) -> collections.Counter:
    ws = Workspace.create(folder / "ws")
    (ws.root / "link").symlink_to("/etc")
    (ws.datasets / "d").mkdir()
    outcome: collections.Counter = collections.Counter()
    base = {"method": "style", "preset": "", "model": "demo:sd15", "dataset": "d", "name": "x", "prompt": "x",
            "steps": 2, "rank": 4, "learning_rate": 1e-3, "batch_size": 1, "resolution": 64}  # fmt: skip
    for field in TOML_FIELDS:
        for path in PATH_PROBES:
            outcome[attempt(form_configs.train_config, ws, {**base, "more": f"{field} = {path!r}"})] += 1
    for path in PATH_PROBES:
        outcome[attempt(form_configs.train_config, ws, {**base, "dataset": path})] += 1
        outcome[attempt(form_configs.train_config, ws, {**base, "name": path})] += 1
        outcome[attempt(form_configs.train_config, ws, {**base, "model": path})] += 1
        merge = {"sources": [path, path], "method": "concat", "name": "m", "density": 0.5}
        outcome[attempt(form_configs.merge_config, ws, merge)] += 1
        gen = {"prompt": "x", "steps": 2, "cfg": 7, "seed": 1, "size": 0, "count": 1, "loras": [path]}
        outcome[attempt(form_configs.generate_config, ws, gen)] += 1
    outcome[attempt(form_configs.train_config, ws, {**base, "more": "allow_pickle = true"})] += 1
    return outcome


def report(counts, slowest, grown, probe_counts, seconds) -> str:
    files = sum(counts["read"].values())
    lines = ["# Reliability", "", f"Machine: {platform.processor() or platform.machine()}, {torch.get_num_threads()} "
             f"torch thread(s); torch {torch.__version__}. Command: `python bench/bench_reliability.py` ({seconds:.0f} s).",
             "", f"## {files} broken LoRA files (tests/fixtures/broken_files.py: truncations, header, offset, dtype and "
             "shape lies, NaN / inf, nested JSON, huge lengths, hostile metadata, byte flips)", "",
             "| step | clear error | worked | crashed |", "| --- | --- | --- | --- |"]  # fmt: skip
    for step, counter in counts.items():
        crashed = sum(v for k, v in counter.items() if k.startswith("crash"))
        lines.append(f"| {step} | {counter['clear error']} | {counter['ok']} | {crashed} |")
    kinds = sorted({k for c in counts.values() for k in c if k.startswith("crash")})
    lines += ["", f"Crash kinds: {', '.join(kinds) or 'none'}. Slowest file (read + merge + generate): {slowest:.2f} s; "
              f"peak memory grew by {grown:.0f} MB over the whole run.", "",
              "\"worked\": byte flips in tensor data that leave finite float factors make valid (if odd) LoRAs.", "",
              f"## {sum(probe_counts.values())} path probes through the page's forms", "",
              f"Train-tab TOML fields ({', '.join(TOML_FIELDS)}), dataset and LoRA names, base models, merge sources and "
              f"generation stacks pointed at {', '.join(PATH_PROBES)} (link = a symlink to /etc), and allow_pickle from "
              "the page.", "", "| outcome | probes |", "| --- | --- |"]  # fmt: skip
    lines += [
        f"| {'refused (clear error)' if k == 'clear error' else k} | {v} |"
        for k, v in sorted(probe_counts.items())
    ]
    lines += ["", "The same cases run in CI: tests/studio/app/test_fuzz.py, tests/studio/app/test_hardening.py, "
              "tests/ui/test_app.py (file route, uploads only), tests/studio/app/test_supervision.py (kill -9 of "
              "the studio), tests/trainers/test_disk_errors.py (read-only and full disk)."]  # fmt: skip
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--out", type=Path, default=ROOT / "bench" / "results" / "reliability.md")
    args = parser.parse_args()
    torch.set_num_threads(1)
    start = time.perf_counter()
    with tempfile.TemporaryDirectory() as tmp:
        counts, slowest, grown = fuzz(Path(tmp))
        probe_counts = probes(Path(tmp))
    text = report(counts, slowest, grown, probe_counts, time.perf_counter() - start)
    args.out.write_text(text)
    print(text)


if __name__ == "__main__":
    main()
