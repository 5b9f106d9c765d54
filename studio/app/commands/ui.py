"""`lora-studio ui`: the browser UI on http://127.0.0.1:7860 over a workspace folder.

    lora-studio ui                                  # ./studio-workspace, this machine only
    lora-studio ui --workspace ~/lora-work --port 7861

Datasets, trained and merged LoRAs, generated images and the job queue (jobs.sqlite) live in the workspace;
the page only reads and writes inside it. Use --host 0.0.0.0 only on a network you trust: the page has no login.
"""

from __future__ import annotations

import argparse


def register(sub: argparse._SubParsersAction) -> argparse.ArgumentParser:
    p = sub.add_parser(
        "ui",
        help="start the browser UI",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument(
        "--workspace", default="studio-workspace", help="folder for datasets, LoRAs, images and jobs"
    )
    p.add_argument("--host", default="127.0.0.1", help="address to listen on (default: this machine only)")
    p.add_argument("--port", type=int, default=None, help="port (default: 7860, or the next free one)")
    p.add_argument("--open", action="store_true", help="open the page in the default browser")
    return p


def run(args: argparse.Namespace) -> int:
    from ui.app import launch

    launch(args.workspace, args.host, args.port, open_browser=args.open)
    return 0
