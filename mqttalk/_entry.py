"""The `mqttalk` command: hand `send`, `recv` and `status` to a live process of the same peer when one
runs (:mod:`._handoff`: nothing but the standard library is imported for that), else run the CLI."""

from __future__ import annotations

import os
import sys

TYPE_CHECKING = False  # (not typing's: every `mqttalk` start would pay for it)
if TYPE_CHECKING:
    from ._live import Live, Service


def main() -> None:
    args = sys.argv[1:]
    from ._handoff import DISABLE, eligible, hand_over

    if eligible(args, os.environ):
        try:
            code = hand_over(args)
        except KeyboardInterrupt:
            print("mqttalk: interrupted", file=sys.stderr)
            sys.exit(130)
        if code is not None:
            sys.exit(code)
    from . import cli

    if os.environ.get(DISABLE, "1") != "0":
        cli.SERVICE = _serve_others  # a live session of this process serves the peer's other commands
    cli.main(args)


def _serve_others(live: Live) -> Service | None:
    from ._handoff_server import Server

    return Server.start(live)
