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
from studio.core.text import escape_controls

# subcommand -> the module that registers and runs it
COMMANDS: dict[str, str] = {name: f"studio.app.commands.{name}" for name in
                            ("train", "merge", "generate", "inspect", "eval", "ui")}  # fmt: skip


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="lora-studio",
        description="Train, merge and generate with LoRAs for Stable Diffusion 1.5 and SDXL.",
    )
    parser.add_argument("--debug", action="store_true", help="show the full traceback of an error")
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
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    except Exception as exc:  # the user sees one line; --debug shows where it came from
        if args.debug:
            raise
        print(f"error: {one_line(exc)}", file=sys.stderr)
        return 1


def one_line(exc: BaseException) -> str:
    """A StudioError's own message; for anything else its kind and first line, and how to learn more."""
    if isinstance(exc, StudioError):
        return escape_controls(str(exc))
    text = str(exc).strip().splitlines()[0][:300] if str(exc).strip() else ""
    where = f"{type(exc).__name__}: {text}" if text else type(exc).__name__
    if isinstance(exc, OSError):
        return escape_controls(f"{where}. Nothing was written in its place.")
    return escape_controls(f"{where} (unexpected; run with --debug for the full traceback and report it)")


if __name__ == "__main__":
    sys.exit(main())
