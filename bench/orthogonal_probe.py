"""Orthogonal adaptation in the demo world: which training or merge setting lets concepts survive the sum?

The eval (bench/results/eval_sd15*.md) trains subjects with orthogonal adaptation and with ordinary
DreamBooth LoRAs and judges each subject alone and after the plain sum. This bench changes one setting at a
time: the training of the orthogonal LoRAs (steps, rate, rank), the text encoder trained as well (the paper
trains the concept's token with the weights), and the merge weight (the paper sums at about 0.6). Each variant
trains the orthogonal LoRAs and, with `--ordinary`, ordinary LoRAs with the same change, and judges both on
the eval's prompts, seeds and images per line.

    python bench/orthogonal_probe.py --out /tmp/ortho        # writes bench/results/orthogonal_probe.md
    python bench/orthogonal_probe.py --out /tmp/ortho128 --world 128 --ordinary \\
        --variants "eval settings|text encoder"             # writes bench/results/orthogonal_probe_128.md
"""

from __future__ import annotations

import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from records import command_flags, record_head, run_variants, variant_args, write_variant_results  # noqa: E402  (bench/ is on the path as a script)

from studio.app.evaluate import EvalPlan, Evaluator  # noqa: E402
from studio.demo.concepts import SUBJECTS_4  # noqa: E402

# training options of both kinds, with "merge_weight": the weight of every LoRA in the sum (default 1)
VARIANTS: dict[str, dict] = {
    "eval settings": {},
    "lr 3e-3": {"learning_rate": 3e-3},
    "600 steps": {"max_steps": 600},
    "rank 16": {"rank": 16, "alpha": 16},
    "rank 4": {"rank": 4, "alpha": 4},
    "rank 4, 600 steps": {"rank": 4, "alpha": 4, "max_steps": 600},
    "text encoder": {"train_text_encoder": True},
    "merge weight 0.6": {"merge_weight": 0.6},
    "text encoder, merge weight 0.6": {"train_text_encoder": True, "merge_weight": 0.6},
    # each subject's trigger word learnt as a token embedding with its LoRA (the paper's lr 1e-3)
    "token embeddings": {"token_words": "own"},
    # each subject's training images all on one background of its own (OWN_BACKGROUNDS), so that the
    # concepts' pictures differ everywhere, not only in a shape
    "own backgrounds": {"own_background": True},
    "own backgrounds, token embeddings": {"own_background": True, "token_words": "own"},
}
OWN_BACKGROUNDS = ("black", "white", "purple", "orange")  # subject i's; never its own colour
KINDS = {"orthogonal": ("orthogonal", "orthogonal"), "ordinary": ("dreambooth", "concat")}


def train_kind(ev: Evaluator, kind: str, options: dict, subjects) -> list[Path]:
    """The subjects' LoRAs of one kind (orthogonal: slice i of len(subjects)), named by their options."""
    method = KINDS[kind][0]
    tag = "".join(f"_{k}{v}" for k, v in sorted(options.items()))
    files = []
    options = dict(options)
    own_background = options.pop("own_background", False)
    for index, subject in enumerate(subjects):
        background = OWN_BACKGROUNDS[index] if own_background else ""
        samples = ev.world.dreambooth_set(
            n=ev.plan.train_images, shape=subject["shape"], colour=subject["colour"], token=subject["token"],
            background=background,
        )  # fmt: skip
        data = ev.write_set(f"subject_{subject['shape']}" + f"_on_{background}" * bool(background), samples)
        extra = {"prompt": f"a {subject['token']} shape", "use_captions": True}
        if kind == "orthogonal":
            # the eval's orthogonal LoRAs train twice the steps at 128 px (EvalPlan.ortho_steps)
            steps = ev.plan.ortho_steps if ev.plan.image_size == 128 else ev.plan.lora_steps
            extra |= {"ortho_slice": index, "ortho_num_concepts": len(subjects), "max_steps": steps}
        extra |= options
        if options.get("token_words") == "own":
            extra["token_words"] = [subject["token"]]
        name = f"probe_{kind}_{subject['shape']}_of{len(subjects)}{tag}"
        files.append(ev.train(name, method, data, **extra))
    return files


