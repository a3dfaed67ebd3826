"""The ``fastbptt`` command.

Each subcommand lives in its own module, named in :data:`COMMANDS` and imported only when that
command runs: ``fastbptt --help`` lists the commands from the table alone, and a command whose
module cannot be imported (a missing optional dependency, a broken install) fails with an error
naming it while the others keep working.

A command module provides ``add_<name>_arguments(parser)`` or ``add_arguments(parser)``, and
``run_<name>(args)`` or ``main(args)`` returning the exit status.
"""
from __future__ import annotations

import argparse
import importlib
import sys
from collections.abc import Callable

# name -> (module with add_arguments(parser) and main(args), one-line help)
COMMANDS = {
    "info": ("fastbptt.info", "versions and the backends available here"),
    "bench": ("fastbptt.bench.cli", "benchmark speed and memory against torch.nn"),
    "train": ("fastbptt.lm.cli", "train the character language model with TBPTT"),
    "predict": ("fastbptt.lm.cli", "predict from a prefix with a trained checkpoint"),
    "sweep": ("fastbptt.lm.sweep", "train under one budget for several truncation lengths"),
}

# The pip extra (pyproject.toml, [project.optional-dependencies]) with each command's optional dependencies
EXTRAS = {"bench": "bench", "train": "lm", "predict": "lm", "sweep": "lm"}

DESCRIPTION = ("Fused RNN, GRU and LSTM kernels for truncated backpropagation through time: see which "
               "backends run here, benchmark them against torch.nn, and train and query a character "
               "language model.")

EPILOG = """examples:
  fastbptt info                                   the kernels that run on this machine
  fastbptt train --max-steps 300 --out runs/lm    train the language model (default corpus)
  fastbptt predict --checkpoint runs/lm/checkpoint.pt --prefix "ni hao"

Run `fastbptt COMMAND --help` for the options of one command."""

Entry = Callable[[argparse.Namespace], int]


class CommandUnavailable(Exception):
    """A command's module could not be imported; the message says why and what to install."""


def build_parser() -> argparse.ArgumentParser:
    """The top-level parser. Its subparsers only name the commands (their options are not known
    until a command's module is imported), so parsing with it yields the command and leaves the
    rest of the arguments for :func:`command_parser`."""
    parser = argparse.ArgumentParser(prog="fastbptt", description=DESCRIPTION, epilog=EPILOG,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(title="commands", dest="command", required=True, metavar="COMMAND")
    for name, (_, help_text) in COMMANDS.items():
        sub.add_parser(name, help=help_text, add_help=False)
    return parser


def _load_hint(name: str, exc: Exception) -> str:
    """What to install when command ``name`` failed to import for lack of a third-party module."""
    missing = exc.name if isinstance(exc, ModuleNotFoundError) else None
    if not missing or missing.split(".")[0] == "fastbptt" or name not in EXTRAS:
        return ""
    return f'; install the optional dependencies with: pip install "fastbptt[{EXTRAS[name]}]"'


def load_command(name: str) -> tuple[Callable[[argparse.ArgumentParser], None], Entry]:
    """Imports command ``name``'s module: (its argument adder, its entry point). Raises
    :class:`CommandUnavailable` when the module cannot be imported or lacks either function."""
    module_name = COMMANDS[name][0]
    try:
        module = importlib.import_module(module_name)
        adder = getattr(module, f"add_{name}_arguments", None) or module.add_arguments
        entry = getattr(module, f"run_{name}", None) or module.main
    except Exception as exc:  # whatever breaks the import is reported, without a traceback
        raise CommandUnavailable(f"the {name!r} command cannot be loaded: {type(exc).__name__}: {exc}"
                                 f"{_load_hint(name, exc)}") from exc
    return adder, entry


def command_parser(name: str) -> tuple[argparse.ArgumentParser, Entry]:
    """The full parser of command ``name`` (prog ``fastbptt NAME``) and its entry point."""
    adder, entry = load_command(name)
    help_text = COMMANDS[name][1]
    parser = argparse.ArgumentParser(prog=f"fastbptt {name}", description=help_text[:1].upper() + help_text[1:] + ".")
    adder(parser)
    return parser, entry


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    top, rest = build_parser().parse_known_args(argv)
    try:
        parser, entry = command_parser(top.command)
    except CommandUnavailable as exc:
        print(f"fastbptt: error: {exc}", file=sys.stderr)
        return 2
    return int(entry(parser.parse_args(rest)) or 0)


if __name__ == "__main__":
    sys.exit(main())
