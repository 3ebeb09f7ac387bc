"""Checkpoints on disk: atomic, pointed to by `latest`, pruned, found again past damage."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from lora_dist.errors import CheckpointError
from lora_dist.training.checkpoint_files import (
    CHECKPOINTS,
    LATEST,
    base_fingerprint,
    check_compatible,
    find_checkpoint,
    step_dirs,
    write_checkpoint,
)

IDENTITY = {"base": {"config_sha256": "c", "weights_index_sha256": "w"}, "lora": {"r": 8}}


def _write(out: Path, step: int, keep_last: int = 2) -> Path:
    def contents(tmp: Path) -> None:
        (tmp / "adapter").mkdir()
        (tmp / "adapter" / "w.bin").write_bytes(bytes([step]) * 64)
        (tmp / "trainer_state.json").write_text(json.dumps({"step": step}))

    return write_checkpoint(out, step, contents, IDENTITY, keep_last)


def test_write_points_latest_at_the_newest_and_prunes(tmp_path: Path) -> None:
    for step in (2, 4, 6):
        path = _write(tmp_path, step)
    root = tmp_path / CHECKPOINTS
    assert path == root / "step-6"
    assert (root / LATEST).read_text() == "step-6\n"
    assert [s for s, _ in step_dirs(tmp_path)] == [6, 4]  # keep_last=2
    assert sorted(p.name for p in root.iterdir()) == [LATEST, "step-4", "step-6"]  # no temps
    manifest = json.loads((path / "manifest.json").read_text())
    assert manifest["step"] == 6 and manifest["lora"] == {"r": 8}
    assert set(manifest["files"]) == {"adapter/w.bin", "trainer_state.json"}


def test_auto_skips_a_damaged_checkpoint_and_explicit_paths_must_be_intact(tmp_path: Path) -> None:
    _write(tmp_path, 2)
    newest = _write(tmp_path, 4)
    assert find_checkpoint(tmp_path, "auto", print) == newest
    weights = newest / "adapter" / "w.bin"
    weights.write_bytes(b"\x00" + weights.read_bytes()[1:])
    logged: list[str] = []
    with pytest.warns(UserWarning, match="skipping damaged checkpoint"):
        found = find_checkpoint(tmp_path, "auto", logged.append)
    assert found == tmp_path / CHECKPOINTS / "step-2"
    assert "adapter/w.bin fails its SHA-256 checksum" in logged[0]
    with pytest.raises(CheckpointError, match="cannot resume from .*step-4"):
        find_checkpoint(tmp_path, str(newest), print)
    with pytest.raises(CheckpointError, match="does not exist"):
        find_checkpoint(tmp_path, str(tmp_path / "nope"), print)
    assert find_checkpoint(tmp_path / "empty", "auto", print) is None


def test_compatibility_is_the_base_and_the_lora_settings(tmp_path: Path) -> None:
    path = _write(tmp_path, 2)
    assert check_compatible(path, IDENTITY)["step"] == 2
    with pytest.raises(CheckpointError, match="different LoRA settings"):
        check_compatible(path, {**IDENTITY, "lora": {"r": 4}})
    other_base = {**IDENTITY, "base": {"config_sha256": "x", "weights_index_sha256": "w"}}
    with pytest.raises(CheckpointError, match="different base model"):
        check_compatible(path, other_base)
    # A run on user data or with --packing adds its data identity; either side having one and
    # the other not (or another) refuses the resume: the same step would draw other rows.
    packed = {"units": 98, "lengths_sha256": "l", "packs": "p"}
    with pytest.raises(CheckpointError, match="different training data"):
        check_compatible(path, {**IDENTITY, "data": packed})
    data_path = write_checkpoint(
        tmp_path / "d", 2, lambda tmp: None, {**IDENTITY, "data": packed}, 2
    )
    assert check_compatible(data_path, {**IDENTITY, "data": packed})["step"] == 2
    for other in (None, {**packed, "packs": None}):
        expected = {**IDENTITY, "data": other} if other else IDENTITY
        with pytest.raises(CheckpointError, match="different training data"):
            check_compatible(data_path, expected)


def test_base_fingerprint_follows_weights_and_architecture_not_names(tmp_path: Path) -> None:
    config = {"model_type": "llama", "hidden_size": 32, "_name_or_path": "/a", "use_cache": True}
    (tmp_path / "config.json").write_text(json.dumps(config))
    (tmp_path / "model.safetensors").write_bytes(b"0" * 100)
    first = base_fingerprint(tmp_path)
    (tmp_path / "config.json").write_text(json.dumps({**config, "_name_or_path": "/b"}))
    assert base_fingerprint(tmp_path) == first  # a copy elsewhere is the same base
    (tmp_path / "model.safetensors").write_bytes(b"0" * 101)
    assert base_fingerprint(tmp_path)["weights_index_sha256"] != first["weights_index_sha256"]
    (tmp_path / "config.json").write_text(json.dumps({**config, "hidden_size": 64}))
    assert base_fingerprint(tmp_path)["config_sha256"] != first["config_sha256"]
