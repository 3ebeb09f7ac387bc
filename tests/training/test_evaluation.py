"""Evaluation by generation: vs PEFT + HF generate, merged vs unmerged, 2 ranks vs 1."""

from __future__ import annotations

import itertools
import json
import os
import shutil
import socket
import subprocess
import sys
from collections import Counter
from pathlib import Path

import pytest
import torch
from peft import PeftModel
from transformers import AutoModelForCausalLM, AutoTokenizer

from lora_dist.adapter import AdapterError, lora_state_dict, resolve_adapter_dir, save_adapter
from lora_dist.cli import main as cli_main
from lora_dist.data import encode_prompt
from lora_dist.distributed.collective import all_done_fn, gather_objects_to_main
from lora_dist.inject import inject_lora
from lora_dist.lora import LoraConfig
from lora_dist.models import resolve_model_dir
from lora_dist.tasks import get_task
from lora_dist.training.evaluation import (
    DataShard,
    Decoding,
    EvalSplit,
    distinct_prompts,
    evaluate_engine,
    evaluate_task,
)
from tests.tiny_models import randomize_lora_b

REPO = Path(__file__).resolve().parents[2]
WIKISQL = get_task("wikisql")


N_MULTI = 9  # prompts in the multi-rank test
MAX_NEW = 16


def _cache(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return Path(os.environ.get("LORA_DIST_CACHE", tmp_path_factory.mktemp("cache")))


@pytest.fixture(scope="module")
def adapter_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A random adapter with non-zero B on every linear layer, inside a run directory."""
    src = resolve_model_dir("tiny", _cache(tmp_path_factory))
    model = AutoModelForCausalLM.from_pretrained(str(src), dtype=torch.float32)
    torch.manual_seed(0)
    cfg = LoraConfig(r=4, alpha=8.0, targets="all")
    report = inject_lora(model, cfg)
    randomize_lora_b(model, seed=3)
    run = tmp_path_factory.mktemp("run")
    state = lora_state_dict(model)
    save_adapter(run / "adapter", state, cfg, report.target_modules, model.config, str(src))
    return run


@pytest.fixture(scope="module")
def base_dir(adapter_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The default model with a second stop token, so that decoding ends at different steps.

    Untrained, it never emits EOS; the stop token is the one the adapter emits on most, but
    not all, of the multi-rank test's prompts, so batches and ranks finish at different steps.
    """
    from lora_dist.adapter import load_adapter

    dst = tmp_path_factory.mktemp("base") / "model"
    shutil.copytree(resolve_model_dir("tiny", _cache(tmp_path_factory)), dst)
    model = AutoModelForCausalLM.from_pretrained(str(dst), dtype=torch.float32)
    load_adapter(model, adapter_dir / "adapter")
    tok = AutoTokenizer.from_pretrained(str(dst))
    rows = WIKISQL.load_split(WIKISQL.sample_dir(), "dev").to_list()[:N_MULTI]
    outputs = []
    for row in rows:
        ids = torch.tensor([encode_prompt(tok, WIKISQL.prompt(row))])
        out = model.generate(ids, max_new_tokens=MAX_NEW, do_sample=False)
        outputs.append(out[0, ids.shape[1] :].tolist())
    counts = Counter(t for seq in outputs for t in set(seq) if t != tok.eos_token_id)
    stop = min(counts, key=lambda t: (counts[t] == len(rows), -counts[t], t))
    steps = {seq.index(stop) if stop in seq else MAX_NEW for seq in outputs}
    assert len(steps) > 2, "the stop token must end sequences at different steps"
    gen_cfg = json.loads((dst / "generation_config.json").read_text())
    gen_cfg["eos_token_id"] = [tok.eos_token_id, stop]
    (dst / "generation_config.json").write_text(json.dumps(gen_cfg))
    return dst


def _eval(out: Path, *flags: str) -> tuple[dict, list[dict]]:
    assert cli_main(["eval", "--output_dir", str(out), *flags]) == 0
    payload = json.loads((out / "eval.json").read_text())
    lines = (out / "predictions.jsonl").read_text().splitlines()
    return payload, [json.loads(line) for line in lines]


def test_distinct_prompts_known_answer() -> None:
    prompts = ["a", "b", "a", "c", "b"]
    assert distinct_prompts(prompts, None) == ([0, 1, 3], [0, 1, 2, 3, 4])
    assert distinct_prompts(prompts, 2) == ([0, 1], [0, 1, 2, 4])


def test_single_process_collectives_are_local() -> None:
    done = all_done_fn()
    assert done(True) is True and done(False) is False
    assert gather_objects_to_main({"x": 1}) == [{"x": 1}]


def test_bare_base_writes_valid_outputs(base_dir: Path, tmp_path: Path) -> None:
    flags = ["--base", str(base_dir), "--limit", "16", "--max_new_tokens", "12"]
    payload, records = _eval(tmp_path, *flags, "--batch_size", "5")
    rows = WIKISQL.load_split(WIKISQL.sample_dir(), "dev").to_list()[:16]
    assert payload["task"] == "wikisql" and payload["split"] == "dev"
    assert payload["adapter"] is None and payload["merged"] is False and payload["n"] == 16
    assert [r["index"] for r in records] == list(range(16))
    assert [r["target"] for r in records] == [WIKISQL.target(r) for r in rows]
    # Scoring the written predictions again must give the written metrics.
    rescored = WIKISQL.score([r["prediction"] for r in records], rows, WIKISQL.sample_dir())
    assert payload["metrics"] == rescored
    assert 0.0 <= payload["metrics"]["execution_accuracy"] <= 1.0


def test_adapter_predictions_match_peft_and_hf_generate(base_dir: Path, adapter_dir: Path) -> None:
    """Reference: PEFT loads the adapter and HF's greedy generate decodes one prompt at a time."""
    tok = AutoTokenizer.from_pretrained(str(base_dir))
    base = AutoModelForCausalLM.from_pretrained(str(base_dir), dtype=torch.float32)
    ours = AutoModelForCausalLM.from_pretrained(str(base_dir), dtype=torch.float32)
    from lora_dist.adapter import load_adapter

    load_adapter(ours, resolve_adapter_dir(adapter_dir))
    split = EvalSplit(WIKISQL, WIKISQL.sample_dir(), "dev", limit=7)
    metrics, records = evaluate_task(ours, tok, split, Decoding(max_new_tokens=10, batch_size=3))
    peft = PeftModel.from_pretrained(base, adapter_dir / "adapter").eval()
    stops = set(peft.generation_config.eos_token_id)
    expected = []
    for rec in records:
        ids = torch.tensor([encode_prompt(tok, rec["prompt"])])
        new = peft.generate(input_ids=ids, max_new_tokens=10, do_sample=False)[0, ids.shape[1] :]
        kept = list(itertools.takewhile(lambda t: t not in stops, new.tolist()))  # stop excluded
        expected.append(tok.decode(kept, skip_special_tokens=True).strip())
    assert [r["prediction"] for r in records] == expected
    assert metrics["n"] == 7.0


def test_merged_equals_unmerged_and_differs_from_base(
    base_dir: Path, adapter_dir: Path, tmp_path: Path
) -> None:
    flags = ["--base", str(base_dir), "--limit", "8", "--max_new_tokens", "10"]
    plain, plain_recs = _eval(tmp_path / "u", *flags, "--adapter", str(adapter_dir))
    merged, merged_recs = _eval(tmp_path / "m", *flags, "--adapter", str(adapter_dir), "--merged")
    _, base_recs = _eval(tmp_path / "b", *flags)
    assert merged["merged"] is True and plain["adapter"] == str(adapter_dir / "adapter")
    assert [r["prediction"] for r in merged_recs] == [r["prediction"] for r in plain_recs]
    assert merged["metrics"] == plain["metrics"]
    assert [r["prediction"] for r in base_recs] != [r["prediction"] for r in plain_recs]


def test_adapter_dir_resolution(adapter_dir: Path, tmp_path: Path) -> None:
    assert resolve_adapter_dir(adapter_dir) == adapter_dir / "adapter"
    assert resolve_adapter_dir(adapter_dir / "adapter") == adapter_dir / "adapter"
    with pytest.raises(AdapterError, match="adapter/"):
        resolve_adapter_dir(tmp_path)


def test_e2e_generates_once_per_meaning_representation(base_dir: Path, tmp_path: Path) -> None:
    e2e = get_task("e2e")
    tok = AutoTokenizer.from_pretrained(str(base_dir))
    model = AutoModelForCausalLM.from_pretrained(str(base_dir), dtype=torch.float32)
    rows = e2e.load_split(e2e.sample_dir(), "dev").to_list()
    first_mrs = list(dict.fromkeys(r["mr"] for r in rows))[:3]
    path = tmp_path / "p.jsonl"
    split = EvalSplit(e2e, e2e.sample_dir(), "dev", limit=3)
    metrics = evaluate_engine(model, tok, split, Decoding(6, 2), DataShard(0, 1), path)
    records = [json.loads(line) for line in path.read_text().splitlines()]
    assert [rows[r["index"]]["mr"] for r in records] == first_mrs
    assert metrics is not None and metrics["n_mrs"] == 3.0
    # Every row of a chosen MR gets its MR's prediction; the task groups them back per MR.
    by_mr = {rows[r["index"]]["mr"]: r["prediction"] for r in records}
    chosen = [r for r in rows if r["mr"] in by_mr]
    assert metrics == e2e.score([by_mr[r["mr"]] for r in chosen], chosen, e2e.sample_dir())


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _launch_two_ranks(entry: list[str], flags: list[str]) -> None:
    env = {**os.environ, "PYTHONPATH": str(REPO), "LORA_DIST_NO_PROGRESS": "1"}
    env["PATH"] = f"{Path(sys.executable).parent}:{env.get('PATH', '')}"
    cmd = ["deepspeed", "--master_port", str(_free_port()), "--num_gpus", "2", *entry, *flags]
    done = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]


