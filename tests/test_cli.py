"""Every command: help for every flag, and a bad value is one line on stderr and exit code 2.

The bad values are refused before anything loads: no process group is ever started here, and
no model is read.
"""

from __future__ import annotations

import dataclasses
import importlib
import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch.distributed as dist

from lora_dist import cli
from lora_dist.settings import attribute_docs
from tests import runs


def _modules(table: dict, prefix: str = "") -> dict[str, str]:
    """{"train": module, "analyze spectrum": module, ...}: groups become two-word commands."""
    out = {}
    for name, target in table.items():
        if isinstance(target, dict):
            out.update(_modules(target, f"{prefix}{name} "))
        else:
            out[f"{prefix}{name}"] = target
    return out


MODULES = _modules(cli.COMMANDS)
COMMANDS = sorted(MODULES)


def options_of(command: str) -> type:
    return importlib.import_module(MODULES[command]).OPTIONS


@pytest.mark.parametrize("command", COMMANDS)
def test_help_shows_every_flag_with_its_text(command, capsys, monkeypatch) -> None:
    monkeypatch.setenv("COLUMNS", "1000")  # one line per flag
    with pytest.raises(SystemExit) as stop:
        cli.main([*command.split(), "--help"])
    assert stop.value.code == 0
    text = " ".join(capsys.readouterr().out.split())
    docs = attribute_docs(options_of(command))
    for f in dataclasses.fields(options_of(command)):
        positional = f.metadata.get("metavar") or f.name
        name = positional if f.metadata.get("positional") else f"--{f.name}"
        assert f"{name} " in text or text.endswith(name), f"{command}: {name} missing"
        assert docs[f.name] in text, f"{command} {name}: no help text"
    assert "--local_rank" not in text  # launchers' flag is accepted, not advertised


def _file(tmp_path: Path) -> str:
    path = tmp_path / "a_file"
    path.write_text("x")
    return str(path)


def _bad_json(tmp_path: Path) -> str:
    path = tmp_path / "ds.json"
    path.write_text('{"train_batch_size": 16,,}')
    return str(path)


