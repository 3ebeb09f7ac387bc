"""Finding and loading the base model, and seeding every random number generator."""

from __future__ import annotations

import random
from pathlib import Path
from typing import Any

import numpy as np
import torch

from lora_dist.ds_config import model_dtype
from lora_dist.models import resolve_model_dir  # noqa: F401 (its old home)


def seed_everything(seed: int) -> None:
    """Seed Python's, NumPy's and torch's generators (identically on every rank)."""
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def load_base_model(model_dir: Path, ds_cfg: dict[str, Any], stage: int) -> torch.nn.Module:
    """Load a HF causal LM; under ZeRO-3 straight into partitions so no rank holds the whole base.

    Under ZeRO-3 the weights stream in one tensor at a time (host memory grows with a shard, not
    with the model). Checkpoints that stream cannot read (no safetensors, or names that need
    transformers' renaming) go through from_pretrained under zero.Init instead.
    """
    import sys

    from transformers import AutoModelForCausalLM
    from transformers.integrations import HfDeepSpeedConfig

    if stage == 3:
        from lora_dist.distributed.zero import load_streamed_zero3

        try:
            return load_streamed_zero3(Path(model_dir), ds_cfg, model_dtype(ds_cfg))
        except (FileNotFoundError, ValueError) as exc:
            print(f"streamed loading not possible ({exc}); using from_pretrained", file=sys.stderr)

    keep_alive = HfDeepSpeedConfig(ds_cfg) if stage == 3 else None  # noqa: F841 (weakref'd)
    return AutoModelForCausalLM.from_pretrained(str(model_dir), dtype=model_dtype(ds_cfg))
