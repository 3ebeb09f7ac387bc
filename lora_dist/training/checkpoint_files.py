"""Adapter-only training checkpoints: atomic, checksummed, found again after a crash.

Layout of `<output_dir>/checkpoints/step-<N>/`:
  adapter/                  the LoRA weights in PEFT format (any checkpoint ships as an adapter)
  optimizer.safetensors     LoRA-only Adam state and fp32 master weights, gathered whole
  rng.safetensors           every rank's torch RNG state (python/numpy states in trainer_state)
  trainer_state.json        step, epoch, samples consumed, LR schedule, world layout
  manifest.json             SHA-256 of every file above, the base model's identity, LoRA config

No frozen base tensor is ever written: the size grows with r, not with the base. A checkpoint
is written into a temporary directory, fsynced, checksummed, then renamed into place; the
`latest` pointer moves only after that, and old checkpoints are pruned only after it moved.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file

from lora_dist.adapter import base_identity, base_weights_digest
from lora_dist.atomic import fsync_dir, write_text_atomic
from lora_dist.errors import CheckpointError
from lora_dist.manifest import read_manifest, verify_manifest, write_manifest

CHECKPOINTS = "checkpoints"
LATEST = "latest"
_STEP_DIR = re.compile(r"^step-(\d+)$")


def base_fingerprint(model_dir: Path) -> dict[str, str]:
    """What a checkpoint records of its base: the base identity of config.json and the weights'
    file index (see lora_dist.adapter), so a resume on other weights is refused."""
    config = json.loads((Path(model_dir) / "config.json").read_text())
    return {
        "config_sha256": base_identity(config),
        "weights_index_sha256": base_weights_digest(model_dir),
    }


def step_dirs(output_dir: Path) -> list[tuple[int, Path]]:
    """Complete checkpoint directories, newest first (temporary ones are never listed)."""
    root = Path(output_dir) / CHECKPOINTS
    found = []
    for path in root.glob("step-*") if root.is_dir() else []:
        m = _STEP_DIR.match(path.name)
        if m and path.is_dir():
            found.append((int(m.group(1)), path))
    return sorted(found, reverse=True)


def write_checkpoint(
    output_dir: Path,
    step: int,
    write_contents: Callable[[Path], None],
    manifest_extra: dict[str, Any],
    keep_last: int,
) -> Path:
    """Write one checkpoint atomically (rank 0 only) and prune old ones; returns its path.

    `write_contents(tmp_dir)` writes the files; everything after that is this function's job.
    """
    root = Path(output_dir) / CHECKPOINTS
    root.mkdir(parents=True, exist_ok=True)
    final = root / f"step-{step}"
    tmp = root / f".tmp-step-{step}-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    write_contents(tmp)
    write_manifest(tmp, {"step": step, **manifest_extra})
    fsync_dir(tmp)
    if final.exists():  # a re-run of the same step after a resume: replace it whole
        shutil.rmtree(final)
    os.rename(tmp, final)
    fsync_dir(root)
    write_text_atomic(root / LATEST, final.name + "\n", sync_dir=True)
    for _, old in step_dirs(output_dir)[max(keep_last, 1) :]:
        shutil.rmtree(old, ignore_errors=True)
    return final


def find_checkpoint(output_dir: Path, spec: str, log: Callable[[str], None]) -> Path | None:
    """Resolve `--resume`: 'auto' is the newest intact checkpoint, else the path given.

    Under 'auto' a damaged checkpoint is skipped with a warning in favour of an older one; a
    path given explicitly must be intact or it is an error.
    """
    if spec != "auto":
        path = Path(spec)
        problems = verify_manifest(path) if path.is_dir() else [f"{path} does not exist"]
        if problems:
            raise CheckpointError(f"cannot resume from {path}: {'; '.join(problems)}")
        return path
    candidates = step_dirs(output_dir)
    pointer = Path(output_dir) / CHECKPOINTS / LATEST
    if pointer.is_file():  # the pointer's target first, then anything newer or older
        named = pointer.read_text().strip()
        candidates.sort(key=lambda item: item[1].name != named)
    for _, path in candidates:
        problems = verify_manifest(path)
        if not problems:
            return path
        message = f"skipping damaged checkpoint {path}: {'; '.join(problems)}"
        warnings.warn(message, stacklevel=2)
        log(f"warning: {message}")
    return None


def check_compatible(path: Path, expected: dict[str, Any]) -> dict[str, Any]:
    """Refuse a checkpoint from another base model, other LoRA settings or other training data
    (user data or packing: --data, --max_length, --packing); returns its manifest."""
    manifest = read_manifest(path) or {}
    labels = [("base", "base model"), ("lora", "LoRA settings")]
    if "data" in manifest or "data" in expected:
        labels.append(("data", "training data (--data, --max_length, --packing)"))
    for key, label in labels:
        if manifest.get(key) != expected.get(key):
            raise CheckpointError(
                f"{path} was written for a different {label}: checkpoint has "
                f"{manifest.get(key)}, this run has {expected.get(key)}. Resume with the same "
                f"{label}, or start a fresh run in another --output_dir."
            )
    return manifest


def save_tensors(path: Path, tensors: dict[str, torch.Tensor]) -> None:
    save_file({k: v.detach().cpu().contiguous() for k, v in tensors.items()}, str(path))


def load_tensors(path: Path) -> dict[str, torch.Tensor]:
    return load_file(str(path))
