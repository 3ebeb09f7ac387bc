"""Convert a LLaMA-family GGUF file into a Hugging Face model directory (dequantised).

    lora-dist import-gguf model.Q4_K_M.gguf models/my-model          # bf16 weights
    lora-dist train ... --model models/my-model

The directory holds config.json, model.safetensors, generation_config.json and the tokenizer with
its chat template, and is written whole or not at all. Its weights are the GGUF's dequantised
values: a 4-bit file gives a model as good as the 4-bit file.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import torch

from lora_dist.commands.options import Options, option
from lora_dist.models.gguf_import import import_gguf

DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}


@dataclass
class ImportGGUFOptions(Options):
    gguf_file: str = option(positional=True, metavar="FILE")
    """the .gguf file to convert"""
    out_dir: str = option(positional=True, metavar="OUT_DIR")
    """the model directory to write (must not exist, or be empty, unless --overwrite)"""
    dtype: Literal["bf16", "fp16", "fp32"] = "bf16"
    """dtype of the written weights"""
    overwrite: bool = False
    """replace OUT_DIR if it is not empty"""


OPTIONS = ImportGGUFOptions


def run(opts: ImportGGUFOptions) -> int:
    out = import_gguf(Path(opts.gguf_file), Path(opts.out_dir), DTYPES[opts.dtype], opts.overwrite)
    print(f"wrote {out}")
    return 0
