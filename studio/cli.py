"""The `lora-studio` command line: one subcommand per job, each in studio/commands/<name>.py.

A command module defines `register(subparsers)` (adds its parser) and `run(args) -> int`.
User errors (StudioError) are printed as one line without a traceback.
"""

from __future__ import annotations

import argparse
import importlib
import os
import sys

from studio.errors import StudioError

# name -> (module, one-line help). Commands whose module is not there yet say so instead of crashing.
COMMANDS: dict[str, tuple[str, str]] = {
    "train": ("studio.commands.train", "train a LoRA: DreamBooth, style, B-LoRA, block-wise, orthogonal"),
    "merge": ("studio.commands.merge", "merge LoRAs: linear/concat/SVD, TIES/DARE, ZipLoRA, orthogonal"),
    "generate": ("studio.commands.generate", "generate images with a stack of LoRAs"),
    "inspect": ("studio.commands.inspect", "show what is inside a LoRA file"),
    "eval": ("studio.commands.eval", "measure every method on the built-in demo world"),
    "ui": ("studio.commands.ui", "start the browser UI"),
}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="lora-studio",
        description="Train, merge and generate with LoRAs for Stable Diffusion 1.5 and SDXL.",
    )
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name, (module_name, help_text) in COMMANDS.items():
        try:
            module = importlib.import_module(module_name)
        except ModuleNotFoundError as exc:
            if exc.name != module_name:
                raise
            stub = sub.add_parser(name, help=f"{help_text} (not built yet)")
            stub.set_defaults(_run=_not_built(name))
            continue
        p = module.register(sub)
        p.set_defaults(_run=module.run)
    return parser


def _not_built(name: str):
    def run(args: argparse.Namespace) -> int:
        print(f"lora-studio {name}: this command is not built yet in this version.", file=sys.stderr)
        return 2

    return run


def main(argv: list[str] | None = None) -> int:
    os.environ.setdefault("HF_HUB_OFFLINE", "1")  # never reach for the hub: weights come from the user
    parser = build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "_run", None):
        parser.print_help()
        return 0
    try:
        return int(args._run(args) or 0)
    except StudioError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
