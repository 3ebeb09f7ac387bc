"""The `lora-dist` commands: one module per command, each an `Options` dataclass and `run`.

A command module defines:
- a module docstring whose first line is the command's one-line help;
- `OPTIONS`: its settings class (a dataclass deriving from `options.Options`, one docstring per
  field), which validates itself when built;
- `run(opts) -> int`: the command itself, returning the exit code.

Register it in `lora_dist.cli.COMMANDS`. Bad input raises `lora_dist.errors.UserError`, which the
CLI prints as one line with exit code 2.
"""
