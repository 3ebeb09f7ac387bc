"""The `lora-dist` console script: one subcommand per module, each owning its own flags."""

from __future__ import annotations

import argparse
import importlib
import sys

# name -> (module, one-line help). Each module defines configure(parser) and run(args) -> int.
COMMANDS: dict[str, tuple[str, str]] = {
    "train": ("lora_dist.train", "fine-tune a causal LM with LoRA under DeepSpeed"),
    "plan": ("lora_dist.plan", "predict per-GPU memory for a run before you queue it"),
    "merge": ("lora_dist.export", "fold an adapter into a base model directory, shard by shard"),
    "inspect": ("lora_dist.inspection", "print an adapter's config and size, and verify checksums"),
    "eval": ("lora_dist.evaluate", "generate on a dev split and score it with the task metric"),
}


def build_parser(argv: list[str]) -> tuple[argparse.ArgumentParser, str | None]:
    parser = argparse.ArgumentParser(prog="lora-dist", description=__doc__)
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    chosen = argv[0] if argv and argv[0] in COMMANDS else None
    for name, (module, help_text) in COMMANDS.items():
        p = sub.add_parser(name, help=help_text)
        if name == chosen:  # import only the module that will run
            getattr(importlib.import_module(module), f"configure_{name}")(p)
    return parser, chosen


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    # The deepspeed launcher puts --local_rank=N before the subcommand; ranks come from the env.
    argv = [a for a in argv if not a.startswith("--local_rank")]
    parser, chosen = build_parser(argv)
    args = parser.parse_args(argv)
    if chosen is None:
        parser.print_help()
        return 2
    module = importlib.import_module(COMMANDS[chosen][0])
    return int(getattr(module, f"run_{chosen}")(args) or 0)


if __name__ == "__main__":
    sys.exit(main())
