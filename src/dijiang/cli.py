"""`dijiang` command line: one subcommand per module, each module registers its own arguments.

Only the chosen subcommand's module is imported (it brings torch and transformers), so `dijiang --help` and
`dijiang --version` answer at once.
"""
from __future__ import annotations

import argparse
import importlib
import sys

from dijiang import __version__

DESCRIPTION = ("Turn a Hugging Face causal LM into a DiJiang linear-attention model: convert it, fine-tune it "
               "against its softmax teacher, evaluate, generate. `dijiang COMMAND --help` lists a command's options.")

# subcommand -> (module defining add_cli(subparsers), the one-line summary `dijiang --help` lists)
COMMANDS = {
    "convert": ("conversion", "convert a model to DiJiang attention and save it"),
    "generate": ("generate", "generate text from a converted (or any) model, streaming"),
    "train": ("train", "fine-tune a converted model against its softmax teacher"),
    "export": ("export", "a model folder from a training run's checkpoint (a stopped run, an earlier step)"),
    "eval": ("evaluate", "perplexity (teacher vs student), per-layer attention fidelity, passkey retrieval"),
    "bench": ("bench", "model-level speed/memory: prefill, decode (HF and fast), training"),
    "demo": ("demo", "teacher -> DiJiang -> short fine-tune -> perplexity beyond the window, on a CPU"),
}


class HelpFormatter(argparse.RawDescriptionHelpFormatter):
    """Each option's default after its help text; descriptions keep their line breaks.

    Not argparse.ArgumentDefaultsHelpFormatter: that also prints "(default: None)" and "(default: False)",
    which say nothing, and repeats defaults that the help text already explains.
    """

    def _get_help_string(self, action) -> str:
        text = action.help or ""
        default = action.default
        if (default is None or default is False or default is argparse.SUPPRESS or default == []
                or "default" in text or not action.option_strings):
            return text
        if isinstance(default, (list, tuple)):
            return f"{text} (default: {' '.join(map(str, default))})"
        return f"{text} (default: %(default)s)"


class _Subcommands:
    """What each module's add_cli receives: `add_parser` fills in the summary and the help formatter."""

    def __init__(self, subparsers):
        self._subparsers = subparsers

    def add_parser(self, name: str, **kwargs) -> argparse.ArgumentParser:
        summary = COMMANDS[name][1]
        kwargs.setdefault("help", summary)
        kwargs.setdefault("description", summary[0].upper() + summary[1:] + ".")
        kwargs.setdefault("formatter_class", HelpFormatter)
        return self._subparsers.add_parser(name, **kwargs)


def build_parser(command: str | None = None) -> argparse.ArgumentParser:
    """The parser; only `command`'s module is imported and adds its arguments (the others are listed)."""
    parser = argparse.ArgumentParser(prog="dijiang", description=DESCRIPTION, formatter_class=HelpFormatter)
    parser.add_argument("--version", action="version", version=f"dijiang {__version__}")
    subparsers = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for name, (module, summary) in COMMANDS.items():
        if name == command:
            importlib.import_module(f"dijiang.{module}").add_cli(_Subcommands(subparsers))
        else:
            subparsers.add_parser(name, help=summary)
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    command = next((arg for arg in argv if not arg.startswith("-")), None)  # top-level options take no value
    args = build_parser(command).parse_args(argv)
    try:
        return args.func(args) or 0
    except (ValueError, FileNotFoundError) as error:
        print(f"dijiang {args.command}: error: {error}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
