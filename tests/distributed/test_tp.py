"""Tensor parallelism with LoRA: AutoTP-sharded bases, whole LoRA factors, TP runs = TP=1 runs."""

import json
import subprocess
import sys

import pytest
import torch
from peft import PeftModel
from torch import nn
from transformers import AutoModelForCausalLM, AutoTokenizer

from lora_dist.data import collate, tokenize_split
from lora_dist.distributed.ds_config import batch_layout, load_ds_config, tp_size
from lora_dist.distributed.tp import (
    register_tp_linear_types,
    shard_base_for_tp,
    tp_lora_factory,
    zero_init_config,
)
from lora_dist.inject import LINEAR_TYPES
from lora_dist.lora import LoraConfig, LoraLinear
from lora_dist.models import resolve_model_dir
from lora_dist.tasks import get_task
from tests import runs
from tests.runs import TrainedRun

CONFIGS = runs.REPO / "ds_configs"
STEPS = 20
MAX_LENGTH = 64  # short sequences keep the CPU runs fast; the layout is what is under test


# -- single process -------------------------------------------------------------------------------
def test_tp2_config_is_zero3_plus_autotp():
    zero3 = load_ds_config(CONFIGS / "zero3.json")
    tp2 = load_ds_config(CONFIGS / "zero3_tp2.json")
    assert tp2.pop("tensor_parallel") == {"autotp_size": 2}
    assert tp2 == zero3


def test_tp8_config_follows_the_paper_setup():
    cfg = load_ds_config(CONFIGS / "zero3_tp8.json")
    assert tp_size(cfg) == 8 and cfg["zero_optimization"]["stage"] == 3
    assert cfg["bf16"]["enabled"] and not cfg["fp16"]["enabled"]
    assert cfg["optimizer"]["type"] == "AdamW"
    assert cfg["optimizer"]["params"]["lr"] == 2e-4
    assert cfg["optimizer"]["params"]["weight_decay"] == 0.1
    assert cfg["train_batch_size"] == 128 and cfg["gradient_clipping"] == 1.0
    assert cfg["tensorboard"]["enabled"]
    # Micro-batch 8, from `lora-dist plan`: on 2 nodes (DP 2) the cross-node all-gathers per
    # micro-batch then cost less than its compute (see slurm/gpt3_wikisql.sh).
    layout = batch_layout(cfg, world_size=16)
    assert (layout.dp, layout.tp, layout.micro_batch, layout.grad_accum) == (2, 8, 8, 8)


def test_zero_init_config_states_the_batch_for_the_whole_world():
    tp2 = load_ds_config(CONFIGS / "zero3_tp2.json")
    loading = zero_init_config(tp2)
    assert "train_batch_size" not in loading and "gradient_accumulation_steps" not in loading
    assert tp_size(loading) == 1
    assert loading["zero_optimization"] == tp2["zero_optimization"]
    assert "train_batch_size" in tp2  # the caller's config is left alone
    zero3 = load_ds_config(CONFIGS / "zero3.json")
    assert zero_init_config(zero3) is zero3


def test_without_tp_nothing_is_sharded_and_layers_are_plain_lora():
    model = nn.Sequential(nn.Linear(4, 4))
    assert shard_base_for_tp(model, {"zero_optimization": {"stage": 3}}) is None
    layer = tp_lora_factory(model[0], LoraConfig(r=2))
    assert type(layer) is LoraLinear


def test_autotp_linears_become_lora_targets():
    from deepspeed.module_inject.layers import LinearAllreduce, LinearLayer

    register_tp_linear_types()
    register_tp_linear_types()  # idempotent
    assert LINEAR_TYPES.count(LinearLayer) == 1 and LINEAR_TYPES.count(LinearAllreduce) == 1


