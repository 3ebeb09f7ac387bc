"""The main job end to end on real DeepSpeed ZeRO-3, 2 CPU ranks; PEFT and TensorBoard read it."""

import math
import shutil

import pytest
import torch
from peft import PeftModel
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
from transformers import AutoModelForCausalLM, AutoTokenizer

from lora_dist.data import collate, tokenize_split
from lora_dist.models import resolve_model_dir
from lora_dist.tasks import get_task
from tests import runs
from tests.runs import TrainedRun

pytestmark = pytest.mark.multirank
STEPS = 8


@pytest.fixture(scope="module")
def lora_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("lora")
    runs.train(
        2,
        "--output_dir",
        str(out),
        "--max_steps",
        str(STEPS),
        "--save_every",
        "4",
        "--eval_limit",
        "12",
        "--eval_max_new_tokens",
        "24",
    )
    return out


def reference_dev_loss(model, tokenizer, micro_batch: int = 4) -> float:
    """Token-weighted dev loss computed here, independently of the trainer's loop."""
    task = get_task("wikisql")
    dev = tokenize_split(task, task.sample_dir(), "dev", tokenizer, 256)
    total = count = 0.0
    with torch.no_grad():
        for i in range(0, len(dev), micro_batch):
            batch = collate([dev[j] for j in range(i, min(i + micro_batch, len(dev)))], 0)
            tokens = float((batch["labels"][:, 1:] != -100).sum())
            total += model(**batch).loss.item() * tokens
            count += tokens
    return total / count


def test_zero3_lora_run_trains_and_shards(lora_run):
    m = TrainedRun(lora_run).metrics
    assert m["steps"] == STEPS and m["world_size"] == 2 and m["zero_stage"] == 3
    frozen_total = m["total_params"] - m["trainable_params"]
    for held in m["frozen_param_numel_per_rank"]:  # each rank holds about half of the base
        assert abs(held - frozen_total / 2) / frozen_total < 0.02, m["frozen_param_numel_per_rank"]
    assert m["trainable_params"] == 16384  # r=8 on q,v of 4 layers of width 128
    train = [loss for _, loss in m["train_losses"]]
    assert sum(train[-2:]) < sum(train[:2]) - 0.1
    assert m["dev_loss"] < m["dev_loss_initial"] - 0.1
    assert abs(m["dev_loss_initial"] - math.log(1024)) < 0.5  # a sane initialisation
    task = m["task_metrics"]  # greedy generation on the dev split, scored at the end
    assert task["n"] == 12 and 0 <= task["execution_accuracy"] <= 1
    assert (lora_run / "eval" / f"predictions_step{STEPS}.jsonl").is_file()


def test_adapter_loads_in_peft_and_reproduces_dev_loss(lora_run):
    base_dir = resolve_model_dir("tiny", runs.CACHE)
    tokenizer = AutoTokenizer.from_pretrained(base_dir)
    base = AutoModelForCausalLM.from_pretrained(base_dir, dtype=torch.float32)
    model = PeftModel.from_pretrained(base, lora_run / "adapter").eval()
    dev = reference_dev_loss(model, tokenizer)
    assert dev == pytest.approx(TrainedRun(lora_run).metrics["dev_loss"], rel=1e-4)


def test_tensorboard_holds_the_scalars(lora_run):
    acc = EventAccumulator(str(lora_run / "tensorboard"))
    acc.Reload()
    tags = set(acc.Tags()["scalars"])
    wanted = {"train/loss", "dev/loss", "lr", "grad_norm", "tokens_per_s", "samples_per_s"}
    wanted |= {"memory/peak_bytes_rank0", "memory/peak_bytes_rank1"}
    assert wanted <= tags, wanted - tags
    assert len(acc.Scalars("train/loss")) == STEPS
    losses = TrainedRun(lora_run).train_losses
    assert [e.value for e in acc.Scalars("train/loss")] == pytest.approx(
        [losses[s] for s in range(1, STEPS + 1)]
    )


def test_checkpoint_holds_no_base_weights(lora_run):
    ckpt = lora_run / "checkpoints" / "step-8"
    size = sum(p.stat().st_size for p in ckpt.rglob("*") if p.is_file())
    base_size = (resolve_model_dir("tiny", runs.CACHE) / "model.safetensors").stat().st_size
    lora_bytes = 16384 * 4
    # adapter + fp32 master + 2 Adam moments: 4 copies of the LoRA factors, plus RNG states and
    # JSON (about 40 kB here); the 4.3 MB base is nowhere in it
    assert 4 * lora_bytes < size < 4 * lora_bytes + 100_000 < base_size / 10


