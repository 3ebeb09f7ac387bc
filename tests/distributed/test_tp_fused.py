"""Fused-QKV models under tensor parallelism: slice LoRA on GPT-2 and Falcon shards, TP=2 = TP=1."""

import json
import subprocess
import sys

import pytest
import torch
from peft import PeftModel
from transformers import AutoModelForCausalLM, FalconConfig, GPT2Config

from lora_dist.adapter import load_adapter
from lora_dist.distributed.ds_config import load_ds_config
from lora_dist.distributed.tp_fused import refuse_unsupported_autotp
from lora_dist.models.tiny import train_tokenizer
from lora_dist.planning.shapes import lora_param_count, shape_from_hf_config
from tests import runs
from tests.distributed.test_tp import LR, MAX_LENGTH, STEPS, assert_adapters_agree
from tests.runs import TrainedRun
from tests.tiny_models import tiny_fused

CONFIGS = runs.REPO / "ds_configs"
VOCAB = 1024  # the shipped SentencePiece tokenizer's
IDS = dict(vocab_size=VOCAB, bos_token_id=1, eos_token_id=2, pad_token_id=0)
# No dropout: a TP rank draws the attention-dropout mask of its own heads, so with dropout a
# TP=2 run is a different (equally valid) sample than TP=1, not the same numbers.
NO_DROPOUT = dict(resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0)
FAMILIES = {
    "gpt2": GPT2Config(n_embd=64, n_layer=2, n_head=4, n_positions=128, **NO_DROPOUT, **IDS),
    "falcon": FalconConfig(  # Falcon-180B's layout: query heads grouped by KV head
        hidden_size=64,
        num_hidden_layers=2,
        num_attention_heads=8,
        num_kv_heads=2,
        new_decoder_architecture=True,
        **IDS,
    ),
}


def test_autotp_layouts_it_cuts_wrongly_are_refused():
    with pytest.raises(ValueError, match="ALiBi"):
        refuse_unsupported_autotp(tiny_fused("bloom").config)
    with pytest.raises(ValueError, match="multi-query Falcon"):
        refuse_unsupported_autotp(tiny_fused("falcon-mq").config)
    refuse_unsupported_autotp(tiny_fused("falcon-grouped").config)  # shards by KV head


