"""LoRA Switch and LoRA Composite against the merge, three LoRAs in one picture (the 128 px demo world).

The eval's K = 3 scene (bench/results/eval_sd15_128.md: a subject, a style and a background LoRA, "a sks
shape on a gold background, framed style") keeps everything in every merged image and in none of the
switched or composited ones (with the background drawn orange, as it was, the merge too lost the frame,
drawn in the heart's red: --background-colour orange). This bench measures the schedule and mode settings
one at a time on the same prompts, seeds and LoRAs: Switch's tau (the paper's default 5, the eval's 2, and
1) and its order, Composite batched and sequential (the reference's K separate calls), and the merge with
each LoRA at 1/K, which is what averaging K predictions amounts to when the LoRAs' effects add up linearly.

With --token-words the subject and style LoRAs are those that learnt their trigger words ("sks", "framed") as
token embeddings (ziplora_probe.py --token-words trains them); the background's word, "gold", is a token the
model has, so its LoRA stays as it is, unless --background-word names a rare word for it to learn instead.
With --reg the style and background LoRAs train with a regularisation set (plain world scenes with their
captions), so each learns its concept where its word is said and stays near the base model elsewhere.

    python bench/composition_probe.py --out /tmp/compose     # writes bench/results/composition_probe.md
"""

from __future__ import annotations

import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from records import (  # noqa: E402  (bench/ is on the path as a script)
    command_flags,
    metric_table,
    record_head,
    regularisation_set,
    reuse_trained_loras,
    run_variants,
    subject_and_style,
    variant_args,
    write_variant_results,
)

from studio.app.eval_many import WorldEvaluator  # noqa: E402
from studio.app.evaluate import EvalPlan  # noqa: E402
from studio.demo.concepts import BACKGROUND  # noqa: E402
from studio.demo.world import COLOURS  # noqa: E402

# (generation options, stack order: s = subject, t = style, b = background, the LoRAs' weight)
VARIANTS: dict[str, tuple[dict, str, float]] = {
    "merge": ({"mode": "merge"}, "stb", 1.0),
    "merge, each LoRA at 1/3": ({"mode": "merge"}, "stb", 1 / 3),
    "switch, tau 2 (the eval's)": ({"mode": "switch", "tau": 2}, "stb", 1.0),
    "switch, tau 5 (the paper's default)": ({"mode": "switch", "tau": 5}, "stb", 1.0),
    "switch, tau 1": ({"mode": "switch", "tau": 1}, "stb", 1.0),
    "switch, tau 5, background first": ({"mode": "switch", "tau": 5}, "bst", 1.0),
    "composite (batched, the eval's)": ({"mode": "composite"}, "stb", 1.0),
    "composite, sequential (the reference's calls)": (
        {"mode": "composite", "composite_batched": False},
        "stb",
        1.0,
    ),
    # where the background goes: the background LoRA alone, then with the subject LoRA only (K = 2)
    "background LoRA alone": ({"mode": "merge"}, "b", 1.0),
    "background + subject: merge": ({"mode": "merge"}, "bs", 1.0),
    "background + subject: switch, tau 10 (background the first half)": (
        {"mode": "switch", "tau": 10},
        "bs",
        1.0,
    ),
    "background + subject: composite": ({"mode": "composite"}, "bs", 1.0),
    "subject + style: merge": ({"mode": "merge"}, "st", 1.0),
}
METRICS = ("subject", "style", "background", "both")


def own_options(parser) -> None:
    parser.add_argument(
        "--token-words", action="store_true", help="subject and style LoRAs that learnt their trigger words"
    )
    parser.add_argument(
        "--background-word",
        default=BACKGROUND["word"],
        help="the background LoRA's word (the eval's: gold); another one is learnt too with --token-words",
    )
    parser.add_argument(
        "--background-colour",
        default=BACKGROUND["colour"],
        choices=COLOURS,
        help="the colour the background LoRA learns for its word (the eval's: blue; orange before, next to red)",
    )
    parser.add_argument(
        "--reg",
        action="store_true",
        help="the style and background LoRAs train with a regularisation set (plain world scenes, captioned)",
    )


def main(argv: list[str] | None = None) -> int:
    results = ROOT / "bench/results/composition_probe.md"
    args = variant_args(__doc__, list(VARIANTS), results, argv, sep="|", more=own_options)
    torch.set_num_threads(args.threads)
    ev = WorldEvaluator(EvalPlan(out=args.out, images=args.images, seed=args.seed, image_size=128))
    reuse_trained_loras(ev)  # the subject and style LoRAs of an earlier run in --out
    subject, style = subject_and_style(ev, args.token_words, "reg" * args.reg)
    word, kw, tag = args.background_word, {}, ""
    if args.token_words and word != BACKGROUND["word"]:
        kw, tag = {"token_words": [word]}, "_token_words"
    if args.reg:
        kw, tag = kw | {"reg_data_dir": str(regularisation_set(ev))}, tag + "_reg"
    colour = args.background_colour
    background = ev.background_lora(word, tag=tag, colour=colour, **kw)
    loras = {"s": subject, "t": style, "b": background}

    def line(name: str) -> list[dict]:
        options, order, weight = VARIANTS[name]
        row = ev.scene_row(
            name, [(loras[c], weight) for c in order], background=word, colour=colour, **options
        )
        return [{"variant": name} | {m: row.metrics[m] for m in METRICS}]

    record, names, minutes = run_variants(args, line)
    lines = [
        *record_head(
            "Composition of three LoRAs in one picture: merge, switch and composite settings (SD1.5, 128 px)",
            "composition_probe.py",
            command_flags(args, list(VARIANTS), results, ROOT)
            + " --token-words" * args.token_words
            + (f" --background-word {word}" if word != BACKGROUND["word"] else "")
            + (f" --background-colour {colour}" if colour != BACKGROUND["colour"] else "")
            + " --reg" * args.reg,
            f'{minutes:.1f} min. Shares of {args.images} images of "a sks shape on a {word} background, framed '
            f'style" (seeds {args.seed} on) the judges read as the heart (subject), framed (style), on {colour} '
            "(background) and all three (both).",
        ),
        *metric_table(record, names, METRICS),
    ]
    write_variant_results(args, lines, record)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
