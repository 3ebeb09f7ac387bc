"""Hugging Face model directories: written with calls that always write, and checked on read."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
from torch import nn
from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

from lora_dist.errors import ModelError

WEIGHTS_NAME = "model.safetensors"
TOKENIZER_FILES = ("tokenizer.json", "tokenizer.model", "tokenizer_config.json", "vocab.json")
WEIGHT_PATTERNS = ("*.safetensors", "*.safetensors.index.json", "pytorch_model*.bin")


def save_model_dir(model: nn.Module, tokenizer: Any, out_dir: Path, dtype: torch.dtype) -> None:
    """Write config.json, model.safetensors, generation_config.json and the tokenizer.

    transformers' `save_pretrained` silently writes no weights and no config on a distributed
    rank other than 0, so the model files are written here with safetensors and the configs'
    own JSON writers, which always write. Tied weights are stored once, as transformers does.
    """
    from safetensors.torch import save_file

    out_dir = Path(out_dir)
    state: dict[str, torch.Tensor] = {}
    seen: dict[int, str] = {}
    for name, tensor in model.state_dict().items():
        if tensor.data_ptr() in seen:  # tied to an earlier tensor (lm_head <- embed_tokens)
            continue
        seen[tensor.data_ptr()] = name
        state[name] = tensor.detach().to(dtype).contiguous()
    save_file(state, str(out_dir / WEIGHTS_NAME), metadata={"format": "pt"})
    (out_dir / WEIGHTS_NAME).chmod(0o644)  # safetensors creates 0600; a model dir is shared
    config = model.config
    config.dtype = dtype
    config.architectures = [type(model).__name__]
    config.to_json_file(str(out_dir / "config.json"))
    generation = getattr(model, "generation_config", None)
    if generation is not None:
        generation.to_json_file(str(out_dir / "generation_config.json"))
    if tokenizer is not None:
        tokenizer.save_pretrained(str(out_dir))


def _is_causal_lm(architecture: str) -> bool:
    """A class AutoModelForCausalLM builds (GPT-2's is GPT2LMHeadModel), or any *ForCausalLM."""
    known = MODEL_FOR_CAUSAL_LM_MAPPING_NAMES.values()
    return architecture.endswith("ForCausalLM") or architecture in known


def check_model_dir(path: str | Path) -> Path:
    """`path` if it is a Hugging Face causal-LM directory; else a ModelError naming what is
    missing. Reads only small files: config.json and the names of the others."""
    path = Path(path)
    if not path.exists():
        raise ModelError(f"model directory {path} does not exist")
    if not path.is_dir():
        raise ModelError(f"--model {path} is a file; pass a Hugging Face model directory")
    what = f"{path} is not a Hugging Face causal-LM directory"
    config_path = path / "config.json"
    if not config_path.is_file():
        raise ModelError(f"{what}: it has no config.json")
    try:
        config = json.loads(config_path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise ModelError(f"{what}: config.json is not valid JSON ({exc})") from exc
    if not isinstance(config, dict) or not config.get("model_type"):
        raise ModelError(f'{what}: config.json has no model_type (e.g. "llama")')
    architectures = config.get("architectures") or []
    if architectures and not any(map(_is_causal_lm, architectures)):
        raise ModelError(f"{what}: its architectures {architectures} include no *ForCausalLM")
    if not any(next(path.glob(p), None) for p in WEIGHT_PATTERNS):
        raise ModelError(f"{what}: it has no weights (model.safetensors or shards)")
    if not any((path / name).is_file() for name in TOKENIZER_FILES):
        raise ModelError(f"{what}: it has no tokenizer (tokenizer.json or tokenizer.model)")
    return path


def check_loadable(path: Path) -> None:
    """Load config, every weight and the tokenizer back; raise unless all are complete."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    check_model_dir(path)
    model, info = AutoModelForCausalLM.from_pretrained(str(path), output_loading_info=True)
    bad = {k: v for k, v in info.items() if v and k in ("missing_keys", "unexpected_keys")}
    if bad:
        raise ModelError(f"{path}: weights do not match the config: {bad}")
    tokenizer = AutoTokenizer.from_pretrained(str(path))
    if len(tokenizer) > model.get_input_embeddings().weight.shape[0]:
        raise ModelError(f"{path}: the tokenizer has more tokens than the embedding has rows")
