"""The `lora-dist` console script: one subcommand per module (see lora_dist.commands)."""

from __future__ import annotations

import argparse
import importlib
import os
import sys
import traceback
from types import ModuleType

from lora_dist.commands.options import OneLineParser, add_flags, from_args
from lora_dist.errors import UserError

# name -> module. A module defines OPTIONS and run(opts) (lora_dist.commands), or, until it is
# converted, configure_<name>(parser) and run_<name>(args). A dict value groups subcommands.
COMMANDS: dict[str, str | dict[str, str]] = {
    "train": "lora_dist.training.trainer",
    "plan": "lora_dist.planning.memory",
    "merge": "lora_dist.merge",
    "inspect": "lora_dist.inspection",
    "eval": "lora_dist.training.evaluation",
    "import-gguf": "lora_dist.commands.import_gguf",
}
# One-line help of modules that do not yet start with it (converted modules use their docstring).
_LEGACY_HELP = {
    "train": "fine-tune a causal LM with LoRA under DeepSpeed",
    "plan": "predict per-GPU memory for a run before you queue it",
    "merge": "fold an adapter into a base model directory, shard by shard",
    "inspect": "print an adapter's config and size, and verify checksums",
    "eval": "generate on a dev split and score it with the task metric",
}


def _help(module_name: str, name: str) -> str:
    if name in _LEGACY_HELP:
        return _LEGACY_HELP[name]
    spec = importlib.util.find_spec(module_name)
    if spec is None or spec.origin is None:
        return ""
    import ast

    with open(spec.origin, encoding="utf-8") as f:
        doc = ast.get_docstring(ast.parse(f.read())) or ""
    return doc.split("\n", 1)[0].rstrip(".")


def _add_commands(
    sub: argparse._SubParsersAction,
    table: dict[str, str | dict[str, str]],
    argv: list[str],
    prefix: str,
) -> tuple[ModuleType, str] | None:
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
        p = sub.add_parser(name, help=_help(target, name), description=_help(target, name))
        if argv and argv[0] == name:
            module = importlib.import_module(target)
            if hasattr(module, "OPTIONS"):
                add_flags(p, module.OPTIONS)
                p.add_argument("--local_rank", type=int, default=-1, help=argparse.SUPPRESS)
            else:
                getattr(module, f"configure_{name}")(p)
            chosen = (module, f"{prefix}{name}")
    return chosen


def build_parser(argv: list[str]) -> tuple[argparse.ArgumentParser, tuple[ModuleType, str] | None]:
    parser = OneLineParser(prog="lora-dist", description=__doc__)
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", parser_class=OneLineParser)
    return parser, _add_commands(sub, COMMANDS, argv, "")


def run_module(module: ModuleType, name: str, args: argparse.Namespace) -> int:
    """Build the command's options from `args` and run it; a UserError is one line, exit 2."""
    try:
        if hasattr(module, "OPTIONS"):
            return int(module.run(from_args(module.OPTIONS, args)) or 0)
        return int(getattr(module, f"run_{name.split()[-1]}")(args) or 0)
    except UserError as exc:
        if os.environ.get("LORA_DIST_DEBUG") == "1":
            traceback.print_exc()
        print(f"lora-dist {name}: error: {exc}", file=sys.stderr)
        return 2


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    # The deepspeed launcher puts --local_rank=N before the subcommand; ranks come from the env.
    argv = [a for a in argv if not a.startswith("--local_rank")]
    parser, chosen = build_parser(argv)
    args = parser.parse_args(argv)
    if chosen is None:
        parser.print_help()
        return 2
    module, name = chosen
    return run_module(module, name, args)


if __name__ == "__main__":
    sys.exit(main())
