"""`lora-dist train` by path (launcher/train.py): a mistake is one clear line, not a traceback."""

import json
import shutil
import subprocess
import sys

import pytest

from lora_dist.tasks.wikisql import TASK as WIKISQL
from tests import runs


def run_single(*args: str) -> subprocess.CompletedProcess:
    """`python launcher/train.py ARGS` as one plain process (no launcher)."""
    return subprocess.run(
        [sys.executable, str(runs.REPO / "launcher" / "train.py"), *runs.with_test_model(args)],
        cwd=runs.REPO,
        env=runs.run_env(MASTER_PORT=str(runs.free_port())),
        capture_output=True,
        text=True,
        timeout=300,
    )


def assert_clear_error(proc: subprocess.CompletedProcess, *fragments: str) -> None:
    assert proc.returncode == 2, proc.stderr[-3000:]
    line = [x for x in proc.stderr.splitlines() if x.startswith("lora-dist train: error:")]
    assert line, proc.stderr[-3000:]
    for fragment in fragments:
        assert fragment in line[0], line[0]
    assert "Traceback" not in proc.stderr


def test_missing_model_directory(tmp_path):
    proc = run_single("--model", str(tmp_path / "nope"), "--output_dir", str(tmp_path / "o"))
    assert_clear_error(proc, "nope", "neither a built-in model")


def test_bad_json_config(tmp_path):
    cfg = tmp_path / "ds.json"
    cfg.write_text('{"train_batch_size": 16,,}')
    proc = run_single("--ds_config", str(cfg), "--output_dir", str(tmp_path / "o"))
    assert_clear_error(proc, "ds.json", "not valid JSON", "line 1")


def test_batch_sizes_that_do_not_fit_the_world(tmp_path):
    cfg = json.loads((runs.REPO / "ds_configs" / "zero3.json").read_text())
    cfg["train_micro_batch_size_per_gpu"] = 3
    (tmp_path / "ds.json").write_text(json.dumps(cfg))
    proc = run_single("--ds_config", str(tmp_path / "ds.json"), "--output_dir", str(tmp_path / "o"))
    assert_clear_error(proc, "train_batch_size 16", "micro-batch 3")


@pytest.mark.parametrize("field", ["question", "sql"])
def test_dataset_row_missing_a_field_names_file_and_line(tmp_path, field):
    data = tmp_path / "wikisql"
    shutil.copytree(WIKISQL.sample_dir(), data)
    lines = (data / "dev.jsonl").read_text().splitlines()
    row = json.loads(lines[6])
    del row[field]
    lines[6] = json.dumps(row)
    (data / "dev.jsonl").write_text("\n".join(lines) + "\n")
    proc = run_single("--data", str(data), "--output_dir", str(tmp_path / "o"))
    assert_clear_error(proc, "dev.jsonl", "7")


def test_every_flag_is_documented_in_help(capsys, monkeypatch) -> None:
    from dataclasses import fields

    monkeypatch.setenv("COLUMNS", "1000")  # no wrapping (textwrap also breaks at hyphens)
    from lora_dist.cli import main
    from lora_dist.settings import attribute_docs
    from lora_dist.training.config import TrainConfig

    with pytest.raises(SystemExit) as stop:
        main(["train", "--help"])
    assert stop.value.code == 0
    text = " ".join(capsys.readouterr().out.split())  # argparse wraps lines
    docs = attribute_docs(TrainConfig)
    for f in fields(TrainConfig):
        assert f"--{f.name}" in text
        assert docs[f.name] in text, f.name
    assert "[default: ds_configs/zero3.json]" in text and "[default: 8]" in text  # defaults shown
