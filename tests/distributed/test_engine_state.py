"""Resuming DeepSpeed engine state: C++ Adam's bias correction, and the fp16 loss scaler."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from tests.runs import run_env

# Three Adam steps in one process (the reference), or state after two steps put into a fresh
# process's optimizer and one step taken (a resume), with or without the replay. Step 3 is where
# float32 pow(0.999, 3) and 0.999 * 0.999 * 0.999 differ in the last bit.
PROBE = """
import sys
import torch
from lora_dist.distributed.engine_state import replay_cpu_adam_steps

kind, mode, state_file = sys.argv[1:4]
torch.manual_seed(0)
grads = [torch.randn(256) for _ in range(3)]
p = torch.nn.Parameter(torch.randn(256) * 0.05)
if kind == "FusedAdam":
    from deepspeed.ops.adam import FusedAdam as Adam
else:
    from deepspeed.ops.adam import DeepSpeedCPUAdam as Adam
opt = Adam([p], lr=1e-3, betas=(0.9, 0.999), weight_decay=0.1)
if mode == "reference":
    for i, g in enumerate(grads):
        if i == 2:
            st = opt.state[p]
            saved = {"p": p.detach().clone(), "m": st["exp_avg"], "v": st["exp_avg_sq"]}
            torch.save(saved, state_file)
        p.grad = g.clone()
        opt.step()
else:
    saved = torch.load(state_file)
    with torch.no_grad():
        p.copy_(saved["p"])
    opt.state[p].update(step=2, exp_avg=saved["m"].clone(), exp_avg_sq=saved["v"].clone())
    if mode == "replay":
        assert replay_cpu_adam_steps(opt, 2) == 2
    p.grad = grads[2].clone()
    opt.step()
torch.save(p.detach(), state_file + "." + mode)
"""


def _run(tmp_path: Path, kind: str, mode: str) -> None:
    (tmp_path / "probe.py").write_text(PROBE)
    done = subprocess.run(
        [sys.executable, str(tmp_path / "probe.py"), kind, mode, str(tmp_path / "state.pt")],
        env=run_env(),
        capture_output=True,
        text=True,
        timeout=600,  # DeepSpeedCPUAdam's op is JIT-built on first use (~1 min)
    )
    assert done.returncode == 0, done.stderr[-3000:]


@pytest.mark.parametrize("kind", ["FusedAdam", "DeepSpeedCPUAdam"])
def test_replayed_adam_resumes_bit_exactly(tmp_path: Path, kind: str) -> None:
    import torch

    for mode in ("reference", "replay", "plain"):
        _run(tmp_path, kind, mode)
    reference, replayed, plain = (
        torch.load(tmp_path / f"state.pt.{mode}") for mode in ("reference", "replay", "plain")
    )
    assert torch.equal(replayed, reference)
    # Without the replay the kernel's beta^t differs in the last bit: the check above can fail.
    assert not torch.equal(plain, reference)


def _scaler():
    from deepspeed.runtime.fp16.loss_scaler import DynamicLossScaler

    return DynamicLossScaler(
        init_scale=2**16, scale_window=4, min_scale=1, delayed_shift=2, consecutive_hysteresis=False
    )


def test_fp16_loss_scaler_state_round_trips_through_a_checkpoint() -> None:
    import json
    from types import SimpleNamespace

    from lora_dist.distributed.engine_state import loss_scaler_state, restore_loss_scaler_state

    # A scaler that has run a while: grown past its window, then lost hysteresis on an overflow.
    # (Its overflow branch logs through deepspeed.comm, so only the no-overflow path and the
    # state an overflow leaves are driven here.)
    ran = SimpleNamespace(optimizer=SimpleNamespace(loss_scaler=_scaler()))
    scaler = ran.optimizer.loss_scaler
    for _ in range(9):
        scaler.update_scale(False)
    scaler.cur_hysteresis, scaler.last_overflow_iter = 1, 7
    state = json.loads(json.dumps(loss_scaler_state(ran)))  # as trainer_state.json holds it
    fresh = SimpleNamespace(optimizer=SimpleNamespace(loss_scaler=_scaler()))
    assert fresh.optimizer.loss_scaler.cur_scale == 2**16  # what a resume started from before
    assert restore_loss_scaler_state(fresh, state)
    got = fresh.optimizer.loss_scaler
    for key in ("cur_scale", "cur_iter", "last_overflow_iter", "cur_hysteresis"):
        assert getattr(got, key) == getattr(scaler, key), key
    assert got.cur_scale == 2**18  # grown twice in 9 clean steps with a window of 4
    for _ in range(5):  # and both continue identically
        scaler.update_scale(False)
        got.update_scale(False)
        assert got.cur_scale == scaler.cur_scale


def test_static_scalers_have_no_state_to_keep() -> None:
    from types import SimpleNamespace

    from deepspeed.runtime.fp16.loss_scaler import LossScaler

    from lora_dist.distributed.engine_state import loss_scaler_state, restore_loss_scaler_state

    bf16 = SimpleNamespace(optimizer=SimpleNamespace(loss_scaler=LossScaler(scale=1)))
    assert loss_scaler_state(bf16) is None
    assert not restore_loss_scaler_state(bf16, {"cur_scale": 8.0})
    assert bf16.optimizer.loss_scaler.cur_scale == 1
