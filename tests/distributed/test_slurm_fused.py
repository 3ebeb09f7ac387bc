"""`sbatch slurm/gpt3_wikisql.sh` on the local Slurm cluster with a GPT-3-architecture model.

A tiny GPT-2 (GPT-3's architecture: one fused Conv1D `c_attn`) trained by the script as submitted,
TP=2 over 2 ranks under ZeRO-3: only the q and v slices train, the loss falls, and PEFT loads the
adapter as it is.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM

from lora_dist.models.tiny import train_tokenizer
from lora_dist.planning.shapes import lora_param_count, shape_from_hf_config
from tests.distributed.test_slurm import two_tasks
from tests.distributed.test_tp_fused import FAMILIES, VOCAB, assert_peft_loads_as_slices
from tests.runs import REPO, TrainedRun, free_port, launch_env
from tests.slurm_cluster import SlurmCluster

STEPS = 10
LORA_R = 4


@pytest.mark.slurm
@pytest.mark.multirank
def test_gpt3_script_trains_q_v_slices_of_a_fused_gpt2_under_tp2(
    slurm_cluster: SlurmCluster, tmp_path: Path
) -> None:
    model_dir = tmp_path / "gpt2"
    torch.manual_seed(0)
    config = FAMILIES["gpt2"]
    AutoModelForCausalLM.from_config(config).save_pretrained(model_dir)
    train_tokenizer(model_dir, VOCAB, 512)
    # The script's own TP=2 config, in fp32 with a batch this small model trains on quickly.
    ds = json.loads((REPO / "ds_configs/zero3_tp2.json").read_text())
    ds.update(train_batch_size=4, train_micro_batch_size_per_gpu=2)
    ds["bf16"] = {"enabled": False}
    ds["fp16"] = {"enabled": False}
    (tmp_path / "ds.json").write_text(json.dumps(ds))

    out = tmp_path / "run"
    env = launch_env(
        MODEL_DIR=str(model_dir),
        DS_CONFIG=str(tmp_path / "ds.json"),
        OUTPUT_DIR=str(out),
        LORA_R=str(LORA_R),
        LR="1e-2",
        MAX_STEPS=str(STEPS),
        EVAL_EVERY=str(STEPS),
        ACTIVATION_CHECKPOINTING="0",
        EXTRA_ARGS="--max_length 64 --skip_task_eval",
        PYTHON=sys.executable,
        MASTER_PORT=str(free_port()),
    )
    args = [*two_tasks(tmp_path), "--gres=none"]
    job = slurm_cluster.sbatch(REPO / "slurm/gpt3_wikisql.sh", sbatch_args=args, env=env, cwd=REPO)
    assert (job.state, job.returncode, job.restarts) == ("COMPLETED", 0, 0), job.describe()

    run = TrainedRun(out)
    metrics = run.metrics
    assert (metrics["tp"], metrics["dp"], metrics["zero_stage"]) == (2, 1, 3)
    # q and v slices only: the planner's count, which is the paper's 2 x layers x r x (d + d).
    d, layers = config.n_embd, config.n_layer
    shape = shape_from_hf_config(config.to_dict())
    assert metrics["trainable_params"] == lora_param_count(shape, LORA_R, "attn")
    assert metrics["trainable_params"] == layers * 2 * LORA_R * (d + d)
    # The loss falls.
    losses = run.train_losses
    assert sorted(losses) == list(range(1, STEPS + 1))
    assert metrics["dev_loss"] < metrics["dev_loss_initial"]
    assert sum(losses[s] for s in (STEPS - 1, STEPS)) < sum(losses[s] for s in (1, 2))

    # PEFT loads the adapter as it is (one rank-2r LoRA on c_attn) and computes what lora-dist's
    # slice layers compute; k rows of the exported update are zero.
    adapter_config = json.loads((out / "adapter/adapter_config.json").read_text())
    targets = adapter_config["target_modules"]
    assert set([targets] if isinstance(targets, str) else targets) == {"c_attn"}
    peft = assert_peft_loads_as_slices(model_dir, out / "adapter", min_change=1e-4)
    for name, module in peft.named_modules():
        if name.endswith("c_attn") and hasattr(module, "lora_A"):
            delta = module.lora_B["default"].weight @ module.lora_A["default"].weight
            assert delta[d : 2 * d].abs().max() == 0, name  # GPT-2's [Q | K | V]: k untouched
            assert delta[:d].abs().max() > 0 and delta[2 * d :].abs().max() > 0, name
