"""Entry point: parse the subcommand, run it, and turn bad input into one line and exit code 2.

The contract: whatever a user types or hands over, the command ends with its result or with one
line on stderr, `lorakit COMMAND: error: <the problem>; <the fix>`, never a traceback.
    exit 0    done
    exit 1    the run itself failed (training diverged; a bug in lorakit: one line, see below)
    exit 2    bad input: a flag, a settings file, a data file, a model or adapter folder
    exit 130  interrupted
Argparse's own errors are bad input too: one line and a pointer to --help, not the whole usage.
"""

from __future__ import annotations

import argparse
import importlib
import math
import os
import sys
from importlib.metadata import entry_points

from ..errors import LorakitError

# subcommand -> module under lorakit.cli that defines add_parser(subparsers) and run(args)
SUBCOMMANDS: list[str] = ["train", "eval", "generate", "merge", "inspect", "serve", "export", "verify"]
# Other packages add subcommands through this entry-point group (the lab adds `experiment`), so the
# library never imports them.
PLUGIN_GROUP = "lorakit.commands"
USAGE_ERROR = 2
# Set to see the traceback of an unexpected error (a bug) instead of its one-line summary.
TRACEBACK_ENV = "LORAKIT_TRACEBACK"


def one_line(prog: str, message: str) -> str:
    """`prog: error: message` on one line (a value a user typed may hold a newline)."""
    text = " ".join(str(message).replace("\r", "\n").split("\n")).strip()
    return f"{prog}: error: {text}"


def finite_float(text: str) -> float:
    """type=float on every lorakit flag: NaN and infinities are no setting of anything."""
    value = float(text)
    if not math.isfinite(value):
        raise argparse.ArgumentTypeError(f"{text!r} is not a finite number")
    return value


def int64(text: str) -> int:
    """type=int on every lorakit flag: a whole number that fits in 64 bits (commands check their own range)."""
    value = int(text)
    if not -(2**63) <= value < 2**63:
        raise argparse.ArgumentTypeError(f"{text!r} is out of range")
    return value


class OneLineParser(argparse.ArgumentParser):
    """An ArgumentParser (and, through parser_class, every subparser) whose errors are one line, exit 2,
    and whose int and float flags refuse what no setting can be (see finite_float, int64)."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.register("type", float, finite_float)
        self.register("type", int, int64)

    def error(self, message: str):
        print(one_line(self.prog, f"{message} (see {self.prog} --help)"), file=sys.stderr)
        raise SystemExit(USAGE_ERROR)

    def parse_args(self, args=None, namespace=None):
        """As argparse's, but a flag the subcommand does not know is reported by that subcommand."""
        parsed, extra = self.parse_known_args(args, namespace)
        if extra:
            getattr(parsed, "parser", self).error(f"unrecognized arguments: {' '.join(extra)}")
        return parsed


def build_parser() -> argparse.ArgumentParser:
    parser = OneLineParser(prog="lorakit", description="LoRA fine-tuning, merging, inspection and serving.")
    subparsers = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for name in SUBCOMMANDS:
        importlib.import_module(f"lorakit.cli.{name.replace('-', '_')}").add_parser(subparsers)
    for plugin in sorted(entry_points(group=PLUGIN_GROUP), key=lambda p: p.name):
        plugin.load()(subparsers)
    for sub in subparsers.choices.values():
        sub.set_defaults(parser=sub)
    return parser


def _unexpected(prog: str, err: BaseException) -> int:
    """An error no check foresaw. Memory and the file system are the user's to fix (exit 2); anything
    else is a bug in lorakit: still one line (exit 1), the traceback on request."""
    if os.environ.get(TRACEBACK_ENV):
        raise err
    code, message = USAGE_ERROR, None
    if isinstance(err, MemoryError):
        message = "out of memory; lower --batch-size / --max-length or use a smaller model"
    elif isinstance(err, OSError):
        where = f" ({err.filename})" if getattr(err, "filename", None) else ""
        message = f"{err.strerror or err}{where}; check the path, its permissions and free space"
    else:
        code = 1
        message = (
            f"unexpected {type(err).__name__}: {err} (a bug in lorakit; rerun with {TRACEBACK_ENV}=1 for the "
            "traceback and report it)"
        )
    print(one_line(prog, message), file=sys.stderr)
    return code


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
    except SystemExit as done:  # --help (0) or a usage error, already printed as one line (2)
        return done.code if isinstance(done.code, int) else USAGE_ERROR
    prog = f"lorakit {args.command}"
    try:
        return int(args.run(args) or 0)
    except LorakitError as err:
        print(one_line(prog, err), file=sys.stderr)
        return USAGE_ERROR
    except KeyboardInterrupt:
        print(f"{prog}: interrupted", file=sys.stderr)
        return 130
    except Exception as err:  # noqa: BLE001  (the last line of defence of the one-line contract)
        return _unexpected(prog, err)


if __name__ == "__main__":
    sys.exit(main())
