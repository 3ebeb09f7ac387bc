"""Loading a base model for a run: under ZeRO-3 straight into partitions, one tensor at a time."""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

import deepspeed
import torch
import torch.distributed as dist
from safetensors import safe_open
from torch import nn
from transformers import AutoConfig, AutoModelForCausalLM, GenerationConfig
from transformers.initialization import no_init_weights
from transformers.integrations import HfDeepSpeedConfig

from lora_dist.distributed.ds_config import model_dtype
from lora_dist.distributed.host_memory import returning_freed_host_memory


def load_base_model(model_dir: Path, ds_cfg: dict[str, Any], stage: int) -> torch.nn.Module:
    """Load a HF causal LM; under ZeRO-3 straight into partitions so no rank holds the whole base.

    Under ZeRO-3 the weights stream in one tensor at a time (host memory grows with a shard, not
    with the model). Checkpoints that stream cannot read (no safetensors, or names that need
    transformers' renaming) go through from_pretrained under zero.Init instead.
    """
    if stage == 3:
        try:
            return load_streamed_zero3(Path(model_dir), ds_cfg, model_dtype(ds_cfg))
        except (FileNotFoundError, ValueError) as exc:
            print(f"streamed loading not possible ({exc}); using from_pretrained", file=sys.stderr)

    keep_alive = HfDeepSpeedConfig(ds_cfg) if stage == 3 else None  # noqa: F841 (weakref'd)
    return AutoModelForCausalLM.from_pretrained(str(model_dir), dtype=model_dtype(ds_cfg))


def build_zero3_from_config(
    config: Any, ds_config: dict[str, Any], dtype: torch.dtype | None = None
) -> nn.Module:
    """A causal LM built from a config straight into ZeRO-3 partitions, initialised correctly.

    Not `with deepspeed.zero.Init(): Model(config)`: zero.Init partitions every module's
    parameters into empty placeholders as soon as the module is built, so transformers'
    `post_init()` initialises nothing and each weight keeps torch's constructor default, N(0, 1)
    for nn.Embedding. Where lm_head is tied to that embedding (GPT-2, BLOOM, Falcon) the first
    logits are then ~sqrt(hidden) wide: GPT-2 at vocab 1000 gave a loss of 167, not ln 1000 =
    6.9 (Phi-3's padding-row init even indexes an empty placeholder and fails). With
    HfDeepSpeedConfig alive, transformers builds under zero.Init and then re-runs its
    initialisation on gathered parameters (`initialize_weights_zero3`).
    """
    keep_alive = HfDeepSpeedConfig(ds_config)  # noqa: F841 (transformers holds a weakref)
    return AutoModelForCausalLM.from_config(config, dtype=dtype)


def checkpoint_files(model_dir: Path) -> list[Path]:
    """The safetensors files of a Hugging Face model directory, sharded or not, in shard order."""
    model_dir = Path(model_dir)
    index = model_dir / "model.safetensors.index.json"
    if index.is_file():
        names = sorted(set(json.loads(index.read_text())["weight_map"].values()))
        return [model_dir / n for n in names]
    single = model_dir / "model.safetensors"
    if single.is_file():
        return [single]
    raise FileNotFoundError(f"{model_dir} has no model.safetensors[.index.json] to stream")


def load_streamed_zero3(
    model_dir: Path, ds_config: dict[str, Any], dtype: torch.dtype
) -> nn.Module:
    """A causal LM built under zero.Init, its weights streamed in one tensor at a time.

    transformers' ZeRO-3 `from_pretrained` merges every shard into one state dict on rank 0
    before copying, so rank 0 briefly holds the whole checkpoint. Here each tensor is read from
    its shard with `safe_open` (a memory map) on rank 0 only, gathered, filled and re-partitioned
    before the next one, so a rank's extra memory is about one tensor plus one mapped shard.
    Every rank reads the shard headers to agree on the order of the collective gathers.
    """
    files = checkpoint_files(model_dir)  # fail before building anything
    config = AutoConfig.from_pretrained(str(model_dir))
    keep_alive = HfDeepSpeedConfig(ds_config)  # noqa: F841 (transformers holds a weakref)
    with returning_freed_host_memory():
        with no_init_weights():  # every weight is overwritten below; skip the random init
            model = AutoModelForCausalLM.from_config(config, dtype=dtype)
        params = dict(model.named_parameters())
        buffers = dict(model.named_buffers())
        rank = dist.get_rank() if dist.is_initialized() else 0
        loaded: set[str] = set()
        for path in files:
            with safe_open(str(path), framework="pt") as f:
                for key in f.keys():
                    if key in buffers:  # buffers are never partitioned: every rank reads them
                        buffers[key].data.copy_(f.get_tensor(key))
                        continue
                    if key not in params:
                        raise ValueError(f"{path.name}: {key} matches no model parameter")
                    param = params[key]
                    with deepspeed.zero.GatheredParameters([param], modifier_rank=0):
                        if rank == 0:
                            param.data.copy_(f.get_tensor(key))
                    loaded.add(key)
    missing = sorted(set(params) - loaded)
    if missing:
        raise ValueError(f"{model_dir}: no weights for {missing[:5]} ({len(missing)} in all)")
    if (Path(model_dir) / "generation_config.json").is_file():  # stop tokens, as from_pretrained
        model.generation_config = GenerationConfig.from_pretrained(str(model_dir))
    return model.eval()
