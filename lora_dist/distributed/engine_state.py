"""Reading and restoring a DeepSpeed engine's LoRA-only state: Adam moments, fp32 masters, RNG,
and the fp16 loss scaler.

Under ZeRO the optimizer state is partitioned over data-parallel ranks. Each LoRA factor's
state is gathered whole (a collective: every rank calls these functions together), so a
checkpoint is independent of the world size and resumes on any number of ranks. The base has
no optimizer state to gather.
"""

from __future__ import annotations

import random
from typing import Any

import numpy as np
import torch
from deepspeed.accelerator import get_accelerator
from deepspeed.ops.adam import FusedAdam
from deepspeed.utils import (
    safe_get_full_fp32_param,
    safe_get_full_optimizer_state,
    safe_set_full_fp32_param,
    safe_set_full_optimizer_state,
)
from torch import nn

from lora_dist.adapter import lora_parameters

ADAM_KEYS = ("exp_avg", "exp_avg_sq")


def _plain_state(optimizer, param: nn.Parameter) -> dict[str, torch.Tensor]:
    inner = getattr(optimizer, "optimizer", optimizer)
    return inner.state.get(param, {})


def gather_lora_optimizer_state(engine) -> dict[str, torch.Tensor]:
    """fp32 master weights and Adam moments of every LoRA factor, whole, keyed like the adapter."""
    out: dict[str, torch.Tensor] = {}
    for key, param in lora_parameters(engine.module).items():
        master = safe_get_full_fp32_param(param)
        if master is None:  # no ZeRO partitioning: the torch optimizer holds the state directly
            state = _plain_state(engine.optimizer, param)
            master = param.detach().float()
            moments = {k: state[k] for k in ADAM_KEYS if k in state}
        else:
            moments = {k: safe_get_full_optimizer_state(param, k) for k in ADAM_KEYS}
        shape = getattr(param, "ds_shape", param.shape)
        out[f"{key}.master"] = master.detach().float().cpu().reshape(shape)
        for k, value in moments.items():
            if value is not None:
                out[f"{key}.{k}"] = value.detach().float().cpu().reshape(shape)
    return out


def _inner_and_flat(engine) -> tuple[object, list[torch.Tensor]]:
    """The torch-style optimizer and the tensors its state is keyed by.

    ZeRO-3 steps flat fp32 partitions one sub-group at a time and empties param_groups in
    between, ZeRO-1/2 keep one flat fp32 partition per group, and without ZeRO the optimizer
    holds the parameters themselves.
    """
    zero = engine.optimizer
    inner = getattr(zero, "optimizer", zero)
    for attr in ("fp32_partitioned_groups_flat", "single_partition_of_fp32_groups"):
        flat = getattr(zero, attr, None)
        if flat:
            return inner, list(flat)
    return inner, [p for group in inner.param_groups for p in group["params"]]


def optimizer_step_counts(engine) -> list[float]:
    """Adam's step counter per optimizer state tensor (it sets the bias correction)."""
    inner, flat = _inner_and_flat(engine)
    return [float(inner.state[p]["step"]) for p in flat if "step" in inner.state.get(p, {})]


def restore_lora_optimizer_state(
    engine, tensors: dict[str, torch.Tensor], steps: list[float]
) -> None:
    """Put gathered LoRA state back into a freshly initialised engine (any world size)."""
    inner, flat = _inner_and_flat(engine)
    count = steps[0] if steps else 0
    for p in flat:  # Adam creates its state lazily at the first step; create it now
        state = inner.state[p]
        if not state:
            state["exp_avg"] = torch.zeros_like(p)
            state["exp_avg_sq"] = torch.zeros_like(p)
        step = state.get("step")
        state["step"] = step.new_full((), count) if torch.is_tensor(step) else int(count)
    for key, param in lora_parameters(engine.module).items():
        master = tensors[f"{key}.master"].to(param.device)
        if hasattr(param, "ds_id") or hasattr(param, "_hp_mapping"):
            safe_set_full_fp32_param(param, master)
            for k in ADAM_KEYS:
                safe_set_full_optimizer_state(param, tensors[f"{key}.{k}"].to(param.device), k)
        else:
            with torch.no_grad():
                param.copy_(master.to(param.dtype))
            for k in ADAM_KEYS:
                inner.state[param][k].copy_(tensors[f"{key}.{k}"])
    replay_cpu_adam_steps(inner, int(count))


