"""Entry point: parse the subcommand, run it, and turn bad input into one line and exit code 2."""

from __future__ import annotations

import argparse
import importlib
import sys
from importlib.metadata import entry_points

from ..errors import LorakitError

# subcommand -> module under lorakit.cli that defines add_parser(subparsers) and run(args)
SUBCOMMANDS: list[str] = ["train", "eval", "generate", "merge", "inspect", "serve", "export", "verify"]
# Other packages add subcommands through this entry-point group (the lab adds `experiment`), so the
# library never imports them.
PLUGIN_GROUP = "lorakit.commands"


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="lorakit", description="LoRA fine-tuning, merging, inspection and serving.")
    subparsers = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for name in SUBCOMMANDS:
        importlib.import_module(f"lorakit.cli.{name.replace('-', '_')}").add_parser(subparsers)
    for plugin in sorted(entry_points(group=PLUGIN_GROUP), key=lambda p: p.name):
        plugin.load()(subparsers)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return int(args.run(args) or 0)
    except LorakitError as err:
        print(f"lorakit {args.command}: error: {err}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"lorakit {args.command}: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
