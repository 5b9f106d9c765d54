"""`lora-studio ui`: the browser page on http://127.0.0.1:7860 over a workspace folder.

    lora-studio ui                                  # ./studio-workspace, this machine only
    lora-studio ui --workspace ~/lora-work --port 7861
    LORA_STUDIO_PASSWORD=... lora-studio ui --host 0.0.0.0      # other machines, behind a login

Datasets, trained and merged LoRAs, generated images and the job queue (jobs.sqlite) live in the workspace;
the page only reads and writes inside it. On any address but this machine's own (127.0.0.1, ::1) the page
asks for a login: user `studio` (or --user) and the password in $LORA_STUDIO_PASSWORD or in --password-file
(never on the command line, where other users of the machine could read it); without one it does not start.
"""

from __future__ import annotations

import argparse
import ipaddress
import os
from pathlib import Path

from studio.core.errors import ConfigError

PASSWORD_ENV = "LORA_STUDIO_PASSWORD"


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
    p.add_argument("--user", default="studio", help="login name when serving beyond this machine")
    p.add_argument(
        "--password-file",
        type=Path,
        default=None,
        help=f"file holding the login password (or ${PASSWORD_ENV})",
    )
    p.add_argument(
        "--allow-pickle",
        action="store_true",
        help="let the page load .ckpt/.pt/.bin files (tensors only; they can be hostile)",
    )
    return p


def is_loopback(host: str) -> bool:
    """True for addresses only this machine can reach."""
    if host in ("localhost", ""):
        return host == "localhost"
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def login(args: argparse.Namespace) -> tuple[str, str] | None:
    """(user, password) the page asks for, None on loopback; refuses a network address without a password."""
    password = os.environ.get(PASSWORD_ENV, "")
    if args.password_file is not None:
        try:
            password = args.password_file.read_text(encoding="utf-8").strip()
        except OSError as exc:
            raise ConfigError(
                f"--password-file {args.password_file}: cannot read it ({exc.strerror or exc})."
            ) from None
    if is_loopback(args.host):
        return (args.user, password) if password else None
    if len(password) < 8:
        raise ConfigError(
            f"--host {args.host} serves the studio (training, files, the queue) to other machines, so it needs a "
            f"login: put a password of 8 or more characters in ${PASSWORD_ENV} or in --password-file FILE."
        )
    return args.user, password


def run(args: argparse.Namespace) -> int:
    # generation here and training in a worker share the cores: see studio.app.runner (before torch loads)
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
    from ui.app import launch

    launch(
        args.workspace,
        args.host,
        args.port,
        open_browser=args.open,
        auth=login(args),
        allow_pickle=args.allow_pickle,
    )
    return 0
