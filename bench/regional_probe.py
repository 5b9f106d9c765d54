"""Regional sampling with two held-out subjects: how must the subject LoRAs be trained to hold in a region?

The eval (bench/results/eval_sd15_128.md, section regional) asks the heart ("sks") on the left and the moon
("zwx") on the right, one region per side with that subject's DreamBooth LoRA. Its best line (LoRAs trained
300 steps at 128 px and at 64 px, a square box's size; area mode, square boxes) has the heart on its side in
0.92 of the images but the moon in 0.25 (both 0.21): at a region's size the moon LoRA draws a yellow disc more
often than its crescent. This bench changes how the two subject LoRAs are trained, one thing at a time, and
measures each pair on the eval's prompts, seeds and images per line: both LoRAs loaded without regions, and a
region and LoRA per side in area mode (square boxes and half boxes).

    python bench/regional_probe.py --out /tmp/regional --threads 2   # writes bench/results/regional_probe.md

LoRAs already trained in <out>/work/loras by this bench are retrained (each run starts from its options).
"""

from __future__ import annotations

import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
RESULTS = ROOT / "bench/results/regional_probe.md"

from records import command_flags, record_head, run_variants, variant_args, write_variant_results  # noqa: E402  (bench/ is on the path as a script)

from studio.app.eval_many import HALVES, SQUARES, WorldEvaluator  # noqa: E402
from studio.app.evaluate import EvalPlan  # noqa: E402
from studio.demo.concepts import SUBJECT, SUBJECT_2  # noqa: E402

HALF = 64  # a square box's side in the 128 px world
# name -> options of both subject LoRAs (the eval's: 300 steps, rank 8, lr 1e-3, batch 4, 8 pictures)
VARIANTS: dict[str, dict] = {
    "two sizes, 300 steps (the eval's line)": {"extra_resolutions": [HALF]},
    "two sizes, 600 steps": {"extra_resolutions": [HALF], "max_steps": 600},
    "two sizes, 1000 steps": {"extra_resolutions": [HALF], "max_steps": 1000},
    "region size only (64 px), 600 steps": {"resolution": HALF, "max_bucket_reso": HALF, "max_steps": 600},
    "two sizes, 600 steps, rank 16": {"extra_resolutions": [HALF], "max_steps": 600, "rank": 16, "alpha": 16},
}
LAYOUTS = (("area, square boxes", SQUARES, "area"), ("area", HALVES, "area"))
CASES = ("no regions (both LoRAs)", *(f"a region and LoRA per side ({label})" for label, _, _ in LAYOUTS))


def run_variant(ev: WorldEvaluator, index: int, name: str) -> list[dict]:
    options = VARIANTS[name] | {"tag": f"_regional_v{index}"}
    started = time.time()
    left, right = ev.subject_lora(SUBJECT, **options), ev.subject_lora(SUBJECT_2, **options)
    minutes = (time.time() - started) / 60
    rows = ev.subject_pair_rows("pair", left, right, LAYOUTS)
    return [{"variant": name, "case": row.case.removeprefix("pair, "), "train_minutes": round(minutes, 1),
             **row.metrics} for row in rows]  # fmt: skip


SHORT = dict(zip(CASES, ("no regions", "squares", "halves")))


def table(record: list[dict], names: list[str]) -> list[str]:
    """One line per variant: left / right / both for each case (no regions, square boxes, half boxes)."""
    head = "| variant | train min (2 LoRAs) |" + "".join(
        f" {SHORT[c]}: left | {SHORT[c]}: right | {SHORT[c]}: both |" for c in CASES
    )
    lines = [head, "|---|---|" + "---|---|---|" * len(CASES)]
    for name in names:
        cells = {r["case"]: r for r in record if r["variant"] == name}
        line = f"| {name} | {cells[CASES[0]]['train_minutes']} |"
        for case in CASES:
            line += "".join(f" {cells[case][k]:.2f} |" for k in ("left", "right", "both"))
        lines.append(line)
    return lines


def main(argv: list[str] | None = None) -> int:
    args = variant_args(__doc__, list(VARIANTS), RESULTS, argv, sep="|")
    torch.set_num_threads(args.threads)
    ev = WorldEvaluator(EvalPlan(out=args.out, images=args.images, image_size=128, seed=args.seed))
    record, names, minutes = run_variants(
        args, lambda name: run_variant(ev, list(VARIANTS).index(name), name)
    )
    lines = [
        *record_head(
            "Regional sampling: how the two subject LoRAs are trained (SD1.5 demo model, 128 px world)",
            "regional_probe.py",
            command_flags(args, list(VARIANTS), RESULTS, ROOT),
            f"{minutes:.1f} min. Heart (sks) asked on the left, moon (zwx) on the right, {args.images} images per "
            f"line (seeds {args.seed} on): left / right = that side's crop read as its subject, both = both sides "
            "right. Regions: a region per side with its subject's prompt and LoRA, area mode (each region sees its "
            "box alone); squares = each side's middle square (64 x 64) as its box, halves = each side's half.",
        ),  # fmt: skip
        *table(record, names),
    ]
    write_variant_results(args, lines, record)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
