"""Gradient fusion in the demo world: on which data should each concept's layer inputs be recorded?

The eval (bench/results/eval_sd15.md) fuses two ordinary subject LoRAs (heart "sks", moon "zwx") with their
inputs recorded on "a sks shape" alone, 4 noisy samples per concept, from images the LoRAs generate: each
subject keeps only part of itself (heart 1.00 -> 0.71, moon 0.62 -> 0.33) and the prompted backgrounds are
lost (1.00 -> 0.67). Mix-of-Show records each concept on its own training data. This bench trains the two
LoRAs once (the eval's settings), then fuses them with one recording setting changed at a time and judges
each subject on the eval's prompts ("a sks shape on a <colour> background"), seeds and images per line.

    python bench/fusion_probe.py --out /tmp/fusion        # writes bench/results/fusion_probe.md

LoRA files already in <out>/work/loras (from an earlier run of this bench) are reused.
"""

from __future__ import annotations

import os
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from records import cpu_name, variant_args, with_kept_variants, write_variant_results  # noqa: E402  (bench/ is on the path as a script)

from studio.app.evaluate import EvalPlan, Evaluator  # noqa: E402
from studio.demo.concepts import SUBJECT, SUBJECT_2  # noqa: E402
from studio.demo.world import WORLD  # noqa: E402

SUBJECTS = (SUBJECT, SUBJECT_2)
# merge options per line; "data" = each LoRA's training folder as its references
VARIANTS: dict[str, dict] = {
    "prompt only, 4 samples": {"fusion_samples": 4},
    "prompt only, 16 samples": {"fusion_samples": 16},
    "training images, prompt only, 16 samples": {"data": True, "reference_captions": False},
    "training images + captions, 8 samples": {"data": True, "fusion_samples": 8},
    "training images + captions, 16 samples": {"data": True, "fusion_samples": 16},
    "training images + captions, 32 samples": {"data": True, "fusion_samples": 32},
}


def subject_loras(ev: Evaluator) -> tuple[list[Path], list[Path]]:
    """The two ordinary subject LoRAs (trained unless already in work/loras) and their training folders."""
    files, folders = [], []
    for subject in SUBJECTS:
        samples = WORLD.dreambooth_set(
            n=ev.plan.train_images, shape=subject["shape"], colour=subject["colour"], token=subject["token"]
        )
        folders.append(ev.write_set(f"subject_{subject['shape']}", samples))
        name = f"dreambooth_{subject['shape']}"
        existing = ev.work / "loras" / f"{name}.safetensors"
        if existing.is_file():
            ev.loras[name] = existing
        files.append(ev.subject_lora(subject))
    return files, folders


def judged(ev: Evaluator, variant: str, case: str, lora: Path) -> list[dict]:
    rows = []
    for subject in SUBJECTS:
        row = ev.subject_row("orthogonal", case, [(lora, 1.0)], subject)
        rows.append({"variant": variant, "subject_name": subject["shape"]} | row.metrics)
    return rows


def run_variant(ev: Evaluator, name: str, options: dict, files, folders) -> list[dict]:
    options = dict(options)
    if options.pop("data", False):
        options["references"] = [str(f) for f in folders]
    prompts = [f"a {s['token']} shape" for s in SUBJECTS]
    tag = "".join(c if c.isalnum() else "_" for c in name)
    started = time.perf_counter()
    merged = ev.merge(f"fusion_{tag}", "fusion", [f"{f}:1.0" for f in files], model=ev.model,
                      prompts=prompts, device="cpu", **options)  # fmt: skip
    seconds = time.perf_counter() - started
    return [r | {"merge_seconds": round(seconds, 1)} for r in judged(ev, name, name, merged)]


def table(record: list[dict], names: list[str]) -> list[str]:
    lines = [
        "| line | heart | heart bg | moon | moon bg | merge s |",
        "|---|---|---|---|---|---|",
    ]
    for name in names:
        cells = {r["subject_name"]: r for r in record if r["variant"] == name}
        heart, moon = cells["heart"], cells["moon"]
        seconds = heart.get("merge_seconds")
        lines.append(
            f"| {name} | {heart['subject']:.2f} | {heart['background']:.2f} | {moon['subject']:.2f} | "
            f"{moon['background']:.2f} | {'' if seconds is None else seconds} |"
        )
    return lines


def main(argv: list[str] | None = None) -> int:
    lines_of = ["each alone", "exact sum (concat)"] + list(VARIANTS)
    args = variant_args(__doc__, lines_of, ROOT / "bench/results/fusion_probe.md", argv, sep="|")
    torch.set_num_threads(args.threads)
    ev = Evaluator(EvalPlan(out=args.out, images=args.images, seed=args.seed))
    files, folders = subject_loras(ev)
    record: list[dict] = []
    for name in args.names:
        if name == "each alone":
            record += [judged(ev, name, name, f)[i] for i, f in enumerate(files)]
        elif name == "exact sum (concat)":
            record += judged(
                ev, name, name, ev.merge("subjects_concat", "concat", [f"{f}:1.0" for f in files])
            )
        else:
            record += run_variant(ev, name, VARIANTS[name], files, folders)
        print(record[-2:], flush=True)
    record, names = with_kept_variants(args, record)
    lines = [
        "# Gradient fusion: which recorded inputs keep each concept (SD1.5 demo model, 64 px)",
        "",
        f"Command: `python bench/fusion_probe.py --out {args.out} --images {args.images} --seed {args.seed}`  ",
        f"Machine: {cpu_name()}, {os.cpu_count()} cores, torch {torch.__version__}, "
        f'{time.strftime("%Y-%m-%d")}. Each subject judged on {args.images} images of "a <token> shape on a '
        f"<colour> background\" (the eval's prompts; seeds {args.seed} on, the eval's are 5000 on): subject = "
        "share read as that subject, bg = "
        "share with the prompted background.",
        "",
        *table(record, names),
    ]
    write_variant_results(args, lines, record)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
