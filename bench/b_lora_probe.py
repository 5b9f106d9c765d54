"""B-LoRA in the 128 px world: is the failed transfer the method's recipe, its two blocks, or one image?

The eval (bench/results/eval_sdxl_128.md) trains B-LoRA on one image of the subject and one in the style at
the eval's LoRA settings (rank 8, lr 1e-3, 300 steps, batch 4), and neither half transfers. This bench changes
one thing at a time and judges the same three transfers (content alone, style alone, content + style) on the
eval's prompts, seeds and images per line:
- the recipe: the paper's (rank 64, lr 5e-5 constant, 1000 steps, batch 1), a lower learning rate for longer;
- the strength: both halves loaded at weight 0.5;
- the data: eight pictures of the subject and eight in the style instead of one;
- the blocks (control): an ordinary LoRA on every UNet attention block, trained on the same one image, its
  two files stacked. If it transfers where B-LoRA does not, the two blocks are what fails here;
- each attention block alone (where does this model keep content, where style?), and B-LoRA's recipe on other
  pairs of blocks (both trained on the one image; each half loaded with the other's block at weight 0).

    python bench/b_lora_probe.py --out /tmp/blora --threads 2     # writes bench/results/b_lora_probe.md
"""

from __future__ import annotations

import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
RESULTS = ROOT / "bench/results/b_lora_probe.md"

from records import command_flags, record_head, run_variants, variant_args, write_variant_results  # noqa: E402  (bench/ is on the path as a script)

from studio.app.evaluate import EvalPlan, Evaluator  # noqa: E402

PAPER = {"rank": 64, "alpha": 64, "learning_rate": 5e-5, "max_steps": 1000, "batch_size": 1}
# name -> (training options, pictures per half, generation weight, method); pairs of other blocks below
VARIANTS: dict[str, tuple[dict, int, float, str]] = {
    "eval settings": ({}, 1, 1.0, "b_lora"),
    "paper recipe (rank 64, lr 5e-5, 1000 steps, batch 1)": (PAPER, 1, 1.0, "b_lora"),
    "lr 1e-4, 1000 steps": ({"learning_rate": 1e-4, "max_steps": 1000}, 1, 1.0, "b_lora"),
    "halves at weight 0.5": ({}, 1, 0.5, "b_lora"),
    "8 pictures per half": ({}, 8, 1.0, "b_lora"),
    "control: LoRA on every attention block, one image": ({}, 1, 1.0, "dreambooth"),
}
# one attention block at a time (B-LoRA's layers), as the paper found its two blocks: the tiny SDXL's attention
# blocks and their maps at 128 px: IN04/IN05 8 x 8, IN07/IN08 and M00 4 x 4, OUT00-02 4 x 4, OUT03-05 8 x 8
ATTENTION_BLOCKS = (
    "IN04",
    "IN05",
    "IN07",
    "IN08",
    "M00",
    "OUT00",
    "OUT01",
    "OUT02",
    "OUT03",
    "OUT04",
    "OUT05",
)
LAYERS = ["to_q", "to_k", "to_v", "to_out.0"]
for block in ATTENTION_BLOCKS:
    VARIANTS[f"one block: {block}"] = ({"blocks": [block], "layers": LAYERS}, 1, 1.0, "dreambooth")
# B-LoRA's recipe on another pair of blocks (both trained on the one image; the content half loaded without
# the style block, the style half without the content block), picked from the one-block lines above
PAIRS = {
    "pair: OUT02 content + OUT03 style": ("OUT02", "OUT03"),
    "pair: OUT00 content + OUT01 style": ("OUT00", "OUT01"),
}
PAIRS["pair: OUT02 content + OUT03 style, 8 pictures per half"] = ("OUT02", "OUT03")
for name, (content_block, style_block) in PAIRS.items():
    pictures = 8 if "8 pictures" in name else 1
    VARIANTS[name] = ({"blocks": [content_block, style_block], "layers": LAYERS}, pictures, 1.0, "dreambooth")
CASES = ("content only (sks)", "style only (zwx)", "content sks + style zwx")


def run_variant(ev: Evaluator, index: int, name: str) -> list[dict]:
    options, images, weight, method = VARIANTS[name]
    content, style = ev.b_lora_pair(f"_v{index}", images=images, method=method, **options)
    blocks = None
    if name in PAIRS:
        content_block, style_block = PAIRS[name]
        blocks = {"content": {style_block: 0.0}, "style": {content_block: 0.0}}
    rows = ev.b_lora_rows(content, style, weight=weight, stacked=method != "b_lora", blocks=blocks)
    return [{"variant": name, "case": row.case, **row.metrics} for row in rows]


def main(argv: list[str] | None = None) -> int:
    args = variant_args(__doc__, list(VARIANTS), RESULTS, argv, sep="|")
    torch.set_num_threads(args.threads)
    ev = Evaluator(EvalPlan(out=args.out, images=args.images, family="sdxl", image_size=128, seed=args.seed))
    record, names, minutes = run_variants(
        args, lambda name: run_variant(ev, list(VARIANTS).index(name), name)
    )
    lines = [
        *record_head(
            "B-LoRA transfers by recipe, strength, data and blocks (SDXL demo model, 128 px world)",
            "b_lora_probe.py",
            command_flags(args, list(VARIANTS), RESULTS, ROOT),
            f"{minutes:.1f} min. Shares of {args.images} images the judges read as the heart (subject), framed "
            "(style) and both.",
        ),  # fmt: skip
        "| variant | content only: subject | style only: style | mixed: subject | mixed: style | mixed: both |",
        "|---|---|---|---|---|---|",
    ]
    for name in names:
        cells = {r["case"]: r for r in record if r["variant"] == name}
        content, style, mixed = (cells[c] for c in CASES)
        numbers = (content["subject"], style["style"], mixed["subject"], mixed["style"], mixed["both"])
        lines.append(f"| {name} | " + " | ".join(f"{n:.2f}" for n in numbers) + " |")
    write_variant_results(args, lines, record)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
