"""The one atomic writer: whole files or none, the usual file mode, no temporary left behind."""

from __future__ import annotations

import json
import os
import stat
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from lora_dist.atomic import write_atomic, write_json_atomic, write_jsonl_atomic


def test_a_failed_write_leaves_the_old_file_and_no_temporary(tmp_path: Path) -> None:
    target = tmp_path / "metrics.json"
    write_json_atomic(target, {"step": 1})

    def half_then_crash(tmp: Path) -> None:
        tmp.write_text('{"step": 2, "half')
        raise RuntimeError("disk full")

    with pytest.raises(RuntimeError, match="disk full"):
        write_atomic(target, half_then_crash)
    assert json.loads(target.read_text()) == {"step": 1}
    assert sorted(p.name for p in tmp_path.iterdir()) == ["metrics.json"]


def test_files_get_the_umask_mode_even_from_safetensors(tmp_path: Path) -> None:
    old = os.umask(0o022)
    try:
        path = write_atomic(
            tmp_path / "w.safetensors", lambda p: save_file({"x": torch.ones(2)}, str(p))
        )
    finally:
        os.umask(old)
    assert stat.S_IMODE(path.stat().st_mode) == 0o644  # safetensors alone makes 0600
    assert torch.equal(load_file(str(path))["x"], torch.ones(2))


def test_json_and_jsonl_round_trip(tmp_path: Path) -> None:
    payload = {"b": [1, 2], "a": "ü"}
    write_json_atomic(tmp_path / "sorted.json", payload)
    write_json_atomic(tmp_path / "kept.json", payload, sort_keys=False)
    assert (tmp_path / "sorted.json").read_text().index('"a"') < (
        tmp_path / "sorted.json"
    ).read_text().index('"b"')
    assert json.loads((tmp_path / "kept.json").read_text()) == payload
    records = [{"prediction": "SELECT ü"}, {"prediction": ""}]
    write_jsonl_atomic(tmp_path / "p.jsonl", records)
    lines = (tmp_path / "p.jsonl").read_text(encoding="utf-8").splitlines()
    assert [json.loads(line) for line in lines] == records and "ü" in lines[0]
