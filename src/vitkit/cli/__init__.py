"""The `vitkit` command. Each subcommand lives in its own module under `vitkit.cli` and exposes
`add_parser(subparsers)` (which registers itself and sets `func`)."""

from __future__ import annotations

import argparse
import importlib
import sys

from vitkit.errors import VitkitError

# subcommand modules, in the order `vitkit --help` lists them
COMMANDS = ("models", "info", "predict", "export", "explain", "serve", "train", "pretrain", "eval")


def build_parser() -> argparse.ArgumentParser:
    from vitkit import __version__

    parser = argparse.ArgumentParser(
        prog="vitkit",
        description="Vision Transformers: build, load, predict, export, explain, serve, train, "
        "pre-train, evaluate.",
    )
    parser.add_argument("--version", action="version", version=f"vitkit {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name in COMMANDS:
        importlib.import_module(f"vitkit.cli.{name}").add_parser(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "func", None):
        parser.print_help()
        return 2
    try:
        return int(args.func(args) or 0)
    except VitkitError as exc:
        print(f"vitkit {args.command}: error: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print(f"vitkit {args.command}: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
