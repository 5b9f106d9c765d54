"""How much a style LoRA pulls the content away from the prompt, and what keeps it in place.

The eval's style row (bench/results/eval_sd15.md) trains the held-out style "framed" from 32 captioned world
images and asks for plain world prompts with ", framed style": the style is learnt (0.00 -> 0.88) but the
shapes drift (0.96 -> 0.54). This bench trains the same LoRA with one setting changed at a time and judges
the same prompts, seeds and images per line as the eval (the judges are the world judges, trained on renders
only):

  baseline           rank 8, lr 1e-3, 600 steps, batch 4, 32 images (the eval's settings)
  dropout 0.1 / 0.3  caption_dropout_rate
  rank 4 / 2         lower rank (alpha = rank, so the same scale)
  reg set            reg_data_dir: 32 unstyled world renders with their captions (other scenes than the
                     style set), prior_loss_weight 1
  steps 300          half the steps (where the style is still being learnt)
  and two pairs of the above, dropout 0.05 (the preset's value before this bench), and the baseline and
  dropout 0.1 again with training seed 1 (a second draw of noise, timesteps and dropped captions)

Each line: style (share drawn framed), shape / colour / background (as the prompt says), all (the three at
once), and "both" = framed and every content attribute right. Without LoRA on the same prompts first.

    python bench/style_drift.py --out /tmp/style-drift          # writes bench/results/style_drift.md
    python bench/style_drift.py --out /tmp/sd --variants baseline,"reg set" --images 8
"""

from __future__ import annotations

import os
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from records import (  # noqa: E402  (bench/ is on the path as a script)
    cpu_name,
    regularisation_set,
    variant_args,
    with_kept_variants,
    write_variant_results,
)

from studio.app.evaluate import EvalPlan, Evaluator, world_prompts  # noqa: E402
from studio.demo.concepts import STYLE  # noqa: E402
from studio.demo.world import WORLD  # noqa: E402

VARIANTS: dict[str, dict] = {
    "baseline": {},
    "dropout 0.1": {"caption_dropout_rate": 0.1},
    "dropout 0.3": {"caption_dropout_rate": 0.3},
    "rank 4": {"rank": 4, "alpha": 4},
    "rank 2": {"rank": 2, "alpha": 2},
    "reg set": {"reg_data_dir": "REG"},
    "steps 300": {"max_steps": 300},
    "dropout 0.1 + reg set": {"caption_dropout_rate": 0.1, "reg_data_dir": "REG"},
    "dropout 0.1 + rank 4": {"caption_dropout_rate": 0.1, "rank": 4, "alpha": 4},
    "dropout 0.05": {"caption_dropout_rate": 0.05},
    "baseline seed 1": {"seed": 1},
    "dropout 0.1 seed 1": {"caption_dropout_rate": 0.1, "seed": 1},
}


def both_share(ev: Evaluator, images, style: str) -> float:
    """Framed and every content attribute as the prompt says, in the same image."""
    _, specs = world_prompts(ev.plan, style)
    verdict = ev.judge(images)
    hits = [
        v_style == style and all(verdict[a][i] == getattr(s, a) for a in ("shape", "colour", "background"))
        for i, (v_style, s) in enumerate(zip(verdict["style"], specs))
    ]
    return sum(hits) / len(hits)


def main(argv: list[str] | None = None) -> int:
    args = variant_args(__doc__, list(VARIANTS), ROOT / "bench/results/style_drift.md", argv, sep=",")
    torch.set_num_threads(args.threads)
    plan = EvalPlan(out=args.out, images=args.images)
    ev = Evaluator(plan)
    data = ev.write_set(f"style_{STYLE}", WORLD.style_set(STYLE, n=plan.style_images))
    reg = regularisation_set(ev)
    rows = [("no LoRA", ev.world_row("style", "no LoRA", [], style=STYLE), 0.0)]
    for name in args.names:
        options = {k: (str(reg) if v == "REG" else v) for k, v in VARIANTS[name].items()}
        started = time.time()
        lora = ev.train(f"style_{name.replace(' ', '_')}", "style", data, **({"max_steps": 600} | options))
        seconds = time.time() - started
        rows.append((name, ev.world_row("style", name, [(lora, 1.0)], style=STYLE), seconds))
        print(name, rows[-1][1].metrics, flush=True)
    write(args, plan, rows, ev)
    return 0


def write(args, plan: EvalPlan, rows, ev: Evaluator) -> None:
    lines = [
        "# Style LoRA content drift (SD1.5 demo model, 64 px)",
        "",
        f"Machine: {cpu_name()}, {os.cpu_count()} cores, torch {torch.__version__}, "
        f"{time.strftime('%Y-%m-%d')}.",
        f"{plan.images} images per line (world prompts from seed {plan.seed} + ', {STYLE} style', 20 steps, "
        f"CFG {plan.guidance}); LoRAs trained on 32 framed world images, batch 4, lr 1e-3, rank 8 unless the line "
        "says otherwise.",
        "",
        "| variant | style | shape | colour | background | all | both | train s |",
        "|---|---|---|---|---|---|---|---|",
    ]
    command = (
        f"python bench/style_drift.py --out {args.out} --images {args.images} --variants '{args.variants}'"
    )
    record = []
    for name, row, seconds in rows:
        m = row.metrics | {"both": both_share(ev, row.images, STYLE)}
        record.append({"variant": name, "metrics": m, "seconds": round(seconds), "command": command})
    record, _ = with_kept_variants(args, record)
    record.sort(key=lambda r: r["variant"] != "no LoRA")  # the reference line first
    for r in record:
        m = r["metrics"]
        cells = " | ".join(f"{m[k]:.2f}" for k in ("style", "shape", "colour", "background", "all", "both"))
        lines.append(f"| {r['variant']} | {cells} | {r['seconds']} |")
    lines += [
        "",
        "Commands (each line's own in the .json):",
        *sorted(
            {f"- `{r.get('command', 'python bench/style_drift.py --out /tmp/sd/work')}`" for r in record}
        ),
    ]
    write_variant_results(args, lines, record)


if __name__ == "__main__":
    raise SystemExit(main())
