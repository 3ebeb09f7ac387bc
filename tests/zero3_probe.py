"""Probe launched by tests/test_zero3.py on N ranks: ZeRO-3 loading memory and LoRA engine state.

`deepspeed --num_gpus 2 tests/zero3_probe.py MODEL_DIR OUT_DIR [streamed|from_pretrained]` loads
MODEL_DIR (a sharded safetensors checkpoint) under ZeRO-3 with lora_dist's streaming loader or the
trainer's `load_base_model` (transformers' from_pretrained), sampling this rank's RSS while it
loads. It then injects LoRA, builds the engine like the trainer (SGD, so that averaged and summed
gradients differ by 2x), takes two steps on rank-specific batches, and writes OUT_DIR/rank<k>.json
with what it saw plus OUT_DIR/rank<k>.safetensors with the LoRA factors, for the test to judge.
"""

from __future__ import annotations

import json
import resource
import sys
import threading
import time
from pathlib import Path

import torch

STEPS, SEQ, LR, SEED = 2, 16, 0.5, 7


def rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * resource.getpagesize()


class RssSampler:
    """The largest RSS seen by a 5 ms sampling thread between start and stop."""

    def __init__(self) -> None:
        self.peak = rss_bytes()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self._stop.is_set():
            self.peak = max(self.peak, rss_bytes())
            time.sleep(0.005)

    def __enter__(self) -> RssSampler:
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, rss_bytes())


def ds_config() -> dict:
    return {
        "train_batch_size": 2,
        "train_micro_batch_size_per_gpu": 1,
        "optimizer": {"type": "SGD", "params": {"lr": LR}},
        "zero_allow_untested_optimizer": True,
        "gradient_clipping": 0.0,  # DeepSpeed 0.19.8 clips at 1.0 unless told: plain SGD here
        "zero_optimization": {"stage": 3, "stage3_param_persistence_threshold": 0},
        "bf16": {"enabled": False},
        "steps_per_print": 10**9,
    }


def batch(rank: int, vocab: int) -> torch.Tensor:
    return torch.randint(0, vocab, (1, SEQ), generator=torch.Generator().manual_seed(100 + rank))


def main(model_dir: Path, out: Path, loader: str) -> None:
    import deepspeed
    import torch.distributed as dist
    from safetensors.torch import save_file

    from lora_dist.distributed.ds_config import batch_layout, prepare_for_run
    from lora_dist.distributed.launch import init_distributed
    from lora_dist.distributed.loading import load_base_model, load_streamed_zero3
    from lora_dist.distributed.zero import (
        gather_lora_state,
        lora_persistence_threshold,
        model_state_bytes,
    )
    from lora_dist.inject import inject_lora
    from lora_dist.lora import LoraConfig, lora_layers

    info = init_distributed()
    raw = ds_config()
    layout = batch_layout(raw, info.world_size)
    base_cfg = prepare_for_run(raw, layout, out, None, None)
    import transformers.models.llama.modeling_llama  # noqa: F401 (code, not weights: ~120 MB)

    dist.barrier()
    before_rss = rss_bytes()
    before_maxrss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    with RssSampler() as sampler:
        if loader == "streamed":
            model = load_streamed_zero3(model_dir, base_cfg, torch.float32)
        else:
            model = load_base_model(model_dir, base_cfg, 3)
    after_maxrss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    loaded = {
        "rss_before": before_rss,
        "maxrss_before": before_maxrss,
        "rss_peak_sampled": sampler.peak,
        "maxrss_after": after_maxrss,
        "local_numel": sum(p.ds_tensor.numel() for p in model.parameters()),
        "local_bytes": sum(
            p.ds_tensor.numel() * p.ds_tensor.element_size() for p in model.parameters()
        ),
        "total_numel": sum(p.ds_numel for p in model.parameters()),
        "all_zero3": all(hasattr(p, "ds_id") for p in model.parameters()),
    }

    print(f"rank {info.rank} load: {loaded}", file=sys.stderr)
    torch.manual_seed(SEED)
    inject_lora(model, LoraConfig(r=4, alpha=8, targets="q_proj,v_proj"))
    threshold = lora_persistence_threshold(model)
    cfg = prepare_for_run(raw, layout, out, threshold, None)
    trainable = [p for p in model.parameters() if p.requires_grad]
    engine, *_ = deepspeed.initialize(model=model, model_parameters=trainable, config=cfg)
    vocab = model.config.vocab_size
    ids = batch(info.rank, vocab)
    losses = []
    for _ in range(STEPS):
        loss = engine(input_ids=ids, labels=ids).loss
        engine.backward(loss)
        engine.step()
        losses.append(loss.item())

    lora_params = [p for layer in lora_layers(model).values() for p in (layer.lora_A, layer.lora_B)]
    lora_ids = {id(p) for p in lora_params}
    base = [p for p in model.parameters() if id(p) not in lora_ids]
    opt = engine.optimizer
    flat = getattr(opt, "fp32_partitioned_groups_flat", [])
    grad_buf = getattr(opt, "grad_partitions_flat_buffer", None)
    param_groups_ids = {id(p) for g in opt.fp16_groups for p in g}
    report = {
        "rank": info.rank,
        "world": info.world_size,
        "load": loaded,
        "losses": losses,
        "threshold": threshold,
        "lora_numel": sum(p.ds_numel for p in lora_params),
        "lora_ds_tensor_numel": sum(p.ds_tensor.numel() for p in lora_params),
        "lora_all_persist": all(p.ds_persist for p in lora_params),
        "lora_all_whole": all(p.data.numel() == p.ds_numel for p in lora_params),
        "base_all_partitioned": all(not p.ds_persist or p.ds_numel <= threshold for p in base),
        "big_base_data_numel": sum(p.data.numel() for p in base if p.ds_numel > threshold),
        "fp32_partition_numel": sum(t.numel() for t in flat),
        "optimizer_holds_only_lora": param_groups_ids <= lora_ids,
        "base_grads_none": all(p.grad is None for p in base),
        "base_has_ds_grad": any(getattr(p, "ds_grad", None) is not None for p in base),
        "grad_buffer_numel": grad_buf.numel() if grad_buf is not None else None,
        "model_state_bytes": model_state_bytes(engine),
    }
    state = gather_lora_state(model)
    save_file(state, str(out / f"rank{info.rank}.safetensors"))
    (out / f"rank{info.rank}.json").write_text(json.dumps(report, indent=1))
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    args = [a for a in sys.argv[1:] if not a.startswith("--local_rank")]
    main(Path(args[0]), Path(args[1]), args[2] if len(args) > 2 else "streamed")
