"""Gradient fusion in the demo world: on which data should each concept's layer inputs be recorded?

The eval (bench/results/eval_sd15.md) fuses two ordinary subject LoRAs (heart "sks", moon "zwx") with their
inputs recorded on "a sks shape" alone, 4 noisy samples per concept, from images the LoRAs generate: each
subject keeps only part of itself (heart 1.00 -> 0.71, moon 0.62 -> 0.33) and the prompted backgrounds are
lost (1.00 -> 0.67). Mix-of-Show records each concept on its own training data. This bench trains the two
LoRAs once (the eval's settings), then fuses them with one recording setting changed at a time and judges
each subject on the eval's prompts ("a sks shape on a <colour> background"), seeds and images per line.

    python bench/fusion_probe.py --out /tmp/fusion        # writes bench/results/fusion_probe.md

LoRA files already in <out>/work/loras (from an earlier run of this bench) are reused. `--world 128` runs it
in the 128 px world; `--layers` and `--lora-steps` train the two subject LoRAs on other modules (e.g. only
the cross-attention's keys and values, `attn2.to_k,attn2.to_v`, as Custom Diffusion does: their inputs are
the prompt's embeddings, which differ between the two concepts) or for other steps; `--text-encoder` trains
them on the text encoder too (bench/results/fusion_probe_te128.md); `--token-words` lets each learn its
trigger word's embedding (Mix-of-Show's ED-LoRA learns its concept's tokens too), which fusion then reads.
"""

from __future__ import annotations

import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
RESULTS = ROOT / "bench/results/fusion_probe.md"

from records import command_flags, record_head, run_variants, variant_args, write_variant_results  # noqa: E402  (bench/ is on the path as a script)

from studio.app.evaluate import EvalPlan, Evaluator  # noqa: E402
from studio.demo.concepts import SUBJECTS_4  # noqa: E402

SUBJECTS = SUBJECTS_4[:2]  # heart, moon; --subjects 4 adds the arrow and the bolt
# merge options per line; "data" = each LoRA's training folder as its references
VARIANTS: dict[str, dict] = {
    "prompt only, 4 samples": {"fusion_samples": 4},
    "prompt only, 16 samples": {"fusion_samples": 16},
    "training images, prompt only, 16 samples": {"data": True, "reference_captions": False},
    "training images + captions, 8 samples": {"data": True, "reference_captions": True, "fusion_samples": 8},
    "training images + captions, 16 samples": {
        "data": True,
        "reference_captions": True,
        "fusion_samples": 16,
    },
    "training images + captions, 32 samples": {
        "data": True,
        "reference_captions": True,
        "fusion_samples": 32,
    },
}
# the eval's setting (training images, prompt only, 16 samples) with another ridge, pulled toward the base
# weights (the default) or toward the exact sum
for ridge in (1e-2, 5e-2, 1e-1, 1.0):
    VARIANTS[f"eval's setting, ridge {ridge:g}"] = {"data": True, "fusion_ridge": ridge}
for ridge in (1e-3, 1e-2, 1e-1):
    VARIANTS[f"eval's setting, anchored to the sum, ridge {ridge:g}"] = {
        "data": True,
        "fusion_ridge": ridge,
        "fusion_anchor": "sum",
    }
# the lines above were measured when fusion recorded every layer at once (the text encoders summed) with a
# ridge of 1e-3 by default: they keep those settings
for options in VARIANTS.values():
    options.setdefault("fusion_order", "joint")
    options.setdefault("fusion_ridge", 1e-3)
# the reference implementation's order: the cross-attention's keys and values first, the rest recorded after
for ridge in (1e-3, 1e-2, 3e-2, 5e-2, 1e-1):
    VARIANTS[f"eval's setting, text first, ridge {ridge:g}"] = {
        "data": True,
        "fusion_ridge": ridge,
        "fusion_order": "text-first",
    }
    VARIANTS[f"eval's setting, text first on trigger words, ridge {ridge:g}"] = {
        "data": True,
        "fusion_ridge": ridge,
        "fusion_order": "text-first",
        "fusion_text_rows": "trigger",
    }

for ridge in (1e-2, 5e-2):  # more recorded samples: a steadier Gram matrix needs less ridge?
    VARIANTS[f"eval's setting, text first, 64 samples, ridge {ridge:g}"] = {
        "data": True,
        "fusion_ridge": ridge,
        "fusion_order": "text-first",
        "fusion_samples": 64,
    }

for ridge in (1e-2, 5e-2):  # every block recorded with the blocks before it fused
    VARIANTS[f"eval's setting, sequential, ridge {ridge:g}"] = {
        "data": True,
        "fusion_ridge": ridge,
        "fusion_order": "sequential",
    }

for ridge in (1e-2, 5e-2, 1e-1):  # each concept's error relative to its own delta's effect
    VARIANTS[f"eval's setting, text first, output balance, ridge {ridge:g}"] = {
        "data": True,
        "fusion_ridge": ridge,
        "fusion_order": "text-first",
        "fusion_balance": "output",
    }

for ridge in (1e-2, 5e-2):  # the model run in bf16 (--dtype bf16: half the memory), the solve in float32
    VARIANTS[f"eval's setting, text first, bf16 model, ridge {ridge:g}"] = {
        "data": True,
        "fusion_ridge": ridge,
        "fusion_order": "text-first",
        "dtype": "bf16",
    }

