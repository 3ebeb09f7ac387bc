"""Base weights by tensor name from safetensors shards, one tensor in memory at a time.

A safetensors file is an 8-byte little-endian header length, a JSON header (name -> dtype,
shape, byte range) and the raw data. Reading the headers of every shard costs kilobytes; a
tensor is then read with plain file reads into a buffer of its own size, in its stored dtype,
with no memory map that would keep pages resident. `WeightMatrix` multiplies by it in float64
one block of rows at a time, so a product needs the stored tensor plus one block, never a
float64 copy of W.
"""

from __future__ import annotations

import json
import struct
from dataclasses import dataclass
from pathlib import Path

import torch

from lora_dist.errors import ModelError

Tensor = torch.Tensor
INDEX_NAME = "model.safetensors.index.json"
SINGLE_NAME = "model.safetensors"
DTYPES = {
    "F64": torch.float64,
    "F32": torch.float32,
    "F16": torch.float16,
    "BF16": torch.bfloat16,
}
BLOCK_ELEMENTS = 1 << 20  # float64 elements converted at once: 8 MiB


@dataclass(frozen=True)
class TensorLocation:
    """Where one tensor's bytes are: file, absolute byte range, dtype and shape."""

    file: Path
    start: int
    stop: int
    dtype: str
    shape: tuple[int, ...]