@pytest.mark.multirank
@pytest.mark.parametrize(
    "entry,merged",
    [
        (["--no_local_rank", "--module", "lora_dist.cli", "eval"], False),
        (["--module", "lora_dist.commands.eval"], True),
    ],
    ids=["cli-unmerged", "module-merged"],
)
def test_two_ranks_zero3_match_one_rank(
    base_dir: Path, adapter_dir: Path, tmp_path: Path, entry: list[str], merged: bool
) -> None:
    # 9 prompts in batches of 2: rank 0 decodes 5, rank 1 decodes 4 plus one dummy batch.
    flags = ["--base", str(base_dir), "--adapter", str(adapter_dir)]
    flags += ["--limit", str(N_MULTI), "--batch_size", "2", "--max_new_tokens", str(MAX_NEW)]
    one, one_recs = _eval(tmp_path / "one", *flags)
    z3 = ["--ds_config", str(REPO / "tests" / "configs" / "zero3_fp32.json")]
    two_flags = flags + z3 + ["--output_dir", str(tmp_path / "two")] + (["--merged"] * merged)
    _launch_two_ranks(entry, two_flags)
    two = json.loads((tmp_path / "two" / "eval.json").read_text())
    two_recs = [json.loads(x) for x in (tmp_path / "two" / "predictions.jsonl").open()]
    assert two["world_size"] == 2 and two["merged"] is merged
    assert two_recs == one_recs
    assert two["metrics"] == one["metrics"]
