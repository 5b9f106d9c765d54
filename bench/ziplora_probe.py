"""ZipLoRA in the demo world: is the lost subject and style the implementation, the objective or the world?

The eval's merge rows (bench/results/eval_sd15_128.md) keep the subject and the style in one image in 0.42
of the exact sum's images and 0.04 of ZipLoRA's, although ZipLoRA starts from the sum (every merger 1).
This bench merges the eval's subject and style LoRAs with one ZipLoRA setting changed at a time and judges
each result on the eval's prompts, seeds and images per line:
- 0 steps: the mergers as they start; must judge as the exact sum (a check of the saved file);
- lambda 0: only the two fidelity terms, no push to keep the mergers apart;
- the reference code's learning rate (5e-5) and the paper's (0.01, the default);
- the LoRAs' training images as references, instead of images generated with each LoRA;
- lambda 1e-3 and 1e-4: the similarity term at 10 and 100 times less weight. With this world's noise
  predictions the reconstruction term starts near 0.01 while lambda 0.01 times the similarity summed over
  192 layers starts near 2, so the paper's lambda lets the similarity term lead.
For every ZipLoRA line a second table says what the fit did: its reconstruction term on a fixed batch
(plain sum -> ZipLoRA), lambda x similarity at the first and last step, each LoRA's whole-model error on its
own prompt (plain sum -> ZipLoRA; 0 keeps the LoRA's effect, 1 is as far from it as no LoRA), and the mean
merger of each LoRA with the share of its columns switched off.
With --subject-prior the subject LoRA trains with prior preservation (the eval's class images), so that it
changes the model less on prompts without its word. With --token-words both LoRAs are trained learning
their trigger words as token embeddings ("sks" for the subject, "framed" for the style), as pivotal tuning
does, and the merges read the prompts with those words.

    python bench/ziplora_probe.py --out /tmp/zip128      # writes bench/results/ziplora_probe.md
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from records import (  # noqa: E402  (bench/ is on the path as a script)
    command_flags,
    metric_table,
    record_head,
    reuse_trained_loras,
    run_variants,
    subject_and_style,
    variant_args,
    write_variant_results,
)

from studio.app.evaluate import EvalPlan, Evaluator, subject_prompts, subject_style_metrics  # noqa: E402
from studio.demo.concepts import STYLE, SUBJECT  # noqa: E402

# merge options on top of the eval's ZipLoRA (None: the exact sum); "data": the LoRAs' training images
VARIANTS: dict[str, dict | None] = {
    "exact sum (concat)": None,
    "ZipLoRA, the eval's settings": {},
    "ZipLoRA, 0 steps": {"steps": 0},
    "ZipLoRA, lambda 0": {"similarity_weight": 0.0},
    "ZipLoRA, lr 5e-5 (the reference code's)": {"lr": 5e-5},
    "ZipLoRA, training images as references": {"data": True},
    "ZipLoRA, training images as references, lambda 0": {"data": True, "similarity_weight": 0.0},
    "ZipLoRA, lambda 1e-3": {"similarity_weight": 1e-3},
    "ZipLoRA, lambda 1e-4": {"similarity_weight": 1e-4},
    # the layer-wise variant, as the eval's "ZipLoRA fast" row runs it ("method": the merge method)
    "ZipLoRA fast, the eval's settings": {"method": "ziplora-fast"},
    "ZipLoRA fast, lambda 0": {"method": "ziplora-fast", "similarity_weight": 0.0},
}
# what each LoRA does to the other's prompt, which ZipLoRA's two fidelity terms ask to undo, and each alone
# on the merge prompts: (LoRA, prompts)
LEAKS = {
    "style LoRA alone, the subject's prompts (no style word)": ("style", "subject"),
    "subject LoRA alone, ZipLoRA's style prompt": ("subject", "style"),
    "subject LoRA alone, the merge prompts": ("subject", "merge"),
    "style LoRA alone, the merge prompts": ("style", "merge"),
}
METRICS = ("subject", "style", "both")


def own_options(parser) -> None:
    parser.add_argument(
        "--style-dropout", type=float, default=None, help="the style LoRA's caption dropout (the eval's: 0.1)"
    )
    parser.add_argument(
        "--token-words", action="store_true", help="both LoRAs learn their trigger words' token embeddings"
    )
    parser.add_argument(
        "--subject-prior", action="store_true", help="the subject LoRA trains with prior preservation"
    )
    parser.add_argument(
        "--style-reg",
        nargs="?",
        const="reg",
        choices=("reg", "contrast"),
        default="",
        help="the style LoRA trains with a regularisation set: plain world scenes with their captions (reg), "
        "or the style set's own scenes unframed (contrast)",
    )


def main(argv: list[str] | None = None) -> int:
    results = ROOT / "bench/results/ziplora_probe.md"
    args = variant_args(__doc__, list(VARIANTS) + list(LEAKS), results, argv, sep="|", more=own_options)
    torch.set_num_threads(args.threads)
    plan = EvalPlan(out=args.out, images=args.images, seed=args.seed, image_size=128)
    if args.style_dropout is not None:
        plan.style_caption_dropout = args.style_dropout
    ev = Evaluator(plan)
    reuse_trained_loras(ev)  # the subject and style LoRAs of an earlier run in --out
    subject, style = subject_and_style(ev, args.token_words, args.style_reg, args.subject_prior)
    sources = [f"{subject}:1.0", f"{style}:1.0"]
    prompts = [f"a {SUBJECT['token']} shape", f"a red circle on a blue background, {STYLE} style"]
    folders = [
        str(ev.work / "data" / f"subject_{SUBJECT['shape']}"),
        str(ev.work / "data" / f"style_{STYLE}"),
    ]

    def leak(name: str) -> list[dict]:
        lora, asked = LEAKS[name]
        loras = [(subject if lora == "subject" else style, 1.0)]
        prompts_of = {
            "subject": subject_prompts(ev.plan, SUBJECT)[0],
            "style": [prompts[1]] * args.images,
            "merge": subject_prompts(ev.plan, SUBJECT, STYLE)[0],
        }[asked]
        verdict = ev.judge(ev.generate(prompts_of, loras))
        return [{"variant": name} | subject_style_metrics(verdict, SUBJECT, STYLE)]

    def line(name: str) -> list[dict]:
        if name in LEAKS:
            return leak(name)
        options = VARIANTS[name]
        slug = "".join(c if c.isalnum() else "_" for c in name)
        if options is None:
            merged = ev.merge(slug, "concat", sources)
        else:
            options = dict(options)
            method = options.pop("method", "ziplora")
            if options.pop("data", False):
                options |= {"references": folders, "reference_captions": True}
            options = {
                "model": ev.model,
                "prompts": prompts,
                "steps": ev.plan.ziplora_steps,
                "device": "cpu",
            } | options
            merged = ev.merge(slug, method, sources, **options)
        row = ev.subject_row("merge", name, [(merged, 1.0)], style=STYLE)
        fit = {"fit": fit_summary(merged)} if options is not None else {}
        return [{"variant": name} | {m: row.metrics[m] for m in METRICS} | fit]

    record, names, minutes = run_variants(args, line)
    lines = [
        *record_head(
            "ZipLoRA of a subject and a style LoRA, by setting (SD1.5 demo model, 128 px)",
            "ziplora_probe.py",
            command_flags(args, list(VARIANTS) + list(LEAKS), results, ROOT)
            + (f" --style-dropout {args.style_dropout:g}" if args.style_dropout is not None else "")
            + " --subject-prior" * args.subject_prior
            + " --token-words" * args.token_words
            + {"": "", "reg": " --style-reg", "contrast": " --style-reg contrast"}[args.style_reg],
            f"{minutes:.1f} min. Shares of {args.images} images of the eval's merge prompts (seeds {args.seed} "
            "on) the judges read as the heart (subject), framed (style) and both.",
        ),
        *metric_table(record, names, METRICS),
        *fit_table(record, names),
    ]
    write_variant_results(args, lines, record)
    return 0


def fit_summary(merged: Path) -> dict:
    """What a ZipLoRA fit did, from the merged file's report: the reconstruction term on the fit's fixed
    evaluation batch (plain sum, ZipLoRA), lambda x similarity at the first and last step, each LoRA's
    whole-model error on its own prompt (plain sum, ZipLoRA) and its mergers (mean, share off)."""
    from merging.output import MERGERS_KEY, REPORT_KEY
    from studio.core.io import read_header

    meta = read_header(merged)[1]
    fit = json.loads(meta[REPORT_KEY])["details"]["ziplora"]
    mergers = json.loads(meta[f"{MERGERS_KEY}_summary"])
    history = fit["history"] or [{"reconstruction": 0.0, "loss": 0.0}]
    first, last = history[0], history[-1]
    return {
        "reconstruction": list(fit["objective"].values()),
        "similarity_term": [first["loss"] - first["reconstruction"], last["loss"] - last["reconstruction"]],
        "model_error": [list(e.values()) for e in fit["model_error"].values()],
        "mergers": [[m["mean"], m["off"]] for m in mergers.values()],
    }


def fit_table(record: list[dict], names: list[str]) -> list[str]:
    """The fit of each ZipLoRA line (subject first, style second in every pair)."""
    fits = [(n, r["fit"]) for n in names for r in record if r["variant"] == n and "fit" in r]
    if not fits:
        return []
    lines = [
        "",
        "What each fit did (plain sum or first step -> ZipLoRA or last step; subject / style):",
        "",
        "| variant | reconstruction (fixed batch) | lambda x similarity | error on own prompt, sum -> ZipLoRA "
        "| mean merger | mergers off (< 0.1) |",
        "|---|---|---|---|---|---|",
    ]
    for name, f in fits:
        errors = " / ".join(f"{a:.2f} -> {b:.2f}" for a, b in f["model_error"])
        lines.append(
            f"| {name} | {f['reconstruction'][0]:.4f} -> {f['reconstruction'][1]:.4f} "
            f"| {f['similarity_term'][0]:.3g} -> {f['similarity_term'][1]:.3g} | {errors} "
            f"| {' / '.join(f'{m:.2f}' for m, _ in f['mergers'])} "
            f"| {' / '.join(f'{o:.2f}' for _, o in f['mergers'])} |"
        )
    return lines


if __name__ == "__main__":
    raise SystemExit(main())
