"""Tasks: how an example becomes a prompt and a target, and how predictions are scored."""

from __future__ import annotations

import importlib

from lora_dist.errors import ConfigError
from lora_dist.tasks.base import Task

# name -> module defining TASK: Task
TASK_MODULES = {
    "wikisql": "lora_dist.tasks.wikisql",
    "e2e": "lora_dist.tasks.e2e",
    "samsum": "lora_dist.tasks.samsum",
    "mnli": "lora_dist.tasks.mnli",
}


def get_task(name: str) -> Task:
    """Return the task registered as `name`, with a clear error for unknown names."""
    if name not in TASK_MODULES:
        raise ConfigError(f"unknown task {name!r}; choose one of {sorted(TASK_MODULES)}")
    return importlib.import_module(TASK_MODULES[name]).TASK
