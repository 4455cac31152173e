"""The `vitkit` command. Each subcommand lives in its own module under `vitkit.cli` and exposes
`add_parser(subparsers)` (which registers itself and sets `func`)."""

from __future__ import annotations

import argparse
import contextlib
import errno
import importlib
import os
import signal
import sys
import threading

from vitkit.errors import VitkitError

# subcommand modules, in the order `vitkit --help` lists them
COMMANDS = (
    "models",
    "info",
    "predict",
    "embed",
    "index",
    "search",
    "export",
    "explain",
    "serve",
    "train",
    "pretrain",
    "eval",
    "cache",
)


def build_parser() -> argparse.ArgumentParser:
    from vitkit import __version__

    parser = argparse.ArgumentParser(
        prog="vitkit",
        description="Vision Transformers: build, load, predict, embed, search, export, explain, "
        "serve, train, pre-train, evaluate.",
    )
    parser.add_argument("--version", action="version", version=f"vitkit {__version__}")
    parser.add_argument(
        "--debug",
        action="store_true",
        help="show the full traceback of an error (also VITKIT_DEBUG=1); for bug reports",
    )
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name in COMMANDS:
        importlib.import_module(f"vitkit.cli.{name}").add_parser(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    """Run one subcommand. A user's mistake (a `VitkitError`, a file or folder the system
    refuses, a size beyond memory) prints one line on stderr and exits 1; anything else is a
    bug and keeps its traceback. `--debug` or VITKIT_DEBUG=1 shows the traceback for all."""
    argv = list(sys.argv[1:] if argv is None else argv)
    debug = os.environ.get("VITKIT_DEBUG", "").strip().lower() in {"1", "true", "yes", "on"}
    head = argv[: argv.index("--")] if "--" in argv else argv
    if "--debug" in head:  # accepted anywhere before `--`, also after the subcommand
        argv.remove("--debug")
        debug = True
    parser = build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "func", None):
        parser.print_help()
        return 2
    command = f"vitkit {args.command}"
    previous = _terminate_on_sigterm()
    try:
        code = int(args.func(args) or 0)
        sys.stdout.flush()  # a closed pipe shows here, not in the interpreter's exit flush
        return code
    except BrokenPipeError:  # `vitkit models | head -1`: the reader left; stop quietly
        _silence_stdout()
        return 141
    except KeyboardInterrupt:
        print(f"{command}: interrupted", file=sys.stderr)
        return 130
    except Exception as exc:
        message = _user_error(exc)
        if message is None or debug:
            raise
        print(f"{command}: error: {message}", file=sys.stderr)
        return 1
    finally:
        _restore_sigterm(previous)


def _user_error(exc: BaseException) -> str | None:
    """One line for an error that is the user's or the system's, not vitkit's; None for a bug."""
    if isinstance(exc, VitkitError):
        lines = [line.strip() for line in str(exc).splitlines() if line.strip()]
        return "; ".join(lines) or type(exc).__name__
    if isinstance(exc, OSError) and exc.errno is not None and exc.strerror:
        names = [n for n in (exc.filename, exc.filename2) if n is not None]
        where = " -> ".join(repr(os.fsdecode(n)) for n in names)
        hint = {
            errno.ENOSPC: "; free some disk space or choose another folder",
            errno.EACCES: "; check the folder's permissions or choose another",
            errno.EROFS: "; choose a writable folder",
            errno.ENOTDIR: "; a file stands where a folder is needed",
        }.get(exc.errno, "")
        return f"{where + ': ' if where else ''}{exc.strerror}{hint}"
    if isinstance(exc, MemoryError) or type(exc).__name__ == "OutOfMemoryError":  # torch.cuda
        return (
            "out of memory; use a smaller batch size, model or image size "
            "(see docs/security.md for vitkit's limits)"
        )
    return None


def _terminate_on_sigterm() -> object:
    """Turn SIGTERM into SystemExit so `finally` blocks run and temporary files are removed."""
    if threading.current_thread() is not threading.main_thread():
        return None

    def stop(signum: int, frame: object) -> None:
        raise SystemExit(128 + signum)

    try:
        return signal.signal(signal.SIGTERM, stop)
    except (ValueError, OSError):
        return None


def _restore_sigterm(previous: object) -> None:
    if previous is not None:
        with contextlib.suppress(ValueError, OSError, TypeError):
            signal.signal(signal.SIGTERM, previous)  # type: ignore[arg-type]


def _silence_stdout() -> None:
    """After a broken pipe, point stdout at /dev/null so the exit flush does not fail again."""
    with contextlib.suppress(OSError, ValueError):
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())


if __name__ == "__main__":
    sys.exit(main())
