"""Checksummed manifests: a directory's files with their SHA-256, so damage is detected on read."""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import Any

from lora_dist.atomic import write_json_atomic

MANIFEST_NAME = "manifest.json"


def sha256_file(path: Path, chunk: int = 1 << 20) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def write_manifest(directory: Path, extra: dict[str, Any] | None = None) -> dict[str, Any]:
    """Checksum every file under `directory` (the manifest excepted) and write the manifest.

    Files are fsynced before they are hashed, so the manifest never vouches for bytes that
    are still only in the page cache.
    """
    directory = Path(directory)
    files = {}
    for path in sorted(p for p in directory.rglob("*") if p.is_file()):
        rel = path.relative_to(directory).as_posix()
        if rel == MANIFEST_NAME:
            continue
        with open(path, "rb") as f:
            os.fsync(f.fileno())
        files[rel] = {"sha256": sha256_file(path), "bytes": path.stat().st_size}
    manifest = {"format": 1, "files": files, **(extra or {})}
    write_json_atomic(directory / MANIFEST_NAME, manifest)
    return manifest


def read_manifest(directory: Path) -> dict[str, Any] | None:
    path = Path(directory) / MANIFEST_NAME
    if not path.is_file():
        return None
    return json.loads(path.read_text())


def verify_manifest(directory: Path) -> list[str]:
    """Problems found in `directory` against its manifest; an empty list means intact."""
    directory = Path(directory)
    try:
        manifest = read_manifest(directory)
    except (json.JSONDecodeError, OSError) as exc:
        return [f"{MANIFEST_NAME} is unreadable: {exc}"]
    if manifest is None:
        return [f"{MANIFEST_NAME} is missing"]
    problems = []
    for rel, entry in manifest.get("files", {}).items():
        path = directory / rel
        if not path.is_file():
            problems.append(f"{rel} is missing")
        elif path.stat().st_size != entry["bytes"]:
            problems.append(f"{rel} has {path.stat().st_size} bytes, expected {entry['bytes']}")
        elif sha256_file(path) != entry["sha256"]:
            problems.append(f"{rel} fails its SHA-256 checksum")
    return problems
