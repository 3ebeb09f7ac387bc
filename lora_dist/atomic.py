"""Writing a file so that a reader sees the old one or the new one, never half of one.

Every file lora-dist writes for others to read (adapters, manifests, metrics, predictions, the
checkpoint `latest` pointer) goes through `write_atomic`: the bytes go to a temporary file beside
the target, are flushed to disk, get the usual file mode, and are renamed over the target.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any


def fsync_dir(path: Path) -> None:
    """Flush a directory's entries (a rename inside it) to disk."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _default_mode() -> int:
    umask = os.umask(0)
    os.umask(umask)
    return 0o666 & ~umask


def write_atomic(path: Path, write: Callable[[Path], None], *, sync_dir: bool = False) -> Path:
    """Call `write(tmp)` to fill a temporary file, then rename it to `path`; returns `path`.

    The file gets the mode the umask allows (safetensors makes 0600 files; what we write is
    meant to be shared) and is fsynced before the rename. With `sync_dir` the rename itself is
    flushed too, for pointers whose loss after a crash would matter.
    """
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    try:
        write(tmp)
        os.chmod(tmp, _default_mode())
        with open(tmp, "rb") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    if sync_dir:
        fsync_dir(path.parent)
    return path


def write_text_atomic(path: Path, text: str, *, sync_dir: bool = False) -> Path:
    """`text` (UTF-8) as the whole content of `path`, written atomically."""
    return write_atomic(path, lambda tmp: tmp.write_text(text, encoding="utf-8"), sync_dir=sync_dir)


def write_json_atomic(path: Path, payload: Any, *, sort_keys: bool = True) -> Path:
    """`payload` as indented JSON with a final newline, written atomically."""
    return write_text_atomic(path, json.dumps(payload, indent=2, sort_keys=sort_keys) + "\n")


def write_jsonl_atomic(path: Path, records: Iterable[dict[str, Any]]) -> Path:
    """One JSON object per line (non-ASCII kept as is), written atomically."""
    lines = "".join(json.dumps(record, ensure_ascii=False) + "\n" for record in records)
    return write_text_atomic(path, lines)