@pytest.mark.multirank
def test_slice_lora_on_sharded_fused_bases_matches_unsharded(tmp_path):
    """Forward, loss, every LoRA gradient, PEFT export and merge on TP=2 shards, in float64."""
    out = tmp_path / "probe.json"
    cmd = [
        *(sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2"),
        *("--master_port", str(runs.free_port())),
        *(str(runs.REPO / "tests" / "tp_fused_probe.py"), str(out)),
        *("gpt2", "falcon-grouped", "gpt_neox"),
    ]
    done = subprocess.run(
        cmd, cwd=runs.REPO, env=runs.run_env(), capture_output=True, text=True, timeout=300
    )
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    results = json.loads(out.read_text())
    assert results["gpt2/attn"]["base_kinds"] == ["Conv1DColumnParallel"]  # our split
    assert results["falcon-grouped/attn"]["base_kinds"] == ["fused_LinearLayer"]  # AutoTP's
    for case, r in results.items():
        assert r["same_layers"] and r["same_init"], case
        assert "TPFusedSliceLora" in r["kinds"], case
        assert r["logits_err"] < 1e-10 and r["loss_err"] < 1e-12, case
        assert r["grad_scale"] > 1e-3, case
        assert r["grad_err"] < 1e-10 * max(1.0, r["grad_scale"]), case
        assert r["grads_bit_identical"] and r["factors_bit_identical"], case
        assert r["export_equal"], case  # the PEFT-form adapter of the shards = unsharded one
        assert r["merge_err"] < 1e-6, case


# -- the trainer, TP=2 against TP=1 under ZeRO-3 ---------------------------------------------------
@pytest.fixture(scope="module")
def model_dirs(tmp_path_factory) -> dict:
    """Tiny GPT-2 and Falcon checkpoints with the shipped tokenizer."""
    dirs = {}
    for name, config in FAMILIES.items():
        path = tmp_path_factory.mktemp(name)
        torch.manual_seed(0)
        AutoModelForCausalLM.from_config(config).save_pretrained(path)
        train_tokenizer(path, VOCAB, 512)
        dirs[name] = path
    return dirs


def _train(tmp_path_factory, model_dir, name: str, ranks: int, config: str):
    out = tmp_path_factory.mktemp(name)
    cfg = load_ds_config(CONFIGS / config)
    cfg.update(train_batch_size=4, train_micro_batch_size_per_gpu=2)
    cfg["bf16"] = {"enabled": False}  # fp32: TP and TP=1 runs agree to 1e-4 (bf16: 1e-2)
    cfg["optimizer"]["params"]["lr"] = LR
    (out / "ds.json").write_text(json.dumps(cfg))
    runs.train(
        ranks,
        *("--model", str(model_dir), "--ds_config", str(out / "ds.json")),
        *("--output_dir", str(out), "--max_steps", str(STEPS), "--eval_every", str(STEPS)),
        *("--max_length", str(MAX_LENGTH), "--lora_targets", "attn", "--lora_r", "4"),
        "--skip_task_eval",
    )
    return out


@pytest.fixture(scope="module", params=sorted(FAMILIES))
def runs_tp1_tp2(request, model_dirs, tmp_path_factory):
    name, model_dir = request.param, model_dirs[request.param]
    tp1 = _train(tmp_path_factory, model_dir, f"{name}-tp1", 1, "zero3.json")
    tp2 = _train(tmp_path_factory, model_dir, f"{name}-tp2", 2, "zero3_tp2.json")
    return name, model_dir, tp1, tp2


@pytest.mark.multirank
def test_tp2_trains_like_tp1(runs_tp1_tp2):
    name, model_dir, tp1, tp2 = runs_tp1_tp2
    r1, r2 = TrainedRun(tp1), TrainedRun(tp2)
    m1, m2 = r1.metrics, r2.metrics
    assert (m2["tp"], m2["dp"], m1["tp"]) == (2, 1, 1) and m1["zero_stage"] == 3
    l1, l2 = r1.train_losses, r2.train_losses
    assert sorted(l1) == sorted(l2) == list(range(1, STEPS + 1))
    for step in l1:
        assert l2[step] == pytest.approx(l1[step], rel=1e-4), step
    assert m2["dev_loss"] == pytest.approx(m1["dev_loss"], rel=1e-4)
    assert m1["dev_loss"] < m1["dev_loss_initial"]  # it trained: the comparison means something
    a1, a2 = r1.adapter(), r2.adapter()
    assert_adapters_agree(a2, a1)
    assert max(v.abs().max().item() for k, v in a1.items() if "lora_B" in k) > 1e-4
    c1, c2 = (json.loads((o / "adapter" / "adapter_config.json").read_text()) for o in (tp1, tp2))
    assert c1 == c2 and c1["rank_pattern"] and c1["alpha_pattern"]
    # q and v slices only, as many trainable parameters as the planner says
    shape = shape_from_hf_config(FAMILIES[name].to_dict())
    assert m1["trainable_params"] == m2["trainable_params"] == lora_param_count(shape, 4, "attn")


@pytest.mark.multirank
def assert_peft_loads_as_slices(model_dir, adapter_dir, min_change: float = 1e-6) -> PeftModel:
    """PEFT loads a fused-map adapter as it is (one LoRA on the fused layer) and computes what
    lora-dist's slice layers compute from the same files; the trained adapter changes the model.
    Returns PEFT's model for further checks."""
    ids = torch.randint(3, VOCAB, (2, 16), generator=torch.Generator().manual_seed(0))
    peft = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(model_dir), adapter_dir)
    ours = AutoModelForCausalLM.from_pretrained(model_dir)
    report = load_adapter(ours, adapter_dir)
    assert {type(layer).__name__ for layer in report.layers.values()} == {"FusedSliceLora"}
    with torch.no_grad():
        want = peft.eval()(ids).logits
        torch.testing.assert_close(ours.eval()(ids).logits, want, rtol=1e-5, atol=1e-5)
        base = AutoModelForCausalLM.from_pretrained(model_dir).eval()(ids).logits
    assert (want - base).abs().max() > min_change  # the trained adapter changes the model
    return peft


def test_tp2_adapter_loads_in_peft_and_back_as_slices(runs_tp1_tp2):
    _, model_dir, _, tp2 = runs_tp1_tp2
    assert_peft_loads_as_slices(model_dir, tp2 / "adapter")
