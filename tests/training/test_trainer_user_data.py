"""The main job on a user's chat JSONL: 2 ranks, ZeRO-3, packing, free-form evaluation; a run
killed with SIGKILL resumes bit-exactly with packing on. (A resume onto other data or packs is
refused by the checkpoint identity: tests/training/test_checkpoint_files.py.)"""

from __future__ import annotations

import json
import math
import os
import signal
from pathlib import Path

import numpy as np
import pytest
import torch

from tests import runs
from tests.runs import TrainedRun

pytestmark = pytest.mark.multirank
STEPS = 6
WORDS = "the cat dog runs fast slow red blue green big small house tree water sun moon".split()


def chat_file(path: Path, rows: int = 240) -> Path:
    """User turns of random words; the assistant answers with the same words sorted."""
    rng = np.random.default_rng(0)
    with open(path, "w") as f:
        for _ in range(rows):
            question = " ".join(rng.choice(WORDS, int(rng.integers(3, 10))))
            answer = " ".join(sorted(question.split()))
            turns = [
                {"role": "user", "content": question},
                {"role": "assistant", "content": answer},
            ]
            f.write(json.dumps({"messages": turns}) + "\n")
    return path


def flags(data: Path, out: Path, *extra: str) -> list[str]:
    """The tiny model has no chat template: the documented plain fallback renders the turns."""
    return [
        "--data", str(data), "--chat_template", "plain", "--packing", "--max_length", "128",
        "--max_steps", str(STEPS), "--save_every", "3", "--eval_limit", "4",
        "--eval_max_new_tokens", "8", "--output_dir", str(out), *extra,
    ]  # fmt: skip


@pytest.fixture(scope="module")
def chats(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return chat_file(tmp_path_factory.mktemp("data") / "chats.jsonl")


@pytest.fixture(scope="module")
def packed_run(chats: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("packed") / "run"
    runs.train(2, *flags(chats, out))
    return out


def test_chat_jsonl_trains_packed_under_zero3(packed_run: Path) -> None:
    m = TrainedRun(packed_run).metrics
    assert m["steps"] == STEPS and m["zero_stage"] == 3 and m["world_size"] == 2
    data = m["data"]
    assert data["format"] == "messages" and data["train"]["rows"] + data["dev"]["rows"] == 240
    assert data["dev"]["rows"] == 12  # --dev_fraction 0.05, seeded
    assert data["units"] == data["packing"]["rows"] < data["train"]["examples"]
    assert m["global_batch"] == 16  # packed rows per step
    assert m["dev_perplexity"] == pytest.approx(math.exp(m["dev_loss"]))
    assert m["dev_loss"] < m["dev_loss_initial"]
    assert set(m["task_metrics"]) == {"exact_match", "rougeL", "n_scored"}
    lines = (packed_run / "eval" / f"generations_step{STEPS}.jsonl").read_text().splitlines()
    records = [json.loads(line) for line in lines]
    assert len(records) == 4 and all(r["reference"] for r in records)
    assert (packed_run / "adapter" / "adapter_model.safetensors").is_file()


def test_resume_after_sigkill_with_packing_is_exact(
    chats: Path, packed_run: Path, tmp_path: Path
) -> None:
    out = tmp_path / "run"
    proc = runs.start(2, *flags(chats, out))
    latest = out / "checkpoints" / "latest"
    try:
        runs.wait_for(lambda: latest.is_file(), what="the first checkpoint")
    finally:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
    assert latest.read_text().strip() == "step-3"
    runs.train(2, *flags(chats, out, "--resume", "auto"))
    resumed, reference = TrainedRun(out).train_losses, TrainedRun(packed_run).train_losses
    assert sorted(resumed) == [4, 5, 6]
    assert {step: reference[step] for step in resumed} == resumed  # bit-exact, not close
    for key, value in TrainedRun(packed_run).adapter().items():
        assert torch.equal(TrainedRun(out).adapter()[key], value), key
