"""ZeRO-3 on 2 CPU ranks: streamed sharded loading, LoRA kept whole, frozen base, checkpointing.

The multi-rank tests launch real DeepSpeed ranks; run them under `flock /tmp/multirank.lock`.
"""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from lora_dist.distributed.loading import checkpoint_files
from lora_dist.distributed.zero import gather_lora_state
from lora_dist.inject import inject_lora
from lora_dist.lora import LoraConfig
from tests import runs
from tests import zero3_probe as probe
from tests.runs import TrainedRun

# 4 layers of width 1024 and a 4000-token vocabulary: ~235 MB in fp32, largest tensor ~11.5 MB.
SHAPE = dict(vocab_size=4000, hidden_size=1024, intermediate_size=2816, num_hidden_layers=4)
SHARD = "16MB"


@pytest.fixture(scope="module")
def sharded_model(tmp_path_factory) -> Path:
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    cfg = LlamaConfig(
        **SHAPE,
        num_attention_heads=8,
        num_key_value_heads=8,
        max_position_embeddings=64,
        tie_word_embeddings=False,
    )
    path = tmp_path_factory.mktemp("sharded") / "llama"
    LlamaForCausalLM(cfg).save_pretrained(str(path), max_shard_size=SHARD)
    return path


def test_checkpoint_files_lists_every_shard(sharded_model: Path) -> None:
    index = json.loads((sharded_model / "model.safetensors.index.json").read_text())
    files = checkpoint_files(sharded_model)
    assert len(files) >= 8
    assert {f.name for f in files} == set(index["weight_map"].values())


@pytest.fixture(scope="module")
def probe_run(sharded_model: Path, tmp_path_factory) -> tuple[list[dict], list[dict]]:
    out = tmp_path_factory.mktemp("probe")
    cmd = [str(runs.BIN / "deepspeed"), "--num_gpus", "2", "--master_port", str(runs.free_port())]
    cmd += [str(runs.REPO / "tests" / "zero3_probe.py"), str(sharded_model), str(out), "streamed"]
    proc = subprocess.run(cmd, cwd=runs.REPO, env=runs.run_env(), capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr[-4000:]
    reports = [json.loads((out / f"rank{r}.json").read_text()) for r in (0, 1)]
    factors = [load_file(str(out / f"rank{r}.safetensors")) for r in (0, 1)]
    return reports, factors


def full_fp32_bytes(model_dir: Path) -> int:
    return sum(f.stat().st_size for f in checkpoint_files(model_dir))


@pytest.mark.multirank
def test_streamed_loading_stays_near_one_shard(sharded_model: Path, probe_run) -> None:
    reports, _ = probe_run
    full = full_fp32_bytes(sharded_model)
    for rep in reports:
        load = rep["load"]
        assert load["all_zero3"]
        # Each rank stores half of the elements (up to the padding of odd-sized tensors).
        assert abs(2 * load["local_numel"] - load["total_numel"]) <= 64
        peak = max(load["rss_peak_sampled"], load["maxrss_after"])
        beyond_partition = peak - load["rss_before"] - load["local_bytes"]
        # Whole-model loading would cost ~full here; streaming costs ~one tensor plus one shard.
        assert beyond_partition < 0.5 * full, (beyond_partition, full)


def reference_lora(model_dir: Path, vocab: int) -> tuple[dict[str, torch.Tensor], list[float]]:
    """One process, plain torch: the probe's two SGD steps on the mean loss of both batches."""
    from transformers import LlamaForCausalLM

    model = LlamaForCausalLM.from_pretrained(str(model_dir), dtype=torch.float32).eval()
    torch.manual_seed(probe.SEED)
    inject_lora(model, LoraConfig(r=4, alpha=8, targets="q_proj,v_proj"))
    trainable = [p for p in model.parameters() if p.requires_grad]
    first_losses: list[float] = []
    for step in range(probe.STEPS):
        losses = []
        for rank in (0, 1):
            ids = probe.batch(rank, vocab)
            losses.append(model(input_ids=ids, labels=ids).loss)
        if step == 0:
            first_losses = [x.item() for x in losses]
        grads = torch.autograd.grad(torch.stack(losses).mean(), trainable)
        with torch.no_grad():
            for p, g in zip(trainable, grads, strict=True):
                p -= probe.LR * g
    return gather_lora_state(model), first_losses


@pytest.mark.multirank
def test_lora_replicated_base_frozen_grads_averaged(sharded_model: Path, probe_run) -> None:
    reports, factors = probe_run
    for rep in reports:
        assert rep["lora_all_persist"] and rep["lora_all_whole"]
        assert rep["base_all_partitioned"] and rep["big_base_data_numel"] == 0
        # The optimizer's fp32 partitions are the LoRA factors' halves, nothing of the base.
        assert rep["optimizer_holds_only_lora"]
        assert rep["fp32_partition_numel"] == rep["lora_ds_tensor_numel"]
        assert rep["fp32_partition_numel"] * 2 == rep["lora_numel"]
        assert rep["base_grads_none"] and not rep["base_has_ds_grad"]
        assert rep["grad_buffer_numel"] == rep["fp32_partition_numel"]
    assert factors[0].keys() == factors[1].keys()
    for key in factors[0]:
        assert torch.equal(factors[0][key], factors[1][key]), key
    expected, first_losses = reference_lora(sharded_model, SHAPE["vocab_size"])
    for rank, rep in enumerate(reports):
        assert rep["losses"][0] == pytest.approx(first_losses[rank], abs=1e-4)
    moved = 0.0
    init = reference_init(sharded_model)
    for key, want in expected.items():
        torch.testing.assert_close(factors[0][key], want, rtol=1e-3, atol=1e-6)
        moved = max(moved, (want - init[key]).abs().max().item())
    assert moved > 1e-3  # the steps changed B (and A): summed gradients would be 2x off


def reference_init(model_dir: Path) -> dict[str, torch.Tensor]:
    from transformers import LlamaConfig, LlamaForCausalLM

    with torch.device("meta"):
        model = LlamaForCausalLM(LlamaConfig.from_pretrained(str(model_dir)))
    model = model.to_empty(device="cpu")
    torch.manual_seed(probe.SEED)
    inject_lora(model, LoraConfig(r=4, alpha=8, targets="q_proj,v_proj"))
    return gather_lora_state(model)


@pytest.mark.multirank
def test_activation_checkpointing_same_losses_under_zero3(tmp_path: Path) -> None:
    cfg = json.loads((runs.REPO / runs.TEST_DS_CONFIG).read_text())
    cfg |= {"train_batch_size": 4, "train_micro_batch_size_per_gpu": 2}
    cfg["tensorboard"] = {"enabled": False}
    ds = tmp_path / "ds.json"
    ds.write_text(json.dumps(cfg))
    common = ["--ds_config", str(ds), "--max_steps", "4", "--max_length", "64"]
    common += ["--eval_every", "99"]
    plain, ckpt = tmp_path / "plain", tmp_path / "ckpt"
    runs.train(2, *common, "--output_dir", str(plain))
    runs.train(2, *common, "--output_dir", str(ckpt), "--activation_checkpointing")
    a, b = TrainedRun(plain).train_losses, TrainedRun(ckpt).train_losses
    assert a.keys() == b.keys() == {1, 2, 3, 4}
    for step in a:
        assert b[step] == pytest.approx(a[step], abs=1e-5)
    assert b[4] < b[1]  # the LoRA factors got gradients through the recomputed layers
    m = TrainedRun(ckpt).metrics
    assert m["trainable_params"] < m["total_params"] / 10