# (command and flags, a fragment of the one error line). `{file}` is an existing file,
# `{missing}` a path that does not exist, `{bad_json}` a file that is not JSON.
BAD = [
    ("train --lr_schedule cosin", "invalid choice: 'cosin'"),
    ("train --lora_r 0", "--lora_r must be at least 1"),
    ("train --lora_r eight", "invalid int value: 'eight'"),
    ("train --lora_alpha 0", "--lora_alpha must be greater than 0"),
    ("train --lora_dropout 1", "--lora_dropout must be less than 1"),
    ("train --lora_targets ,", "names no module"),
    ("train --lora_targets re:(", "not a valid regex"),
    ("train --epochs 0", "--epochs must be greater than 0"),
    ("train --max_steps 0", "--max_steps must be at least 1"),
    ("train --lr=-1e-4", "--lr must be greater than 0"),
    ("train --warmup_steps -1", "--warmup_steps must be at least 0"),
    ("train --seed -1", "--seed must be at least 0"),
    ("train --max_length 1", "--max_length must be at least 2"),
    ("train --eval_every 0", "--eval_every must be at least 1"),
    ("train --task_eval_every 0", "--task_eval_every must be at least 1"),
    ("train --eval_max_new_tokens 0", "--eval_max_new_tokens must be at least 1"),
    ("train --eval_batch_size 0", "--eval_batch_size must be at least 1"),
    ("train --eval_limit 0", "--eval_limit must be at least 1"),
    ("train --save_every 0", "--save_every must be at least 1"),
    ("train --keep_last 0", "--keep_last must be at least 1"),
    ("train --host_mmap_threshold -1", "--host_mmap_threshold must be at least 0"),
    ("train --task sqlwiki", "--task 'sqlwiki' is not one of"),
    ("train --ds_config {missing}", "does not exist"),
    ("train --data {missing}", "--data"),
    ("train --data {file}", "is a file"),
    ("train --output_dir {file}", "--output_dir"),
    ("train --output_dir {file}/run", "lies under the file"),
    ("train --resume {missing}", "not a checkpoint directory"),
    ("train --full_finetune --save_every 2", "--full_finetune"),
    ("train --dev_fraction 0", "--dev_fraction must be greater than 0"),
    ("train --dev_fraction 1", "--dev_fraction must be less than 1"),
    ("train --data_format chatml", "invalid choice: 'chatml'"),
    ("train --overlong cut", "invalid choice: 'cut'"),
    ("train --chat_template {missing}", "--chat_template"),
    ("train --dev_data {file}", "--dev_data"),
    ("train --no_such_flag 1", "unrecognized arguments"),
    ("plan --model gpt4", "llama-2-70b"),
    ("plan", "--model is required"),
    ("plan --model gpt3-175b --nodes 0", "--nodes must be at least 1"),
    ("plan --model gpt3-175b --gpus_per_node 0", "--gpus_per_node must be at least 1"),
    ("plan --model gpt3-175b --tp 0", "--tp must be at least 1"),
    ("plan --model gpt3-175b --zero 5", "--zero must be"),
    ("plan --model gpt3-175b --offload disk", "invalid choice: 'disk'"),
    ("plan --model gpt3-175b --dtype fp8", "invalid choice: 'fp8'"),
    ("plan --model gpt3-175b --lora_dtype fp8", "invalid choice: 'fp8'"),
    ("plan --model gpt3-175b --optim_dtype int8", "invalid choice: 'int8'"),
    ("plan --model gpt3-175b -r 0", "--lora_r must be at least 1"),
    ("plan --model gpt3-175b --lora_targets q,gate", "comma list of"),
    ("plan --model gpt3-175b --micro_batch 0", "--micro_batch must be at least 1"),
    ("plan --model gpt3-175b --max_length 0", "--max_length must be at least 1"),
    ("plan --model gpt3-175b --gpu_gib 0", "--gpu_gib must be greater than 0"),
    ("plan --model gpt3-175b --device tpu", "invalid choice: 'tpu'"),
    ("plan --model gpt3-175b --overhead_gib -1", "--overhead_gib must be at least 0"),
    ("plan --model gpt3-175b --ds_config {missing}", "does not exist"),
    ("plan --model gpt3-175b --ds_config {bad_json}", "not valid JSON"),
    ("plan --model {file}", "config.json"),
    ("merge --adapter {missing} --model {missing} --output_dir {missing}", "--model"),
    ("merge --model {tmp} --adapter {missing} --output_dir {missing}", "--adapter"),
    ("merge --model {tmp} --adapter {tmp} --output_dir {file}", "--output_dir"),
    ("merge --model {tmp} --adapter {tmp}", "--output_dir is required"),
    ("merge --model {tmp} --adapter {tmp} --output_dir {missing} --dtype fp8", "fp8"),
    ("merge --model {tmp} --adapter {tmp} --output_dir {missing} --max_shard_size 2XB", "2XB"),
    ("merge --model {tmp} --adapter {tmp} --output_dir {missing}", "adapter_config.json"),
    ("inspect {missing}", "does not exist"),
    ("inspect {tmp}", "adapter_config.json"),
    ("eval --limit 0", "--limit must be at least 1"),
    ("eval --batch_size 0", "--batch_size must be at least 1"),
    ("eval --max_new_tokens 0", "--max_new_tokens must be at least 1"),
    ("eval --task sqlwiki", "--task 'sqlwiki' is not one of"),
    ("eval --merged", "--merged needs --adapter"),
    ("eval --adapter {missing}", "--adapter"),
    ("eval --data {missing}", "--data"),
    ("eval --ds_config {missing}", "--ds_config"),
    ("eval --output_dir {file}", "--output_dir"),
    ("eval --split test", "file not found"),
    ("eval --data_format chatml", "invalid choice: 'chatml'"),
    ("eval --chat_template {missing}", "--chat_template"),
    ("import-gguf {missing} {tmp}/out", "missing"),
    ("import-gguf {file} {tmp}/out --dtype fp8", "invalid choice: 'fp8'"),
    ("import-gguf {file}", "OUT_DIR"),
    ("analyze spectrum {missing}", "ADAPTER /"),
    ("analyze spectrum {tmp} --output_dir {file}", "--output_dir"),
    ("analyze similarity {tmp}", "ADAPTER_2"),
    ("analyze similarity {tmp} {missing}", "ADAPTER_2 /"),
    ("analyze similarity {tmp} {tmp} --factor C", "invalid choice: 'C'"),
    ("analyze similarity {tmp} {tmp} --layers one", "invalid int value: 'one'"),
    ("analyze similarity {tmp} {tmp} --seed -1", "--seed must be at least 0"),
    ("analyze amplification {missing}", "ADAPTER /"),
    ("analyze amplification {tmp} --model {missing}", "--model"),
    ("analyze amplification {tmp} --top 0", "--top must be at least 1"),
    ("analyze amplification {tmp} --tol 0", "--tol must be greater than 0"),
    ("analyze amplification {tmp} --max_iters 0", "--max_iters must be at least 1"),
    ("generate --input {file}", "--output is required"),
    ("generate --output {tmp}/o --input {missing}", "--input"),
    ("generate --input {file} --output {tmp}", "--output"),
    ("generate --input {file} --output {file}/o", "lies under the file"),
    ("generate --input {file} --output {tmp}/o --model {missing}", "--model"),
    ("generate --input {file} --output {tmp}/o --model {tmp}", "config.json"),
    ("generate --input {file} --output {tmp}/o --adapter sql", "NAME=DIR"),
    ("generate --input {file} --output {tmp}/o --adapter sql={missing}", "--adapter sql="),
    ("generate --input {file} --output {tmp}/o --max_tokens 0", "--max_tokens must be at least 1"),
    ("generate --input {file} --output {tmp}/o --temperature -1", "--temperature must be at"),
    ("generate --input {file} --output {tmp}/o --max_batch_size 0", "--max_batch_size must be"),
    ("generate --input {file} --output {tmp}/o --dtype fp8", "invalid choice: 'fp8'"),
    ("serve --port 65536", "--port must be less than 65536"),
    ("serve --port -1", "--port must be at least 0"),
    ("serve --model {missing}", "--model"),
    ("serve --adapter sql={tmp} --adapter sql={tmp}", "given twice"),
    ("serve --adapter sql={file}", "is a file"),
    ("serve --adapter ={tmp}", "NAME=DIR"),
    ("serve --lora_root {missing}", "--lora_root"),
    ("serve --max_adapters 0", "--max_adapters must be at least 1"),
    ("serve --max_model_len 0", "--max_model_len must be at least 1"),
    ("serve --max_tokens_limit 0", "--max_tokens_limit must be at least 1"),
    ("serve --max_waiting 0", "--max_waiting must be at least 1"),
    ("serve --max_body_bytes 0", "--max_body_bytes must be at least 1"),
    ("serve --dtype fp8", "invalid choice: 'fp8'"),
    ("serve --log_level loud", "invalid choice: 'loud'"),
]


