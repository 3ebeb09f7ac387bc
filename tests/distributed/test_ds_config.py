"""Reading DeepSpeed configs and deriving the batch layout from the world size."""

import json

import pytest

from lora_dist.distributed.ds_config import (
    ConfigError,
    batch_layout,
    load_ds_config,
    prepare_for_run,
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
    with pytest.raises(ConfigError, match="auto"):
        load_ds_config(path)


def test_persistence_threshold_covers_lora_factors(tmp_path):
    cfg = load_ds_config("ds_configs/zero3.json")
    layout = batch_layout(cfg, 2)
    out = prepare_for_run(cfg, layout, tmp_path, lora_threshold=1024, lr=1e-3)
    assert out["zero_optimization"]["stage3_param_persistence_threshold"] == 1024
    assert out["optimizer"]["params"]["lr"] == 1e-3
    assert out["tensorboard"]["output_path"] == str(tmp_path / "tensorboard")
    assert cfg["optimizer"]["params"]["lr"] != 1e-3  # the original is untouched
