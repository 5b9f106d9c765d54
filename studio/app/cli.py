"""The `lora-studio` command line: one subcommand per job, each in studio/app/commands/<name>.py.

A command module defines `register(subparsers)` (adds its parser) and `run(args) -> int`.
User errors (StudioError) are printed as one line without a traceback.
"""

from __future__ import annotations

import argparse
import importlib
import os
import sys

from studio.core.errors import StudioError

# subcommand -> the module that registers and runs it
COMMANDS: dict[str, str] = {name: f"studio.app.commands.{name}" for name in
                            ("train", "merge", "generate", "inspect", "eval", "ui")}  # fmt: skip


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="lora-studio",
        description="Train, merge and generate with LoRAs for Stable Diffusion 1.5 and SDXL.",
    )
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for module_name in COMMANDS.values():
        module = importlib.import_module(module_name)
        p = module.register(sub)
        p.set_defaults(_run=module.run)
    return parser


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
