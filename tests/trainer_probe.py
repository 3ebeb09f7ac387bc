"""`lora-dist train` on one rank of a real run, with instruments on torch and DeepSpeed.

Launch it as the trainer: `deepspeed --num_gpus N tests/trainer_probe.py TRAIN_FLAGS`, with
PROBE_OUT=<dir> in the environment; each rank writes PROBE_OUT/rank<r>.json when it exits.
Nothing is replaced: every collective, the engine and the trainer run as they would. Recorded:

- devices: every tensor handed to a collective (DeepSpeed's communication backend and
  torch.distributed) must be on this rank's accelerator device, as NCCL demands. On the CPU the
  host *is* that device, so a tensor that lora_dist code puts on the host explicitly (`.cpu()`,
  `.to("cpu")`, or a torch factory called without `device=`) is tagged as a host tensor; the tag
  follows it through torch operations (a Tensor subclass), and a tagged tensor reaching a
  collective is a violation, as it would be under NCCL. `.to(<a torch.device>)` clears the tag:
  lora_dist moves tensors to the accelerator with the device object it holds.
- host reads in the training step: `.item()`, `.tolist()`, `float()`, `int()`, `bool()` called
  from lora_dist code on an untagged tensor inside `Trainer.train_step`, per step.
- all-gather bytes this rank received (output minus its own input), per training step.
- evaluations: which ran at which step, and whether the final adapter was on disk when each began.
- after `shard_base_for_tp`: whether every parameter is ZeRO-3 partitioned.

PROBE_SIGNAL_AT=final_task_eval sends this rank SIGTERM as the final task evaluation starts (as
Slurm signals every task of a job), to see the evaluation stop and the run exit 75.
"""

from __future__ import annotations

import atexit
import json
import os
import signal
import sys
from pathlib import Path

import torch
import torch.distributed as tdist

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))


class HostTensor(torch.Tensor):
    """A tensor lora_dist put on the host. Only a tag: it computes as a plain tensor."""


RECORD: dict = {
    "violations": [],
    "host_reads": {},
    "allgather_bytes": {},
    "evals": [],
    "zero_after_tp": None,
    "calls": 0,
}
STATE = {"step": None}  # the step being trained (1-based), or None outside train_step


def _from_lora_dist(depth: int) -> bool:
    return sys._getframe(depth).f_globals.get("__name__", "").startswith("lora_dist")


def _where(depth: int) -> str:
    frame = sys._getframe(depth)
    return f"{frame.f_globals.get('__name__')}:{frame.f_lineno}"


def _tag(t):
    return t.as_subclass(HostTensor) if isinstance(t, torch.Tensor) else t


def _untag(t):
    return t.as_subclass(torch.Tensor) if isinstance(t, HostTensor) else t


def _device_arg(args: tuple, kwargs: dict):
    if "device" in kwargs:
        return kwargs["device"]
    for a in args:
        if isinstance(a, (str, torch.device)):
            return a
    return None


def install_host_tags() -> None:
    orig_cpu, orig_to = torch.Tensor.cpu, torch.Tensor.to

    def cpu(self, *args, **kwargs):
        out = orig_cpu(self, *args, **kwargs)
        return _tag(out) if _from_lora_dist(2) else out

    def to(self, *args, **kwargs):
        out = orig_to(self, *args, **kwargs)
        if not _from_lora_dist(2):
            return out
        target = _device_arg(args, kwargs)
        if isinstance(target, str) and target.split(":")[0] == "cpu":
            return _tag(out)
        if target is not None:
            return _untag(out)
        return out

    torch.Tensor.cpu, torch.Tensor.to = cpu, to
    for name in ("tensor", "as_tensor", "zeros", "ones", "empty", "full", "arange", "randperm"):
        orig = getattr(torch, name)

        def factory(*args, _orig=orig, **kwargs):
            out = _orig(*args, **kwargs)
            if "device" not in kwargs and _from_lora_dist(2):
                return _tag(out)
            return out

        setattr(torch, name, factory)


def _tensors(value):
    if isinstance(value, torch.Tensor):
        yield value
    elif isinstance(value, (list, tuple)):
        for v in value:
            yield from _tensors(v)


def _check(op: str, args: tuple, kwargs: dict) -> None:
    from deepspeed.accelerator import get_accelerator

    RECORD["calls"] += 1
    expected = torch.device(get_accelerator().current_device_name())
    for t in _tensors(list(args) + list(kwargs.values())):
        problem = None
        if isinstance(t, HostTensor):
            problem = "a tensor lora_dist put on the host"
        elif t.device.type != expected.type:
            problem = f"a tensor on {t.device}"
        if problem:
            stack = [_where(d) for d in range(3, 12) if _safe_frame(d)]
            RECORD["violations"].append(
                {"op": op, "problem": f"{problem}, expected {expected}", "stack": stack}
            )


def _safe_frame(depth: int) -> bool:
    try:
        sys._getframe(depth)
    except ValueError:
        return False
    return True


