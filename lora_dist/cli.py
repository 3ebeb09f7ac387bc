"""The `lora-dist` console script: one subcommand per module (see lora_dist.commands)."""

from __future__ import annotations

import argparse
import ast
import importlib
import importlib.util
import os
import sys
import traceback
from types import ModuleType
from typing import NamedTuple

from lora_dist.commands.options import OneLineParser, add_flags, from_args
from lora_dist.errors import UserError

# name -> module defining OPTIONS and run(opts) (see lora_dist.commands). A dict value groups
# subcommands under one name.
COMMANDS: dict[str, str | dict[str, str]] = {
    "train": "lora_dist.commands.train",
    "plan": "lora_dist.commands.plan",
    "merge": "lora_dist.commands.merge",
    "inspect": "lora_dist.commands.inspect",
    "eval": "lora_dist.commands.eval",
    "import-gguf": "lora_dist.commands.import_gguf",
    "analyze": {
        "spectrum": "lora_dist.commands.analyze.spectrum",
        "similarity": "lora_dist.commands.analyze.similarity",
        "amplification": "lora_dist.commands.analyze.amplification",
    },
    "generate": "lora_dist.commands.generate",
    "serve": "lora_dist.commands.serve",
}
DEBUG_ENV = "LORA_DIST_DEBUG"


def _help(module_name: str) -> str:
    """The first line of a command module's docstring, read without importing the module."""
    spec = importlib.util.find_spec(module_name)
    if spec is None or spec.origin is None:
        return ""
    with open(spec.origin, encoding="utf-8") as f:
        doc = ast.get_docstring(ast.parse(f.read())) or ""
    return doc.split("\n", 1)[0].rstrip(".")


class Chosen(NamedTuple):
    """The command that argv names: its module, its full name, its parser."""

    module: ModuleType
    name: str
    parser: argparse.ArgumentParser


def _add_commands(
    sub: argparse._SubParsersAction,
    table: dict[str, str | dict[str, str]],
    argv: list[str],
    prefix: str,
) -> Chosen | None:
    """Add every command of `table`; import (and configure) only the one `argv` names."""
    chosen = None
    for name, target in table.items():
        if isinstance(target, dict):
            group = sub.add_parser(name, help=f"{name} subcommands")
            inner = group.add_subparsers(dest=f"{name}_command", metavar="SUBCOMMAND")
            picked = argv[1:] if argv and argv[0] == name else []
            found = _add_commands(inner, target, picked, f"{prefix}{name} ")
            chosen = chosen or found
            continue
        p = sub.add_parser(name, help=_help(target), description=_help(target))
        if argv and argv[0] == name:
            module = importlib.import_module(target)
            add_flags(p, module.OPTIONS)
            chosen = Chosen(module, f"{prefix}{name}", p)
    return chosen


def build_parser(argv: list[str]) -> tuple[argparse.ArgumentParser, Chosen | None]:
    parser = OneLineParser(prog="lora-dist", description=__doc__)
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", parser_class=OneLineParser)
    return parser, _add_commands(sub, COMMANDS, argv, "")


def run_module(module: ModuleType, name: str, args: argparse.Namespace) -> int:
    """Build the command's options from `args` and run it; a UserError is one line, exit 2.

    With LORA_DIST_DEBUG=1 the traceback comes first, for a developer.
    """
    try:
        return int(module.run(from_args(module.OPTIONS, args)) or 0)
    except UserError as exc:
        if os.environ.get(DEBUG_ENV) == "1":
            traceback.print_exc()
        print(f"lora-dist {name}: error: {exc}", file=sys.stderr)
        return 2


def _without_local_rank(argv: list[str]) -> list[str]:
    out, skip = [], False
    for arg in argv:
        if skip:
            skip = False
        elif arg in ("--local_rank", "--local-rank"):
            skip = True  # its value is the next argument
        elif not arg.startswith(("--local_rank=", "--local-rank=")):
            out.append(arg)
    return out


def main(argv: list[str] | None = None) -> int:
    """`lora-dist COMMAND [flags]`; also what launcher/train.py and `python -m` entries call."""
    argv = sys.argv[1:] if argv is None else argv
    # Launchers add --local_rank=N (the deepspeed launcher before the subcommand); ranks come
    # from the environment (lora_dist.distributed.launch), so it is dropped wherever it is.
    argv = _without_local_rank(argv)
    parser, chosen = build_parser(argv)
    args, unknown = parser.parse_known_args(argv)
    if chosen is None:
        parser.print_help()
        return 2
    if unknown:  # said by the command's parser, so the line names the command
        chosen.parser.error(f"unrecognized arguments: {' '.join(unknown)}")
    return run_module(chosen.module, chosen.name, args)


if __name__ == "__main__":
    sys.exit(main())
