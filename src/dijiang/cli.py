"""`dijiang` command line: one subcommand per module, each module registers its own."""
from __future__ import annotations

import argparse
import importlib
import sys

# module -> it defines add_cli(subparsers), which adds its subcommand(s) and sets `func`.
SUBCOMMAND_MODULES = ["conversion", "generate", "train", "evaluate", "bench", "demo"]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="dijiang", description=__doc__)
    subparsers = parser.add_subparsers(dest="command", required=True)
    for name in SUBCOMMAND_MODULES:
        module = importlib.import_module(f"dijiang.{name}")
        module.add_cli(subparsers)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.func(args) or 0
    except (ValueError, FileNotFoundError) as error:
        print(f"dijiang {args.command}: error: {error}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
