"""Orthogonal adaptation in the demo world: is the weak orthogonal LoRA the method's recipe or its training?

The eval (bench/results/eval_sd15.md) trains two subjects (heart "sks", moon "zwx") with orthogonal
adaptation at the ordinary LoRA's settings (rank 8, lr 1e-3, 300 steps): the orthogonal moon is weak even
alone (0.17 against 0.62 for an ordinary LoRA). Orthogonal LoRAs train only their up-projections on a frozen
random basis, so they may need more steps or a higher learning rate than a LoRA whose down-projections learn
as well. This bench trains the pair with one setting changed at a time and judges each subject alone and
after the plain sum, on the eval's prompts, seeds and images per line.

    python bench/orthogonal_probe.py --out /tmp/ortho        # writes bench/results/orthogonal_probe.md
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

VARIANTS: dict[str, dict] = {
    "eval settings": {},
    "lr 3e-3": {"learning_rate": 3e-3},
    "600 steps": {"max_steps": 600},
    "rank 16": {"rank": 16, "alpha": 16},
    "rank 4": {"rank": 4, "alpha": 4},
    "rank 4, 600 steps": {"rank": 4, "alpha": 4, "max_steps": 600},
}


def run_variant(ev: Evaluator, name: str, options: dict) -> list[dict]:
    """Train both subjects (orthogonal slices 0 and 1), then each alone and after the sum."""
    tag = name.replace(" ", "_").replace("-", "")
    files = []
    for index, subject in enumerate((SUBJECT, SUBJECT_2)):
        samples = WORLD.dreambooth_set(
            n=ev.plan.train_images, shape=subject["shape"], colour=subject["colour"], token=subject["token"]
        )
        data = ev.write_set(f"subject_{subject['shape']}", samples)
        extra = {"prompt": f"a {subject['token']} shape", "use_captions": True, "ortho_slice": index,
                 "ortho_num_concepts": 2, **options}  # fmt: skip
        files.append(ev.train(f"ortho_{tag}_{index}", "orthogonal", data, **extra))
    merged = ev.merge(f"ortho_{tag}_sum", "orthogonal", [f"{f}:1.0" for f in files])
    rows = []
    for subject, alone in zip((SUBJECT, SUBJECT_2), files):
        for case, lora in (("alone", alone), ("after sum", merged)):
            row = ev.subject_row("orthogonal", f"{subject['shape']} {case}", [(lora, 1.0)], subject)
            rows.append({"variant": name, "case": row.case, "subject": row.metrics["subject"]})
    return rows


def main(argv: list[str] | None = None) -> int:
    args = variant_args(__doc__, list(VARIANTS), ROOT / "bench/results/orthogonal_probe.md", argv, sep="|")
    torch.set_num_threads(args.threads)
    ev = Evaluator(EvalPlan(out=args.out, images=args.images))
    record = []
    for name in args.names:
        record += run_variant(ev, name, VARIANTS[name])
        print(record[-4:], flush=True)
    record, names = with_kept_variants(args, record)
    lines = [
        "# Orthogonal adaptation: alone and after the sum, by training setting (SD1.5 demo model, 64 px)",
        "",
        f"Command: `python bench/orthogonal_probe.py --out {args.out} --images {args.images}`  ",
        f"Machine: {cpu_name()}, {os.cpu_count()} cores, torch {torch.__version__}, "
        f"{time.strftime('%Y-%m-%d')}. Subject = share of {args.images} images the judges read as the subject.",
        "",
        "| variant | heart alone | heart after sum | moon alone | moon after sum |",
        "|---|---|---|---|---|",
    ]
    for name in names:
        cells = {r["case"]: r["subject"] for r in record if r["variant"] == name}
        order = ("heart alone", "heart after sum", "moon alone", "moon after sum")
        lines.append(f"| {name} | " + " | ".join(f"{cells[c]:.2f}" for c in order) + " |")
    write_variant_results(args, lines, record)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
