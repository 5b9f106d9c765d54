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
        "--check", type=Path, default=None, help="recorded eval.json: fail if a number fell below it"
    )
    p.add_argument("--margin", type=float, default=0.25, help="with --check: allowed drop per number")
    return p


def run(args: argparse.Namespace) -> int:
    from studio.app.eval_report import check_against, evaluate
    from studio.app.evaluate import EvalPlan, world_rows

    overrides = {"family": args.family, "image_size": args.world}
    if args.images is not None:
        overrides["images"] = args.images
    if args.lora_steps is not None:
        overrides["lora_steps"] = args.lora_steps
    if args.rows:
        overrides["rows"] = tuple(r.strip() for r in args.rows.split(",") if r.strip())
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
    recorded = read_record(args.check) if args.check else None  # before the long run, not after it
    data = evaluate(plan, command=" ".join(["lora-studio eval", *filter(None, flags)]))
    print((args.out / "eval.md").read_text())
    if recorded is not None:
        failures = check_against(recorded, data, args.margin)
        for line in failures:
            print(f"BELOW RECORD: {line}", file=sys.stderr)
        return 1 if failures else 0
    return 0


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
