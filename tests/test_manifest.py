"""Checksummed manifests: any changed, truncated or missing file is reported by name."""

from __future__ import annotations

import hashlib
from pathlib import Path

from lora_dist.manifest import MANIFEST_NAME, read_manifest, verify_manifest, write_manifest


def _tree(root: Path) -> None:
    (root / "adapter").mkdir(parents=True)
    (root / "adapter" / "w.bin").write_bytes(bytes(range(256)) * 4)
    (root / "state.json").write_text('{"step": 3}')


def test_manifest_lists_every_file_with_its_sha256(tmp_path: Path) -> None:
    _tree(tmp_path)
    write_manifest(tmp_path, {"step": 3})
    manifest = read_manifest(tmp_path)
    assert manifest["step"] == 3 and set(manifest["files"]) == {"adapter/w.bin", "state.json"}
    data = (tmp_path / "adapter" / "w.bin").read_bytes()
    assert manifest["files"]["adapter/w.bin"] == {
        "sha256": hashlib.sha256(data).hexdigest(),
        "bytes": len(data),
    }
    assert verify_manifest(tmp_path) == []


def test_damage_is_named(tmp_path: Path) -> None:
    _tree(tmp_path)
    write_manifest(tmp_path)
    weights = tmp_path / "adapter" / "w.bin"
    flipped = bytearray(weights.read_bytes())
    flipped[7] ^= 1
    weights.write_bytes(bytes(flipped))
    assert verify_manifest(tmp_path) == ["adapter/w.bin fails its SHA-256 checksum"]
    weights.write_bytes(bytes(flipped[:-1]))
    assert verify_manifest(tmp_path) == ["adapter/w.bin has 1023 bytes, expected 1024"]
    (tmp_path / "state.json").unlink()
    assert "state.json is missing" in verify_manifest(tmp_path)
    (tmp_path / MANIFEST_NAME).write_text("{")
    assert verify_manifest(tmp_path)[0].startswith(f"{MANIFEST_NAME} is unreadable")
    (tmp_path / MANIFEST_NAME).unlink()
    assert verify_manifest(tmp_path) == [f"{MANIFEST_NAME} is missing"]