@pytest.mark.parametrize(("argv", "fragment"), BAD, ids=[a for a, _ in BAD])
def test_a_bad_value_is_one_line_and_exit_2(argv, fragment, tmp_path, capsys) -> None:
    names = {"file": _file(tmp_path), "missing": str(tmp_path / "missing"), "tmp": str(tmp_path)}
    names["bad_json"] = _bad_json(tmp_path)
    args = [a.format(**names) for a in argv.split()]
    try:
        code = cli.main(args)
    except SystemExit as stop:  # argparse's own errors
        code = stop.code
    err = capsys.readouterr().err
    assert code == 2
    lines = err.strip().splitlines()
    assert len(lines) == 1, err
    command = " ".join(args[:2] if isinstance(cli.COMMANDS[args[0]], dict) else args[:1])
    assert lines[0].startswith(f"lora-dist {command}: error: ") and fragment in lines[0], lines[0]
    assert not dist.is_initialized()  # refused before any process group (or model) was set up


def test_the_launcher_refuses_like_lora_dist_train(tmp_path, capsys) -> None:
    """launcher/train.py is `lora-dist train`: the same line, the same exit code, at once."""
    argv = ["--lora_r", "0", "--output_dir", str(tmp_path / "run")]
    launcher = [sys.executable, str(runs.REPO / "launcher" / "train.py"), *argv]
    done = subprocess.run(
        launcher, cwd=runs.REPO, env=runs.run_env(), capture_output=True, text=True
    )
    assert cli.main(["train", *argv]) == 2
    assert done.returncode == 2 and done.stderr == capsys.readouterr().err
    assert done.stderr == "lora-dist train: error: --lora_r must be at least 1, got 0\n"
    assert not (tmp_path / "run").exists()


def test_debug_shows_the_traceback(tmp_path, capsys, monkeypatch) -> None:
    argv = ["plan", "--model", "gpt3-175b", "--ds_config", _bad_json(tmp_path)]
    assert cli.main(argv) == 2
    assert "Traceback" not in capsys.readouterr().err
    monkeypatch.setenv("LORA_DIST_DEBUG", "1")
    assert cli.main(argv) == 2
    err = capsys.readouterr().err
    assert "Traceback" in err and err.strip().splitlines()[-1].startswith("lora-dist plan: error:")


def test_old_spellings_still_work(capsys) -> None:
    """plan's flags before the one spelling: --lora-r, -r, --targets, --gpus-per-node, --seq-len."""
    new = ["--model", "llama-2-7b", "--lora_r", "4", "--lora_targets", "attn-all", "--json"]
    new += ["--gpus_per_node", "4", "--max_length", "512", "--no_activation_checkpointing"]
    old = ["--model", "llama-2-7b", "--lora-r", "4", "--targets", "attn-all", "--json"]
    old += ["--gpus-per-node", "4", "--seq-len", "512", "--no-checkpointing"]
    plans = []
    for argv in (new, old, [*old[:2], "-r", "4", *old[4:]]):
        assert cli.main(["plan", *argv]) == 0
        plans.append(json.loads(capsys.readouterr().out))
    assert plans[0] == plans[1] == plans[2]
    assert plans[0]["run"]["seq_len"] == 512 and plans[0]["run"]["checkpointing"] is False
