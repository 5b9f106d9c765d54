"""`lora-studio merge`: merge LoRAs and/or add them into a base model, then print what each source kept.

Each source is FILE[:WEIGHT[:BLOCKS]]; BLOCKS is a block-weight preset (OUTALL, ...) or vector (17 values for
SD1.5, 12 or 20 for SDXL, 26 for either). Kohya/A1111, diffusers/PEFT, old diffusers and B-LoRA files
mix freely.

examples:
  exact weighted sum (rank = sum of ranks):
    lora-studio merge a.safetensors:0.7 b.safetensors:0.5 --out merged.safetensors
  the same sum re-factorised to rank 16, b only in the output blocks:
    lora-studio merge --method svd --rank 16 a.safetensors:0.7 b.safetensors:0.5:OUTALL --out m16.safetensors
  TIES at density 0.3:
    lora-studio merge --method ties --density 0.3 --rank 32 a.safetensors b.safetensors --out ties.safetensors
  ZipLoRA of a subject and a style LoRA (one prompt per source, in order):
    lora-studio merge --method ziplora --model sdxl_base.safetensors subject.safetensors style.safetensors \\
        --prompt "a sks dog" --prompt "a cat in zwx style" --out zip.safetensors
  a LoRA baked into its base model, saved as one checkpoint:
    lora-studio merge style.safetensors:0.8 --model base.safetensors --into-base base_plus_style.safetensors
"""

from __future__ import annotations

import argparse
import json

from merging.config import MergeConfig
from studio.core.options import add_config_args, config_from_args


def register(sub: argparse._SubParsersAction) -> argparse.ArgumentParser:
    p = sub.add_parser(
        "merge",
        help="merge LoRAs: linear/concat/SVD, TIES/DARE, ZipLoRA, orthogonal",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("sources", nargs="+", metavar="FILE[:WEIGHT[:BLOCKS]]", help="LoRA files to merge")
    p.add_argument(
        "--prompt", dest="prompts", action="append", metavar="TEXT",
        help="ziplora, fusion: the prompt of one source (give it once per source, in source order)",
    )  # fmt: skip
    p.add_argument(
        "--references", dest="references", action="append", metavar="FOLDER",
        help="ziplora, fusion: reference images of one source, e.g. its training set (once per source; '' = "
        "generate them from its prompt)",
    )  # fmt: skip
    p.add_argument("--preset", help="TOML preset: a file, or a name under presets/ (e.g. merge_ziplora)")
    p.add_argument("--set", action="append", metavar="KEY=VALUE", help="any option, e.g. --set steps=50")
    p.add_argument("--json", action="store_true", help="print the report as JSON")
    add_config_args(p, MergeConfig, skip=("sources", "prompts", "references"))
    return p


def run(args: argparse.Namespace) -> int:
    config = config_from_args(MergeConfig, args, preset_kind="merge")
    from merging.run import run_merge

    result = run_merge(config, progress=None if args.json else print_progress)
    if args.json:
        print(
            json.dumps({"outputs": outputs(result), "report": json.loads(result.report.to_json())}, indent=2)
        )
    else:
        print(result.report.table())
        for kind, path in outputs(result).items():
            print(f"wrote {kind}: {path}")
    return 0


def outputs(result) -> dict[str, str]:
    found = {"lora": result.out, "mergers": result.sidecar, "checkpoint": result.into_base}
    return {kind: str(path) for kind, path in found.items() if path is not None}


def print_progress(event: dict) -> None:
    if "stage" in event:
        print(f"{event['stage']} ...", flush=True)
        return
    step, steps = event.get("step", 0), event.get("steps", 0)
    if step == 1 or step % 10 == 0 or step == steps:
        print(
            f"  step {step}/{steps}  loss {event['loss']:.4g}  reconstruction {event['reconstruction']:.4g}  "
            f"merger similarity {event['similarity']:.3f}",
            flush=True,
        )