# -- multi-rank -----------------------------------------------------------------------------------
@pytest.mark.multirank
def test_lora_on_sharded_base_matches_unsharded_reference(tmp_path):
    """Forward, loss and every LoRA gradient on a TP=2 base equal plain LoRA, in float64."""
    out = tmp_path / "probe.json"
    cmd = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--nproc_per_node",
        "2",
        "--master_port",
        str(runs.free_port()),
        str(runs.REPO / "tests" / "tp_probe.py"),
        str(out),
    ]
    done = subprocess.run(
        cmd, cwd=runs.REPO, env=runs.run_env(), capture_output=True, text=True, timeout=300
    )
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    r = json.loads(out.read_text())
    assert r["tp_world"] == 2 and r["same_init"]
    assert r["base_kinds"] == ["LinearAllreduce", "LinearLayer"]
    assert r["kinds"] == ["ColumnParallelLoraLinear", "RowParallelLoraLinear"]
    assert r["logits_err"] < 1e-10 and r["loss_err"] < 1e-12
    assert r["grad_scale"] > 1e-3  # gradients are not trivially zero
    assert r["grad_err"] < 1e-10 * max(1.0, r["grad_scale"])
    assert r["grads_bit_identical"] and r["factors_bit_identical"]
    assert r["merge_err"] < 1e-5  # LoraLinear.merge adds in float32


def assert_adapters_agree(a2: dict, a1: dict) -> None:
    """Same keys and shapes, and every value equal to 1e-5 (fp32 summation-order noise)."""
    assert {k: v.shape for k, v in a1.items()} == {k: v.shape for k, v in a2.items()}
    diff = torch.cat([(a2[k] - a1[k]).flatten() for k in a1]).abs()
    assert diff.max() < 1e-5, diff.max()


# The paper's LoRA learning rate (and zero3_tp8.json's). Sharded matmuls sum in another order
# than unsharded ones (relative error ~1e-7, see the losses), and Adam divides each gradient by
# its own running size, so an element whose gradient is at eps scale can take a different step
# of up to ~lr/40. At our small-model default (2e-3, ten times this) 4 of 39,424 elements
# differed by up to 4.8e-5 after 20 steps; at 2e-4 the largest difference is 5.6e-7.
LR = 2e-4


def _train(tmp_path_factory, name: str, ranks: int, config: str, steps: int):
    """A run with the shipped config's settings and a small global batch (4 = 2 x accum x DP)."""
    out = tmp_path_factory.mktemp(name)
    cfg = load_ds_config(CONFIGS / config)
    cfg.update(train_batch_size=4, train_micro_batch_size_per_gpu=2)
    cfg["bf16"] = {"enabled": False}  # fp32: TP and TP=1 runs agree to 1e-5 (bf16: 1e-2)
    cfg["optimizer"]["params"]["lr"] = LR
    (out / "ds.json").write_text(json.dumps(cfg))
    proc = runs.train(
        ranks,
        *("--ds_config", str(out / "ds.json"), "--output_dir", str(out)),
        *("--max_steps", str(steps), "--max_length", str(MAX_LENGTH), "--eval_every", str(steps)),
        *("--lora_targets", "all", "--lora_r", "4", "--skip_task_eval"),
    )
    return out, proc


@pytest.fixture(scope="module")
def tp1_run(tmp_path_factory):
    return _train(tmp_path_factory, "tp1", 1, "zero3.json", STEPS)[0]


@pytest.fixture(scope="module")
def tp2_run(tmp_path_factory):
    return _train(tmp_path_factory, "tp2", 2, "zero3_tp2.json", STEPS)


@pytest.mark.multirank
def test_tp2_loss_curve_matches_tp1(tp1_run, tp2_run):
    tp2_out, _ = tp2_run
    m1, m2 = TrainedRun(tp1_run).metrics, TrainedRun(tp2_out).metrics
    assert (m2["tp"], m2["dp"], m2["world_size"]) == (2, 1, 2)
    assert m1["global_batch"] == m2["global_batch"]
    l1, l2 = TrainedRun(tp1_run).train_losses, TrainedRun(tp2_out).train_losses
    assert sorted(l1) == sorted(l2) == list(range(1, STEPS + 1))
    for step in l1:
        assert l2[step] == pytest.approx(l1[step], rel=1e-4), step
    assert m2["dev_loss"] == pytest.approx(m1["dev_loss"], rel=1e-4)
    assert l1[STEPS] < l1[1] - 0.1  # it trained, so the comparison means something