def read_header(path: Path) -> dict[str, TensorLocation]:
    """name -> location for every tensor of one safetensors file, from its header alone."""
    try:
        with open(path, "rb") as f:
            (length,) = struct.unpack("<Q", f.read(8))
            header = json.loads(f.read(length))
        size = path.stat().st_size
    except (OSError, struct.error, json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise ModelError(f"{path} is not a readable safetensors file: {exc}") from exc
    base = 8 + length
    found = {}
    for name, info in header.items():
        if name == "__metadata__":
            continue
        start, stop = info["data_offsets"]
        found[name] = TensorLocation(
            path, base + start, base + stop, info["dtype"], tuple(info["shape"])
        )
        if base + stop > size:
            raise ModelError(f"{path} is truncated: {name} ends past the end of the file")
    return found


class SafetensorsWeights:
    """The tensors of a model directory (sharded with an index, or one file), read by name."""

    def __init__(self, path: str | Path) -> None:
        path = Path(path)
        if path.is_file():
            files = [path]
        elif (path / INDEX_NAME).is_file():
            weight_map = json.loads((path / INDEX_NAME).read_text())["weight_map"]
            files = [path / name for name in sorted(set(weight_map.values()))]
        elif (path / SINGLE_NAME).is_file():
            files = [path / SINGLE_NAME]
        else:
            raise ModelError(
                f"{path} has no {SINGLE_NAME} or {INDEX_NAME}: pass a model directory with "
                "safetensors weights (or one .safetensors file) as --base"
            )
        self.locations: dict[str, TensorLocation] = {}
        for file in files:
            if not file.is_file():
                raise ModelError(f"{path / INDEX_NAME} names a shard that is missing: {file.name}")
            for name, loc in read_header(file).items():
                if name in self.locations:
                    raise ModelError(
                        f"tensor {name} is in both {self.locations[name].file} and {file}"
                    )
                self.locations[name] = loc
        self.files = files

    def tensor_name(self, module: str) -> str:
        """The base tensor holding `module`'s weight.

        `<module>.weight` if present; else the one tensor whose name and the module path agree
        up to a leading prefix (a file saved from the inner model has `h.0.attn.c_attn.weight`
        where the adapter says `transformer.h.0.attn.c_attn`, and the other way round).
        """
        exact = f"{module}.weight"
        if exact in self.locations:
            return exact
        parts = exact.split(".")
        shorter = {".".join(parts[i:]) for i in range(1, len(parts) - 1)}
        found = [n for n in self.locations if n in shorter or n.endswith("." + exact)]
        if len(found) == 1:
            return found[0]
        raise ModelError(
            f"the base has {'no' if not found else 'several'} weight tensors for the adapted "
            f"module {module} ({', '.join(found) or f'no {exact}'}): is --base the model this "
            "adapter was trained on?"
        )

    def read(self, name: str) -> Tensor:
        """One tensor in its stored dtype, read into a buffer of its own size."""
        loc = self.locations[name]
        if loc.dtype not in DTYPES:
            raise ModelError(
                f"{name} in {loc.file} is {loc.dtype}; analysis reads {sorted(DTYPES)}"
            )
        dtype = DTYPES[loc.dtype]
        numel = 1
        for d in loc.shape:
            numel *= d
        nbytes = loc.stop - loc.start
        if nbytes != numel * dtype.itemsize:
            raise ModelError(f"{name} in {loc.file} has {nbytes} bytes for shape {loc.shape}")
        buf = torch.empty(nbytes, dtype=torch.uint8)
        view = memoryview(buf.numpy())
        with open(loc.file, "rb", buffering=0) as f:
            f.seek(loc.start)
            done = 0
            while done < nbytes:  # one read() returns at most ~2 GiB on Linux
                got = f.readinto(view[done:])
                if not got:
                    raise ModelError(f"{loc.file} is truncated inside {name}")
                done += got
        return buf.view(dtype).reshape(loc.shape)


class WeightMatrix:
    """W (out x in) of one module, or some of its rows, multiplied in float64 block by block.

    `stored` is the tensor as the checkpoint has it: W itself, or Wᵀ (in x out) when
    `transposed` (GPT-2's Conv1D, fan_in_fan_out). `rows` restricts W to those output rows.
    """

    def __init__(self, stored: Tensor, transposed: bool, rows: Tensor | None = None) -> None:
        self.stored = stored
        self.transposed = transposed
        self.rows = rows
        self.full_out = stored.shape[1] if transposed else stored.shape[0]
        self.in_features = stored.shape[0] if transposed else stored.shape[1]
        self._buffer: Tensor | None = None

    @property
    def shape(self) -> tuple[int, int]:
        out = self.full_out if self.rows is None else len(self.rows)
        return out, self.in_features

    def _blocks(self):
        """(first stored row, float64 copy of a block of stored rows) over the stored tensor.

        Every block lands in one buffer, allocated once per matrix: a fresh float64 block per
        product would let glibc keep each freed one resident (its mmap threshold rises to the
        size of a freed block), and RSS grew to 6 base tensors on the 2B benchmark.
        """
        rows, cols = self.stored.shape
        step = max(1, min(rows, BLOCK_ELEMENTS // max(1, cols)))
        if self._buffer is None:
            self._buffer = torch.empty(step * cols, dtype=torch.float64)
        for start in range(0, rows, step):
            n = min(step, rows - start)
            block = self._buffer[: n * cols].view(n, cols)
            block.copy_(self.stored[start : start + n])
            yield start, block

    def _full_matmul(self, x: Tensor) -> Tensor:
        """W·x for all output rows."""
        if not self.transposed:
            return torch.cat([blk @ x for _, blk in self._blocks()])
        out = torch.zeros(self.full_out, x.shape[1], dtype=torch.float64)
        for start, blk in self._blocks():
            out += blk.T @ x[start : start + blk.shape[0]]
        return out

    def matmul(self, x: Tensor) -> Tensor:
        """W·x, x of shape (in, k)."""
        full = self._full_matmul(x)
        return full if self.rows is None else full[self.rows]

    def rmatmul(self, y: Tensor) -> Tensor:
        """Wᵀ·y, y of shape (len(rows) or out, k)."""
        if self.rows is not None:
            scattered = torch.zeros(self.full_out, y.shape[1], dtype=torch.float64)
            scattered[self.rows] = y
            y = scattered
        if self.transposed:
            return torch.cat([blk @ y for _, blk in self._blocks()])
        out = torch.zeros(self.in_features, y.shape[1], dtype=torch.float64)
        for start, blk in self._blocks():
            out += blk.T @ y[start : start + blk.shape[0]]
        return out

    def frobenius_norm(self) -> float:
        """||W||_F over the chosen rows."""
        total = 0.0
        for start, blk in self._blocks():
            if self.rows is None:
                total += float(torch.linalg.vector_norm(blk)) ** 2
            elif self.transposed:
                total += float((blk[:, self.rows] ** 2).sum())
            else:
                local = self.rows[(self.rows >= start) & (self.rows < start + blk.shape[0])]
                total += float((blk[local - start] ** 2).sum())
        return total**0.5


def stored_layout(
    shape: tuple[int, ...], out_features: int, in_features: int, fan_in_fan_out: bool
) -> bool:
    """Whether a stored weight of `shape` is Wᵀ (in x out) for a module of out x in.

    The shape decides when it can; a square weight follows the adapter's fan_in_fan_out.
    """
    plain, flipped = (out_features, in_features), (in_features, out_features)
    if tuple(shape) == plain and tuple(shape) == flipped:
        return fan_in_fan_out
    if tuple(shape) == plain:
        return False
    if tuple(shape) == flipped:
        return True
    raise ModelError(
        f"the base weight has shape {tuple(shape)} but the adapter's factors need {plain} "
        f"(or {flipped} for a Conv1D base): is --base the model this adapter was trained on?"
    )
