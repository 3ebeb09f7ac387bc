"""Reading DeepSpeed configs and deriving the batch layout from the world size."""

import json
from pathlib import Path

import pytest

from lora_dist.distributed.ds_config import (
    AUTO_SIZED,
    ConfigError,
    batch_layout,
    has_auto,
    load_ds_config,
    prepare_for_run,
    zero3_budgets,
)


def test_accumulation_is_derived_from_world_size():
    cfg = {"train_batch_size": 16, "train_micro_batch_size_per_gpu": 4}
    assert batch_layout(cfg, 1).grad_accum == 4
    assert batch_layout(cfg, 2).grad_accum == 2
    tp = batch_layout({**cfg, "tensor_parallel": {"autotp_size": 2}}, 4)
    assert (tp.dp, tp.tp, tp.grad_accum) == (2, 2, 2)


def test_inconsistent_batch_sizes_are_explained():
    with pytest.raises(ConfigError, match="not divisible"):
        batch_layout({"train_batch_size": 16, "train_micro_batch_size_per_gpu": 3}, 2)
    bad = {"train_batch_size": 16, "train_micro_batch_size_per_gpu": 4}
    bad["gradient_accumulation_steps"] = 4
    with pytest.raises(ConfigError, match="data-parallel ranks 2"):
        batch_layout(bad, 2)
    with pytest.raises(ConfigError, match="autotp_size"):
        batch_layout({"train_batch_size": 8, "tensor_parallel": {"autotp_size": 2}}, 3)


def test_bad_json_names_file_and_line(tmp_path):
    path = tmp_path / "ds.json"
    path.write_text('{\n  "train_batch_size": 16,\n  oops\n}')
    with pytest.raises(ConfigError, match=r"ds.json is not valid JSON.*line 3"):
        load_ds_config(path)
    with pytest.raises(ConfigError, match="does not exist"):
        load_ds_config(tmp_path / "missing.json")
    path.write_text(json.dumps({"train_batch_size": "auto"}))
    with pytest.raises(ConfigError, match="auto.*train_batch_size"):
        load_ds_config(path)


def test_persistence_threshold_covers_lora_factors(tmp_path):
    cfg = load_ds_config("ds_configs/zero3.json")
    layout = batch_layout(cfg, 2)
    out = prepare_for_run(cfg, layout, tmp_path, lora_threshold=1024, lr=1e-3)
    assert out["zero_optimization"]["stage3_param_persistence_threshold"] == 1024
    assert out["optimizer"]["params"]["lr"] == 1e-3
    assert out["tensorboard"]["output_path"] == str(tmp_path / "tensorboard")
    assert cfg["optimizer"]["params"]["lr"] != 1e-3  # the original is untouched


def test_auto_is_accepted_only_for_the_sizes_the_trainer_fills(tmp_path):
    path = tmp_path / "ds.json"
    zero = {"stage": 3, "stage3_prefetch_bucket_size": "auto", "reduce_bucket_size": "auto"}
    path.write_text(json.dumps({"train_batch_size": 4, "zero_optimization": zero}))
    assert has_auto(load_ds_config(path))
    zero["sub_group_size"] = "auto"
    path.write_text(json.dumps({"train_batch_size": 4, "zero_optimization": zero}))
    with pytest.raises(ConfigError, match=r"sub_group_size"):
        load_ds_config(path)


def test_auto_sizes_follow_the_model_and_vanish_where_no_model_exists_yet(tmp_path):
    cfg = load_ds_config("ds_configs/zero3.json")
    layout = batch_layout(cfg, 2)
    loading = prepare_for_run(cfg, layout, tmp_path, None, None)  # zero.Init's, before a model
    assert not has_auto(loading)
    assert not {k for k in AUTO_SIZED if k in loading["zero_optimization"]}
    # A LLaMA-7B-like layer on one rank: 202M elements; its 131M-element embedding.
    budgets = zero3_budgets(
        block_numel=202_383_360, largest_numel=131_072_000, trainable_numel=4_194_304
    )
    run = prepare_for_run(cfg, layout, tmp_path, 8192, None, budgets)["zero_optimization"]
    assert run["stage3_prefetch_bucket_size"] == 202_383_360  # the next layer, whole
    assert run["stage3_max_live_parameters"] == 2 * 202_383_360 + 131_072_000
    assert run["stage3_max_reuse_distance"] == 202_383_360
    assert run["reduce_bucket_size"] == 4_194_304  # every LoRA gradient in one bucket
    assert zero3_budgets(10, 10, 10**12)["reduce_bucket_size"] == 500_000_000  # capped


def test_shipped_configs_are_gpu_ready():
    names = sorted(p.stem for p in Path("ds_configs").glob("*.json"))
    assert {"zero3", "zero3_tp2", "zero3_tp8", "zero3_hpz8", "zero3_large"} <= set(names)
    for name in names:
        cfg = load_ds_config(f"ds_configs/{name}.json")
        assert cfg["bf16"]["enabled"] and not cfg.get("fp16", {}).get("enabled"), name
        assert cfg["zero_optimization"]["overlap_comm"], name
        if cfg["zero_optimization"]["stage"] == 3:
            for key in ("stage3_prefetch_bucket_size", "stage3_max_live_parameters"):
                assert cfg["zero_optimization"][key] == "auto", (name, key)


def test_the_test_config_is_the_main_config_in_fp32():
    main = load_ds_config("ds_configs/zero3.json")
    test = load_ds_config("tests/configs/zero3_fp32.json")
    assert main.pop("bf16") == {"enabled": True} and test.pop("bf16") == {"enabled": False}
    assert test == main


def test_hpz_and_tensor_parallelism_are_refused_together():
    cfg = load_ds_config("ds_configs/zero3_hpz8.json")
    assert batch_layout(cfg, 64).grad_accum == 2  # 8 nodes of 8 GPUs, micro-batch 1
    cfg["tensor_parallel"] = {"autotp_size": 2}
    with pytest.raises(ConfigError, match="consecutive ranks"):
        batch_layout(cfg, 16)
