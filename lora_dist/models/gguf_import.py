"""GGUF to Hugging Face: dequantise a LLaMA-family GGUF file into an ordinary model directory.

transformers reads GGUF files (with the `gguf` package) and dequantises every tensor, but the
model it returns cannot be saved as it is. Here the dequantised weights go into a plain model of
the same config, written in `dtype` with calls that always write (see models.hf_dir), together
with the tokenizer and its chat template. The result loads with `from_pretrained`, trains with
LoRA and streams into ZeRO-3 partitions like any other checkpoint. It holds the quantised model's
values: a Q4 file gives a model as good as the Q4 file, not as good as the original.
"""

from __future__ import annotations

from pathlib import Path

import torch

from lora_dist.errors import ModelError
from lora_dist.models.hf_dir import check_loadable, save_model_dir

# GGUF architectures whose transformers model has separate q/k/v/o and gate/up/down projections.
LLAMA_FAMILY = ("llama", "mistral", "qwen2", "qwen3")
PLAIN_TYPES = ("F32", "F16", "BF16")


def gguf_summary(path: Path) -> tuple[str, dict[str, int]]:
    """(architecture, {tensor type: count}) read from the file's header alone."""
    from gguf import GGUFReader

    try:
        reader = GGUFReader(str(path))
    except (ValueError, OSError) as exc:
        raise ModelError(f"{path} is not a readable GGUF file: {exc}") from exc
    field = reader.fields.get("general.architecture")
    if field is None:
        raise ModelError(f"{path} names no general.architecture: not a model GGUF")
    arch = bytes(field.parts[field.data[0]]).decode()
    types: dict[str, int] = {}
    for tensor in reader.tensors:
        types[tensor.tensor_type.name] = types.get(tensor.tensor_type.name, 0) + 1
    return arch, types


def check_importable(path: Path) -> str:
    """The GGUF's architecture, or a ModelError if this importer cannot convert the file."""
    from gguf.quants import _type_traits  # the quantisations gguf can dequantise

    path = Path(path)
    if not path.is_file():
        raise ModelError(f"GGUF file {path} does not exist")
    with open(path, "rb") as f:
        if f.read(4) != b"GGUF":
            raise ModelError(f"{path} is not a GGUF file (it does not start with 'GGUF')")
    arch, types = gguf_summary(path)
    if arch not in LLAMA_FAMILY:
        raise ModelError(
            f"{path} holds a {arch!r} model; import-gguf converts LLaMA-family models "
            f"({', '.join(LLAMA_FAMILY)})"
        )
    readable = {t.name for t in _type_traits} | set(PLAIN_TYPES)
    unknown = sorted(set(types) - readable)
    if unknown:
        raise ModelError(
            f"{path} has tensors quantised as {', '.join(unknown)}, which the gguf package "
            f"cannot dequantise; supported: {', '.join(sorted(readable))}"
        )
    return arch


def convert_gguf(path: Path, out_dir: Path, dtype: torch.dtype = torch.bfloat16) -> None:
    """Write the dequantised model and tokenizer of GGUF `path` into the empty `out_dir`."""
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    path = Path(path)
    check_importable(path)
    where, name = str(path.parent), path.name
    loaded = AutoModelForCausalLM.from_pretrained(where, gguf_file=name, dtype=torch.float32)
    tokenizer = AutoTokenizer.from_pretrained(where, gguf_file=name)
    config = loaded.config.to_dict()
    for key in ("quantization_config", "_name_or_path", "_model_name_or_path"):
        config.pop(key, None)
    config["dtype"] = str(dtype).removeprefix("torch.")
    # A plain model of the same config, without the GGUF quantisation attached to it.
    plain_config = AutoConfig.for_model(**config)
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(plain_config, dtype=torch.float32)
    model.load_state_dict(loaded.state_dict(), strict=True, assign=True)
    model.tie_weights()
    model.generation_config = loaded.generation_config
    del loaded
    save_model_dir(model, tokenizer, Path(out_dir), dtype)


def import_gguf(path: Path, out_dir: Path, dtype: torch.dtype, overwrite: bool = False) -> Path:
    """Convert `path` into `out_dir` (written whole or not at all); returns out_dir."""
    import shutil
    import tempfile

    out_dir = Path(out_dir)
    if out_dir.exists() and any(out_dir.iterdir()) and not overwrite:
        raise ModelError(f"{out_dir} exists and is not empty; pass --overwrite or another dir")
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}-", dir=out_dir.parent))
    try:
        convert_gguf(path, tmp, dtype)
        check_loadable(tmp)
        tmp.chmod(0o755)
        if out_dir.exists():
            shutil.rmtree(out_dir)
        tmp.rename(out_dir)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out_dir
