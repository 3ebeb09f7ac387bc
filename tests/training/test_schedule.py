"""The data order and the learning-rate schedule: functions of the step alone."""

import pytest

from lora_dist.errors import ConfigError
from lora_dist.training.schedule import DataOrder, lr_multiplier, step_until_applied


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


def test_constant_schedule_and_a_split_smaller_than_a_batch():
    assert [lr_multiplier(s, 100, 4, "constant") for s in (0, 3, 4, 99)] == [0.25, 1.0, 1.0, 1.0]
    with pytest.raises(ConfigError, match="fewer than one global batch of 16"):
        DataOrder(num_samples=15, global_batch=16, seed=0)
    assert DataOrder(num_samples=16, global_batch=16, seed=0).steps_per_epoch == 1


def test_a_step_the_optimizer_skips_is_tried_again_not_counted():
    # What the trainer sees under fp16: DeepSpeed skips the update on an overflow (and halves
    # the loss scale) and says so through engine.was_step_applied().
    applied = iter([False, False, True, True])
    tries: list[int] = []

    def run_step() -> int:
        tries.append(len(tries))
        return len(tries)

    result, skipped = step_until_applied(run_step, lambda: next(applied), max_skipped=5)
    assert (result, skipped, len(tries)) == (3, 2, 3)  # the third try is step 1's update
    result, skipped = step_until_applied(run_step, lambda: next(applied), max_skipped=5)
    assert (result, skipped) == (4, 0)


def test_a_step_that_never_applies_stops_the_run():
    with pytest.raises(RuntimeError, match="skipped 3 tries of one step in a row"):
        step_until_applied(lambda: None, lambda: False, max_skipped=2)