def replay_cpu_adam_steps(inner, steps: int) -> int:
    """Give DeepSpeed's C++ Adam the bias-correction state an uninterrupted run would have.

    The C++ Adam behind DeepSpeedCPUAdam (optimizer offload) and behind FusedAdam on the CPU
    accelerator keeps beta^t between calls: pow(beta, t) on its first call, then one
    multiplication per step (`IncrementStep` in deepspeed/ops/csrc/includes/cpu_adam.h). A
    resumed process starts from pow(beta, k + 1), which can differ from k + 1 products in the last
    bit, and then every update differs by about one ulp from the run that was never stopped.
    Calling the kernel for steps 1..k on one-element scratch tensors rebuilds the same product.
    CUDA's fused Adam computes pow() on every step and keeps no such state. Returns the number of
    replayed calls (0 where the optimizer is not one of these kernels).
    """
    if steps < 1 or not inner.param_groups:
        return 0
    g = inner.param_groups[0]
    beta1, beta2 = g["betas"]
    scratch = [torch.zeros(1) for _ in range(4)]  # param, grad, exp_avg, exp_avg_sq
    if hasattr(inner, "ds_opt_adam") and hasattr(inner, "opt_id"):  # DeepSpeedCPUAdam
        for t in range(1, steps + 1):
            inner.ds_opt_adam.adam_update(
                inner.opt_id, t, g["lr"], beta1, beta2, g["eps"], g["weight_decay"],
                g["bias_correction"], *scratch,
            )  # fmt: skip
        return steps
    if isinstance(inner, FusedAdam) and get_accelerator().device_name() == "cpu":
        p, grad, m, v = scratch
        for t in range(1, steps + 1):
            inner.multi_tensor_adam(
                65536, inner._dummy_overflow_buf, [[grad], [p], [m], [v]],
                g["lr"], beta1, beta2, g["eps"], t, inner.adam_w_mode,
                int(bool(g["bias_correction"])), g["weight_decay"],
            )  # fmt: skip
        return steps
    return 0


# What DeepSpeed's DynamicLossScaler changes as it runs; its settings come from the JSON again.
LOSS_SCALER_FIELDS = ("cur_scale", "cur_iter", "last_overflow_iter", "cur_hysteresis")


def _loss_scaler(engine) -> Any:
    return getattr(engine.optimizer, "loss_scaler", None)


def loss_scaler_state(engine) -> dict[str, float] | None:
    """The fp16 dynamic loss scaler's running state; None when the engine scales statically
    (bf16, fp32, or a fixed fp16 scale), where there is nothing to carry over.

    Without it a resumed fp16 run starts again at the initial scale (2^16 by default) and
    spends its first steps overflowing back down to where the run had settled.
    """
    scaler = _loss_scaler(engine)
    if scaler is None or not getattr(scaler, "dynamic", False):
        return None
    return {k: float(getattr(scaler, k)) for k in LOSS_SCALER_FIELDS}


def dynamic_loss_scale(engine) -> float | None:
    """The fp16 dynamic loss scale now (a host value, no device sync); None when static."""
    state = loss_scaler_state(engine)
    return state["cur_scale"] if state else None


def restore_loss_scaler_state(engine, state: dict[str, float] | None) -> bool:
    """Put `loss_scaler_state()`'s values back; False when there is nothing to restore into
    (a checkpoint from a bf16 run resumed under fp16 keeps the JSON's initial scale)."""
    scaler = _loss_scaler(engine)
    if not state or scaler is None or not getattr(scaler, "dynamic", False):
        return False
    scaler.cur_scale = float(state["cur_scale"])
    for key in ("cur_iter", "last_overflow_iter", "cur_hysteresis"):
        setattr(scaler, key, int(state[key]))
    return True


def rng_state() -> tuple[torch.Tensor, dict]:
    """This rank's RNG states: torch's as a tensor, python's and numpy's as JSON-able data."""
    py = random.getstate()
    np_state = np.random.get_state()
    return torch.get_rng_state(), {
        "python": [py[0], list(py[1]), py[2]],
        "numpy": [np_state[0], np_state[1].tolist(), *map(int, np_state[2:4]), float(np_state[4])],
        "cuda": torch.cuda.is_available(),
    }


def set_rng_state(torch_state: torch.Tensor, other: dict, cuda_state: torch.Tensor | None) -> None:
    torch.set_rng_state(torch_state)
    py = other["python"]
    random.setstate((py[0], tuple(py[1]), py[2]))
    n = other["numpy"]
    np.random.set_state((n[0], np.array(n[1], dtype=np.uint32), n[2], n[3], n[4]))
    if cuda_state is not None and torch.cuda.is_available():
        torch.cuda.set_rng_state(cuda_state)


def seed_everything(seed: int) -> None:
    """Seed Python's, NumPy's and torch's generators (identically on every rank)."""
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)
