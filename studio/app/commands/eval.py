"""`lora-studio eval`: train, merge and generate on the built-in demo world and judge every method.

Examples:
  lora-studio eval --out eval-report                 # the full table (about 15 minutes on 2 CPU cores)
  lora-studio eval --quick --out /tmp/eval           # a few images per row
  lora-studio eval --world 128 --out eval-128        # the larger world: four subjects, two-subject scenes
  lora-studio eval --quick --check bench/results/eval_sd15.json   # fail if a number fell below the record
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from studio.core.errors import ConfigError


def register(sub: argparse._SubParsersAction) -> argparse.ArgumentParser:
    p = sub.add_parser(
        "eval",
        help="measure every method on the built-in demo world",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--out", type=Path, default=Path("eval-report"), help="folder for eval.md/json/grid")
    p.add_argument("--family", default="sd15", choices=("sd15", "sdxl"), help="which demo model")
    p.add_argument(
        "--world", type=int, default=64, choices=(64, 128),
        help="the demo world: 64 px (the built-in models) or 128 px (four subjects, two-subject scenes)",
    )  # fmt: skip
    p.add_argument("--quick", action="store_true", help="fewer images per row (what CI runs)")
    p.add_argument("--images", type=int, default=None, help="generated images per line")
    p.add_argument("--lora-steps", type=int, default=None, help="training steps of each LoRA")
    p.add_argument("--rows", default=None, help="comma-separated sections (base,dreambooth,style,merge,...)")
    p.add_argument(
        "--fusion-variant", action="append", default=[], metavar="KEY=VALUE,...",
        help="gradient fusion measured again with other options, e.g. ridge=0.01,order=text-first (the "
             "merge's fusion_* options without the prefix; once per variant)",
    )  # fmt: skip
    p.add_argument(
        "--check", type=Path, default=None, help="recorded eval.json: fail if a number fell below it"
    )
    p.add_argument("--margin", type=float, default=0.25, help="with --check: allowed drop per number")
    return p


def run(args: argparse.Namespace) -> int:
    from studio.app.eval_report import check_against, evaluate
    from studio.app.evaluate import EvalPlan, world_rows

    overrides = {"family": args.family, "image_size": args.world}
    if args.images is not None and args.images < 1:
        raise ConfigError(f"--images {args.images}: give 1 or more images per line")
    if args.images is not None:
        overrides["images"] = args.images
    if args.lora_steps is not None:
        overrides["lora_steps"] = args.lora_steps
    if args.rows:
        overrides["rows"] = tuple(r.strip() for r in args.rows.split(",") if r.strip())
    if args.fusion_variant:
        overrides["fusion_variants"] = tuple(parse_fusion_variant(v) for v in args.fusion_variant)
    plan = EvalPlan.quick(args.out, **overrides) if args.quick else EvalPlan(out=args.out, **overrides)
    known = world_rows(args.world)
    unknown = set(plan.rows) - set(known)
    if unknown:
        raise ConfigError(
            f"unknown eval rows {sorted(unknown)} in the {args.world} px world; choose from {', '.join(known)}"
        )
    flags = [f"--out {args.out}", "--quick" * args.quick, f"--family {args.family}" * (args.family != "sd15")]
    flags.append(f"--world {args.world}" * (args.world != 64))
    flags += [
        f"--{k.replace('_', '-')} {v}"
        for k, v in vars(args).items()
        if k in ("images", "lora_steps", "rows") and v
    ]
    flags += [f"--fusion-variant {v}" for v in args.fusion_variant]
    recorded = read_record(args.check) if args.check else None  # before the long run, not after it
    data = evaluate(plan, command=" ".join(["lora-studio eval", *filter(None, flags)]))
    print((args.out / "eval.md").read_text())
    if recorded is not None:
        failures = check_against(recorded, data, args.margin)
        for line in failures:
            print(f"BELOW RECORD: {line}", file=sys.stderr)
        return 1 if failures else 0
    return 0


def parse_fusion_variant(text: str) -> dict:
    """Parse "ridge=0.01,order=text-first" into the merge options {fusion_ridge: 0.01, fusion_order: ...},
    checked against the merge's own options now rather than after an hour of training."""
    from merging import MergeConfig
    from studio.core.options import build_config

    options = {}
    for item in filter(None, (i.strip() for i in text.split(","))):
        key, sep, value = item.partition("=")
        if not sep:
            raise ConfigError(
                f"--fusion-variant {text!r}: write KEY=VALUE pairs, e.g. ridge=0.01,order=text-first"
            )
        options[f"fusion_{key.strip().replace('-', '_')}"] = value.strip()
    known = {name for name in MergeConfig.__dataclass_fields__ if name.startswith("fusion_")}
    unknown = sorted(set(options) - known)
    if unknown or not options:
        names = ", ".join(sorted(k.removeprefix("fusion_") for k in known))
        raise ConfigError(f"--fusion-variant {text!r}: unknown or no keys {unknown}; choose from {names}")
    probe = {"sources": ["a.safetensors", "b.safetensors"], "method": "fusion", "model": "demo:sd15",
             "prompts": ["a", "b"], "out": "merged.safetensors"}  # fmt: skip
    config = build_config(MergeConfig, probe | options)  # its one-line error names a bad value
    return {key: getattr(config, key) for key in options}


def read_record(path: Path) -> dict:
    """A recorded eval.json for --check, or a clear error."""
    try:
        recorded = json.loads(path.read_text())
    except (OSError, ValueError) as exc:
        raise ConfigError(
            f"--check {path}: cannot read it ({exc}); pass an eval.json written by `lora-studio eval`"
        ) from None
    if not isinstance(recorded, dict) or not isinstance(recorded.get("rows"), list):
        raise ConfigError(
            f"--check {path}: not an eval.json (no list of rows); pass one `lora-studio eval` wrote"
        )
    return recorded
