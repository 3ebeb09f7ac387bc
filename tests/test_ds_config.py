"""Reading DeepSpeed configs and deriving the batch layout from the world size."""

import json

import pytest

from lora_dist.distributed.ds_config import (
    ConfigError,
    batch_layout,
    load_ds_config,
    prepare_for_run,
)
from lora_dist.training.schedule import DataOrder, lr_multiplier


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


def test_data_order_is_a_function_of_the_step():
    order = DataOrder(num_samples=50, global_batch=8, seed=3)
    assert order.steps_per_epoch == 6
    epoch0 = [i for s in range(6) for i in order.global_indices(s)]
    assert len(set(epoch0)) == 48  # no repeats within an epoch
    assert order.global_indices(6) != order.global_indices(0)  # reshuffled next epoch
    one = order.rank_micro_batches(4, dp_rank=0, dp=1, micro_batch=4)
    two = [order.rank_micro_batches(4, r, 2, 4) for r in range(2)]
    assert sum(one, []) == sum(two[0], []) + sum(two[1], [])


def test_lr_schedule_shapes():
    assert lr_multiplier(0, 100, 10, "linear") == pytest.approx(0.1)
    assert lr_multiplier(10, 100, 10, "linear") == pytest.approx(1.0)
    assert lr_multiplier(55, 100, 10, "linear") == pytest.approx(0.5)
    assert lr_multiplier(55, 100, 10, "cosine") == pytest.approx(0.5)
    assert lr_multiplier(100, 100, 10, "cosine") == pytest.approx(0.0)
    with pytest.raises(ValueError):
        lr_multiplier(50, 100, 0, "step")
