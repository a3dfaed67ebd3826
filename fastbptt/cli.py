"""The ``fastbptt`` command. Each subcommand lives in its own module, imported only when used."""
from __future__ import annotations

import argparse
import importlib
import sys

# name -> (module with add_arguments(parser) and main(args), one-line help)
COMMANDS = {
    "info": ("fastbptt.info", "versions and the backends available here"),
    "bench": ("fastbptt.bench.cli", "benchmark speed and memory against torch.nn"),
    "train": ("fastbptt.lm.cli", "train the character language model with TBPTT"),
    "predict": ("fastbptt.lm.cli", "predict from a prefix with a trained checkpoint"),
    "sweep": ("fastbptt.lm.sweep", "train under one budget for several truncation lengths"),
}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="fastbptt", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    for name, (module_name, help_text) in COMMANDS.items():
        try:
            module = importlib.import_module(module_name)
        except ImportError:
            continue  # an optional part that is not installed
        p = sub.add_parser(name, help=help_text, description=help_text)
        adder = getattr(module, f"add_{name}_arguments", None) or module.add_arguments
        adder(p)
        p.set_defaults(_entry=getattr(module, f"run_{name}", None) or module.main)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return int(args._entry(args) or 0)


if __name__ == "__main__":
    sys.exit(main())