def run_variant(ev: Evaluator, name: str, options: dict, kinds: list[str], subjects) -> list[dict]:
    """Train each kind's LoRAs, then judge every subject alone and after the sum."""
    options = dict(options)
    weight = options.pop("merge_weight", 1.0)
    rows = []
    for kind in kinds:
        files = train_kind(ev, kind, options, subjects)
        tag = "".join(f"_{k}{v}" for k, v in sorted(options.items()))
        merged = ev.merge(f"probe_{kind}_sum_of{len(subjects)}{tag}_w{weight:g}", KINDS[kind][1],
                          [f"{f}:{weight:g}" for f in files])  # fmt: skip
        for subject, alone in zip(subjects, files):
            for case, lora in (("alone", alone), ("after sum", merged)):
                row = ev.subject_row("orthogonal", f"{subject['shape']} {case}", [(lora, 1.0)], subject)
                rows.append(
                    {"variant": name, "kind": kind, "case": row.case, "subject": row.metrics["subject"]}
                )
    return rows


def table(record: list[dict], names: list[str], subjects) -> list[str]:
    shapes = [s["shape"] for s in subjects]
    head = (
        "| variant | kind | " + " | ".join(f"{s} alone | {s} after sum" for s in shapes) + " | summed after |"
    )
    lines = [head, "|" + "---|" * (3 + 2 * len(shapes))]
    for name in names:
        for kind in KINDS:
            # lines recorded before the ordinary kind was measured have no "kind": they are orthogonal
            cells = {r["case"]: r["subject"] for r in record
                     if r["variant"] == name and r.get("kind", "orthogonal") == kind}  # fmt: skip
            if not cells:
                continue
            after = [cells.get(f"{s} after sum") for s in shapes]
            shown = " | ".join(f"{cells.get(f'{s} alone', 0):.2f} | {a:.2f}" for s, a in zip(shapes, after))
            lines.append(f"| {name} | {kind} | {shown} | {sum(after):.2f} |")
    return lines


def own_options(parser) -> None:
    parser.add_argument("--world", type=int, default=64, choices=(64, 128), help="the demo world's size")
    parser.add_argument("--subjects", type=int, default=2, choices=(2, 4), help="subjects summed together")
    parser.add_argument(
        "--ordinary", action="store_true", help="also ordinary LoRAs with each variant's change"
    )


def main(argv: list[str] | None = None) -> int:
    results = ROOT / "bench/results/orthogonal_probe.md"
    args = variant_args(__doc__, list(VARIANTS), results, argv, sep="|", more=own_options)
    torch.set_num_threads(args.threads)
    subjects = SUBJECTS_4[: args.subjects]
    ev = Evaluator(EvalPlan(out=args.out, images=args.images, seed=args.seed, image_size=args.world))
    kinds = ["orthogonal", "ordinary"] if args.ordinary else ["orthogonal"]
    record, names, minutes = run_variants(args, lambda n: run_variant(ev, n, VARIANTS[n], kinds, subjects))
    flags = command_flags(args, list(VARIANTS), results, ROOT)
    flags += f" --world {args.world}" * (args.world != 64) + f" --subjects {args.subjects}" * (
        args.subjects != 2
    )
    flags += " --ordinary" * args.ordinary
    lines = [
        *record_head(
            f"Orthogonal adaptation: alone and after the sum, by setting (SD1.5 demo model, {args.world} px)",
            "orthogonal_probe.py",
            flags,
            f"{minutes:.1f} min. Subject = share of {args.images} images the judges read as the subject "
            f"(the eval's prompts, seeds {args.seed} on).",
        ),
        *table(record, names, subjects),
    ]
    write_variant_results(args, lines, record)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