def test_full_finetune_trains_everything_and_holds_more(lora_run, tmp_path):
    runs.train(
        2, "--output_dir", str(tmp_path), "--max_steps", "3", "--full_finetune", "--skip_task_eval"
    )
    full, lora = TrainedRun(tmp_path).metrics, TrainedRun(lora_run).metrics
    assert full["trainable_params"] == full["total_params"]
    assert not (tmp_path / "adapter").exists()
    for f, lo in zip(
        full["model_state_bytes_per_rank"], lora["model_state_bytes_per_rank"], strict=True
    ):
        assert f > 2.5 * lo  # fp32 weights + master + Adam for all params vs for LoRA only
    assert full["train_losses"][-1][1] < full["train_losses"][0][1]


def assert_resumed_exactly(out, reference_out, resumed: dict, reference: dict) -> None:
    """Bit-equal losses and adapter: same data, same RNG, same Adam state and bias correction."""
    assert {step: reference[step] for step in resumed} == resumed
    for key, value in TrainedRun(reference_out).adapter().items():
        assert torch.equal(TrainedRun(out).adapter()[key], value), key


def test_resume_after_sigkill_is_exact(lora_run, tmp_path):
    proc = runs.start(
        2, "--output_dir", str(tmp_path), "--max_steps", str(STEPS), "--save_every", "4"
    )
    latest = tmp_path / "checkpoints" / "latest"
    try:
        runs.wait_for(lambda: latest.is_file(), what="the first checkpoint")
    finally:
        import os
        import signal

        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
    assert latest.read_text().strip() == "step-4"
    runs.train(
        2,
        "--output_dir",
        str(tmp_path),
        "--max_steps",
        str(STEPS),
        "--save_every",
        "4",
        "--resume",
        "auto",
    )
    resumed, reference = TrainedRun(tmp_path).train_losses, TrainedRun(lora_run).train_losses
    assert sorted(resumed) == [5, 6, 7, 8]
    assert_resumed_exactly(tmp_path, lora_run, resumed, reference)


def test_sigterm_checkpoints_and_exits_75_then_resumes_exactly(lora_run, tmp_path):
    import signal

    import psutil

    proc = runs.start(2, "--output_dir", str(tmp_path), "--max_steps", str(STEPS))
    runs.wait_for(lambda: TrainedRun(tmp_path).last_logged_step >= 2, what="two steps")
    ranks = [
        p
        for p in psutil.Process(proc.pid).children(recursive=True)
        if any(arg.startswith("--local_rank") for arg in p.cmdline())
    ]
    assert len(ranks) == 2
    for rank in ranks:  # as Slurm does: every task gets the signal
        rank.send_signal(signal.SIGTERM)
    output, _ = proc.communicate(timeout=300)
    assert proc.returncode == 75, output[-3000:]
    stopped_at = TrainedRun(tmp_path).last_logged_step
    assert (tmp_path / "checkpoints" / f"step-{stopped_at}").is_dir()
    runs.train(
        2,
        "--output_dir",
        str(tmp_path),
        "--max_steps",
        str(STEPS),
        "--resume",
        "auto",
        "--skip_task_eval",
    )
    resumed, reference = TrainedRun(tmp_path).train_losses, TrainedRun(lora_run).train_losses
    assert min(resumed) == stopped_at + 1 and max(resumed) == STEPS
    assert_resumed_exactly(tmp_path, lora_run, resumed, reference)


def test_two_rank_checkpoint_resumes_on_one_rank_past_a_corrupt_one(lora_run, tmp_path):
    shutil.copytree(lora_run / "checkpoints", tmp_path / "checkpoints")
    damaged = tmp_path / "checkpoints" / "step-8" / "optimizer.safetensors"
    data = bytearray(damaged.read_bytes())
    data[-10] ^= 0xFF
    damaged.write_bytes(bytes(data))
    proc = runs.train(
        1, "--output_dir", str(tmp_path), "--max_steps", str(STEPS), "--resume", "auto"
    )
    assert "skipping damaged checkpoint" in proc.stderr and "step-8" in proc.stderr
    m = TrainedRun(tmp_path).metrics
    assert m["resumed_from"].endswith("step-4") and m["world_size"] == 1
    reference = TrainedRun(lora_run).train_losses
    resumed = TrainedRun(tmp_path).train_losses
    for step, loss in resumed.items():  # other reduction order: not bit-exact
        assert loss == pytest.approx(reference[step], rel=1e-4), step


def test_resume_with_other_lora_settings_is_refused(lora_run, tmp_path):
    shutil.copytree(lora_run / "checkpoints", tmp_path / "checkpoints")
    proc = runs.train(
        1, "--output_dir", str(tmp_path), "--resume", "auto", "--lora_r", "4", check=False
    )
    assert proc.returncode != 0
    assert "different LoRA settings" in proc.stderr
