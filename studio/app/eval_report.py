"""The evaluation's record: the markdown table, eval.json and the image grid; the check against a record."""

from __future__ import annotations

import json
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict
from pathlib import Path

import torch
from PIL import Image

from studio.app.eval_many import WorldEvaluator, concept_names
from studio.app.evaluate import EvalPlan, Row
from studio.demo.adherence import image_grid
from studio.demo.concepts import BACKGROUND, STYLE, SUBJECT, SUBJECT_2, SUBJECTS_4

METRIC_ORDER = ("subject", "left", "right", "style", "both", "shape", "colour", "background", "all")


def table(rows: Sequence[Row]) -> str:
    """Markdown table: one line per row, one column per metric (blank where not measured)."""
    lines = [
        "| section | case | " + " | ".join(METRIC_ORDER) + " | note |",
        "|---|---|" + "---|" * (len(METRIC_ORDER) + 1),
    ]
    for r in rows:
        cells = [f"{r.metrics[m]:.2f}" if m in r.metrics else "" for m in METRIC_ORDER]
        lines.append(f"| {r.section} | {r.case} | " + " | ".join(cells) + f" | {r.note} |")
    return "\n".join(lines)


def write_report(plan: EvalPlan, rows: Sequence[Row], seconds: float, command: str) -> dict:
    """eval.md, eval.json and eval_grid.png (up to 8 images per row) in plan.out."""
    plan.out.mkdir(parents=True, exist_ok=True)
    subjects = SUBJECTS_4 if plan.image_size == 128 else (SUBJECT, SUBJECT_2)
    data = {
        "plan": {k: (str(v) if isinstance(v, Path) else v) for k, v in asdict(plan).items()},
        "command": command,
        "seconds": round(seconds),
        "torch": torch.__version__,
        "rows": [{"section": r.section, "case": r.case, "metrics": r.metrics, "note": r.note} for r in rows],
    }
    (plan.out / "eval.json").write_text(json.dumps(data, indent=2) + "\n")
    text = (
        f"# Demo-world evaluation ({plan.family}{', the 128 px world' if plan.image_size == 128 else ''})\n\n"
        f"Command: `{command}`  \nSeeds: prompts and noise from seed {plan.seed} on; LoRAs trained with seed 0.  \n"
        f"{plan.images} images per line, {plan.steps} denoising steps, CFG {plan.guidance}; LoRAs rank "
        f"{plan.lora_rank}, {plan.lora_steps} steps, batch {plan.batch_size}, lr {plan.lora_lr}, "
        f"{plan.train_images} training images (style: {plan.style_images} images, {plan.style_steps} steps, caption dropout {plan.style_caption_dropout}; orthogonal: {plan.ortho_steps} steps). Took {seconds / 60:.1f} min.\n\n"
        "Numbers are shares of generated images the judges read as asked: subject = the held-out shape "
        f"({concept_names(subjects)}), style = {STYLE}, both = subject and style in the same image (with "
        "several concepts: every one asked for), shape/colour/background = as the prompt says"
        + (f" (a gold background: {BACKGROUND['colour']})" if plan.image_size == 128 else "")
        + "; left / right = the subject asked on that side, judged on that side's crop.\n\n"
        + table(rows)
        + "\n"
    )
    (plan.out / "eval.md").write_text(text)
    shown = [
        im
        for r in rows
        for im in (
            r.images[:8]
            + [Image.new("RGB", (plan.image_size,) * 2, (128, 128, 128))] * (8 - len(r.images[:8]))
        )
        if r.images
    ]
    if shown:
        image_grid(shown, columns=8).save(plan.out / "eval_grid.png")
    return data


def evaluate(plan: EvalPlan, command: str = "lora-studio eval", log: Callable[[str], None] = print) -> dict:
    """Run every row of `plan` and write the report; returns the JSON data."""
    torch.manual_seed(0)
    started = time.time()
    # the report is rewritten after each section: a run stopped midway keeps the sections it finished
    rows = WorldEvaluator(plan, log).run(
        lambda rows: write_report(plan, rows, time.time() - started, command)
    )
    return write_report(plan, rows, time.time() - started, command)


def check_against(recorded: dict, measured: dict, margin: float) -> list[str]:
    """Lines where a measured number fell more than `margin` below the recorded one."""
    old = {(r["section"], r["case"]): r["metrics"] for r in recorded["rows"]}
    failures = []
    for row in measured["rows"]:
        for metric, value in row["metrics"].items():
            before = old.get((row["section"], row["case"]), {}).get(metric)
            if before is not None and value < before - margin:
                failures.append(
                    f"{row['section']} / {row['case']} / {metric}: {value:.2f} < recorded {before:.2f} - {margin}"
                )
    return failures