for ridge in (1e-2, 5e-2, 1e-1):  # recorded with each training image's own caption, as the LoRA learnt it
    VARIANTS[f"training images + captions, text first, ridge {ridge:g}"] = {
        "data": True,
        "reference_captions": True,
        "fusion_ridge": ridge,
        "fusion_order": "text-first",
    }

for ridge in (1e-2, 5e-2):  # with LoRAs that adapt the text encoder (--text-encoder): their deltas summed
    VARIANTS[f"eval's setting, text first, text encoders summed, ridge {ridge:g}"] = {
        "data": True,
        "fusion_ridge": ridge,
        "fusion_order": "text-first",
        "fusion_text_encoders": "sum",
    }


def subject_loras(ev: Evaluator, training: dict) -> tuple[list[Path], list[Path]]:
    """The two ordinary subject LoRAs (trained with `training` options unless already in work/loras) and their
    training folders."""
    files, folders = [], []
    tag = "".join(f"_{k}_{'-'.join(v) if isinstance(v, list) else v}" for k, v in training.items())
    learn_words = training.pop("token_words", False)
    for subject in SUBJECTS:
        samples = ev.world.dreambooth_set(
            n=ev.plan.train_images, shape=subject["shape"], colour=subject["colour"], token=subject["token"]
        )
        folders.append(ev.write_set(f"subject_{subject['shape']}", samples))
        name = f"dreambooth_{subject['shape']}{tag}"
        existing = ev.work / "loras" / f"{name}.safetensors"
        if existing.is_file():
            ev.loras[name] = existing
        words = {"token_words": [subject["token"]]} if learn_words else {}
        files.append(ev.subject_lora(subject, tag=tag, **training, **words))
    return files, folders


def judged(ev: Evaluator, variant: str, case: str, lora: Path, subjects=None) -> list[dict]:
    rows = []
    for subject in subjects or SUBJECTS:
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
    shapes = [s["shape"] for s in SUBJECTS]
    summed = " | summed" if len(shapes) > 2 else ""
    lines = [
        "| line | " + " | ".join(f"{s} | {s} bg" for s in shapes) + summed + " | merge s |",
        "|---" * (2 * len(shapes) + 2 + bool(summed)) + "|",
    ]
    for name in names:
        cells = {r["subject_name"]: r for r in record if r["variant"] == name}
        seconds = cells[shapes[0]].get("merge_seconds")
        shares = " | ".join(f"{cells[s]['subject']:.2f} | {cells[s]['background']:.2f}" for s in shapes)
        total = f" | {sum(cells[s]['subject'] for s in shapes):.2f}" if summed else ""
        lines.append(f"| {name} | {shares}{total} | {'' if seconds is None else seconds} |")
    return lines


def own_options(parser) -> None:
    parser.add_argument("--world", type=int, default=64, choices=(64, 128), help="the demo world's size")
    parser.add_argument("--layers", default="", help="train the subject LoRAs on these modules only")
    parser.add_argument("--lora-steps", type=int, default=None, help="the subject LoRAs' training steps")
    parser.add_argument(
        "--text-encoder", action="store_true", help="the subject LoRAs also train the text encoder"
    )
    parser.add_argument("--subjects", type=int, default=2, choices=(2, 4), help="subjects fused together")
    parser.add_argument(
        "--token-words",
        action="store_true",
        help="each subject LoRA also learns its trigger word's embedding",
    )


def main(argv: list[str] | None = None) -> int:
    lines_of = ["each alone", "exact sum (concat)"] + list(VARIANTS)
    args = variant_args(__doc__, lines_of, RESULTS, argv, sep="|", more=own_options)
    torch.set_num_threads(args.threads)
    global SUBJECTS
    SUBJECTS = SUBJECTS_4[: args.subjects]
    ev = Evaluator(EvalPlan(out=args.out, images=args.images, seed=args.seed, image_size=args.world))
    training = {"layers": args.layers.split(",")} if args.layers else {}
    training |= {"max_steps": args.lora_steps} if args.lora_steps else {}
    training |= {"train_text_encoder": True} if args.text_encoder else {}
    training |= {"token_words": True} if args.token_words else {}
    files, folders = subject_loras(ev, training)

    def line(name: str) -> list[dict]:
        if name == "each alone":  # each LoRA judged on its own subject only
            return [judged(ev, name, name, f, [s])[0] for f, s in zip(files, SUBJECTS)]
        if name == "exact sum (concat)":
            return judged(ev, name, name, ev.merge("subjects_concat", "concat", [f"{f}:1.0" for f in files]))
        return run_variant(ev, name, VARIANTS[name], files, folders)

    record, names, _ = run_variants(args, line)
    flags = command_flags(args, lines_of, RESULTS, ROOT)
    flags += f" --world {args.world}" * (args.world != 64) + f" --layers {args.layers}" * bool(args.layers)
    flags += (
        f" --lora-steps {args.lora_steps}" * bool(args.lora_steps) + " --text-encoder" * args.text_encoder
    )
    flags += f" --subjects {args.subjects}" * (args.subjects != 2) + " --token-words" * args.token_words
    lines = [
        *record_head(
            f"Gradient fusion: which recorded inputs keep each concept (SD1.5 demo model, {args.world} px)",
            "fusion_probe.py",
            flags,
            f'each subject judged on {args.images} images of "a <token> shape on a <colour> background" (the '
            f"eval's prompts; seeds {args.seed} on, the eval's are 5000 on): subject = share read as that "
            "subject, bg = share with the prompted background.",
        ),  # fmt: skip
        *table(record, names),
    ]
    write_variant_results(args, lines, record)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