def _received(op: str, args: tuple, kwargs: dict) -> int:
    def nbytes(ts) -> int:
        return sum(t.numel() * t.element_size() for t in _tensors(ts))

    names = {
        "all_gather_into_tensor": ("output_tensor", "input_tensor"),
        "all_gather_base": ("output_tensor", "input_tensor"),
        "all_gather": ("tensor_list", "tensor"),
        "all_gather_coalesced": ("output_tensors", "input_tensors"),
    }[op]
    values = list(args[:2]) + [None] * (2 - len(args[:2]))
    out = kwargs.get(names[0], values[0])
    inp = kwargs.get(names[1], values[1])
    return nbytes(out) - nbytes(inp)


GATHERS = ("all_gather_into_tensor", "all_gather_base", "all_gather", "all_gather_coalesced")
BACKEND_OPS = GATHERS + (
    "all_reduce",
    "all_reduce_coalesced",
    "inference_all_reduce",
    "reduce_scatter_tensor",
    "reduce_scatter",
    "broadcast",
    "reduce",
    "gather",
    "scatter",
    "all_to_all_single",
    "all_to_all",
    "send",
    "recv",
    "isend",
    "irecv",
)
TORCH_OPS = (
    "all_reduce",
    "all_gather",
    "all_gather_into_tensor",
    "reduce_scatter_tensor",
    "broadcast",
    "reduce",
    "gather",
    "scatter",
    "all_to_all_single",
)


def install_collective_checks() -> None:
    from deepspeed.comm.torch import TorchBackend

    for op in BACKEND_OPS:
        orig = getattr(TorchBackend, op, None)
        if orig is None:
            continue

        def method(self, *args, _orig=orig, _op=op, **kwargs):
            _check(f"deepspeed.comm {_op}", args, kwargs)
            if _op in GATHERS:
                key = str(STATE["step"]) if STATE["step"] is not None else "outside"
                got = RECORD["allgather_bytes"]
                got[key] = got.get(key, 0) + _received(_op, args, kwargs)
                if os.environ.get("PROBE_GATHER_SIZES") == key:  # every call of one step
                    sizes = RECORD.setdefault("gather_sizes", [])
                    sizes.append(_received(_op, args, kwargs))
            return _orig(self, *args, **kwargs)

        setattr(TorchBackend, op, method)
    for op in TORCH_OPS:
        orig = getattr(tdist, op)

        def function(*args, _orig=orig, _op=op, **kwargs):
            _check(f"torch.distributed {_op}", args, kwargs)
            return _orig(*args, **kwargs)

        setattr(tdist, op, function)


def install_host_read_counter() -> None:
    for name in ("item", "tolist", "__float__", "__int__", "__bool__"):
        orig = getattr(torch.Tensor, name)

        def read(self, *args, _orig=orig, _name=name, **kwargs):
            step = STATE["step"]
            if step is not None and not isinstance(self, HostTensor) and _from_lora_dist(2):
                reads = RECORD["host_reads"].setdefault(str(step), [])
                reads.append(f"{_name} at {_where(2)}")
            return _orig(self, *args, **kwargs)

        setattr(torch.Tensor, name, read)


def install_trainer_hooks() -> None:
    from lora_dist.training import trainer as trainer_module
    from lora_dist.training.trainer import Trainer

    orig_step, orig_dev, orig_shard = Trainer.train_step, Trainer.dev_loss, None
    orig_eval = trainer_module.evaluate_engine
    orig_shard = trainer_module.shard_base_for_tp
    current: dict = {}

    def train_step(self):
        current["trainer"] = self
        STATE["step"] = self.step + 1
        try:
            return orig_step(self)
        finally:
            STATE["step"] = None

    def note(kind: str, trainer) -> None:
        adapter = trainer.out / "adapter" / "adapter_model.safetensors"
        RECORD["evals"].append(
            {
                "kind": kind,
                "step": trainer.step,
                "final": trainer.step == trainer.total_steps,
                "adapter_on_disk": adapter.is_file(),
            }
        )

    def dev_loss(self):
        current["trainer"] = self
        note("dev_loss", self)
        return orig_dev(self)

    def evaluate_engine(*args, **kwargs):
        trainer = current["trainer"]
        note("task_eval", trainer)
        final = trainer.step == trainer.total_steps
        if final and os.environ.get("PROBE_SIGNAL_AT") == "final_task_eval":
            os.kill(os.getpid(), signal.SIGTERM)
        return orig_eval(*args, **kwargs)

    def shard_base_for_tp(model, cfg):
        mpu = orig_shard(model, cfg)
        RECORD["zero_after_tp"] = all(hasattr(p, "ds_id") for p in model.parameters())
        return mpu

    Trainer.train_step, Trainer.dev_loss = train_step, dev_loss
    trainer_module.evaluate_engine = evaluate_engine
    trainer_module.shard_base_for_tp = shard_base_for_tp


def write_record() -> None:
    out = Path(os.environ["PROBE_OUT"])
    out.mkdir(parents=True, exist_ok=True)
    rank = os.environ.get("RANK", "0")
    (out / f"rank{rank}.json").write_text(json.dumps(RECORD, indent=1))


def main() -> int:
    install_host_tags()
    install_collective_checks()
    install_host_read_counter()
    install_trainer_hooks()
    atexit.register(write_record)
    from lora_dist.cli import main as cli_main

    return cli_main(["train", *sys.argv[1:]])


if __name__ == "__main__":
    sys.exit(main())