@pytest.mark.multirank
def test_tp2_adapter_equals_tp1_adapter(tp1_run, tp2_run):
    a1, a2 = TrainedRun(tp1_run).adapter(), TrainedRun(tp2_run[0]).adapter()
    assert_adapters_agree(a2, a1)
    assert max(v.abs().max().item() for k, v in a1.items() if "lora_B" in k) > 1e-3
    c1 = json.loads((tp1_run / "adapter" / "adapter_config.json").read_text())
    c2 = json.loads((tp2_run[0] / "adapter" / "adapter_config.json").read_text())
    assert c1 == c2


@pytest.mark.multirank
def test_tp2_lora_factors_bit_identical_on_tp_ranks(tp2_run):
    # The trainer all-gathers every factor over the TP group before saving and fails otherwise.
    _, proc = tp2_run
    assert "bit-identical on all 2 TP ranks" in proc.stdout + proc.stderr


@pytest.mark.multirank
def test_tp2_each_rank_holds_half_the_base(tp1_run, tp2_run):
    m1, m2 = TrainedRun(tp1_run).metrics, TrainedRun(tp2_run[0]).metrics
    frozen = m1["frozen_param_numel_per_rank"][0]  # one rank holds everything
    assert frozen == m1["total_params"] - m1["trainable_params"]
    for held in m2["frozen_param_numel_per_rank"]:
        assert abs(held - frozen / 2) / frozen < 0.02, m2["frozen_param_numel_per_rank"]


def _dev_loss(model, tokenizer) -> float:
    """Token-weighted dev loss, computed here independently of the trainer's loop."""
    task = get_task("wikisql")
    dev = tokenize_split(task, task.sample_dir(), "dev", tokenizer, MAX_LENGTH)
    total = count = 0.0
    with torch.no_grad():
        for i in range(0, len(dev), 4):
            batch = collate([dev[j] for j in range(i, min(i + 4, len(dev)))], 0)
            tokens = float((batch["labels"][:, 1:] != -100).sum())
            total += model(**batch).loss.item() * tokens
            count += tokens
    return total / count


@pytest.mark.multirank
def test_tp2_adapter_loads_in_peft_on_the_unsharded_base(tp2_run):
    base_dir = resolve_model_dir("tiny", runs.CACHE)
    tokenizer = AutoTokenizer.from_pretrained(base_dir)
    base = AutoModelForCausalLM.from_pretrained(base_dir, dtype=torch.float32)
    model = PeftModel.from_pretrained(base, tp2_run[0] / "adapter").eval()
    assert _dev_loss(model, tokenizer) == pytest.approx(
        TrainedRun(tp2_run[0]).metrics["dev_loss"], rel=1e-4
    )


@pytest.mark.multirank
def test_tp2_dp2_matches_tp1_dp2(tmp_path_factory):
    """4 ranks (TP 2 x DP 2) against 2 ranks (DP 2): the same global batch and losses."""
    steps = STEPS
    tp1, _ = _train(tmp_path_factory, "tp1dp2", 2, "zero3.json", steps)
    tp2, _ = _train(tmp_path_factory, "tp2dp2", 4, "zero3_tp2.json", steps)
    m1, m2 = TrainedRun(tp1).metrics, TrainedRun(tp2).metrics
    assert (m2["tp"], m2["dp"]) == (2, 2) and (m1["tp"], m1["dp"]) == (1, 2)
    l1, l2 = TrainedRun(tp1).train_losses, TrainedRun(tp2).train_losses
    for step in l1:
        assert l2[step] == pytest.approx(l1[step], rel=1e-4), step
    assert_adapters_agree(TrainedRun(tp2).adapter(), TrainedRun(tp1).adapter())
    frozen = m1["total_params"] - m1["trainable_params"]
    for held in m2["frozen_param_numel_per_rank"]:  # 1/(TP x DP) of the base each
        assert abs(held - frozen / 4) / frozen < 0.02, m2["frozen_param_numel_per_rank"]
