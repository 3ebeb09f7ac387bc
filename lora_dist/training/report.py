"""What a finished run reports: metrics.json, with every rank's peak memory and shard sizes."""

from __future__ import annotations

from dataclasses import asdict
from typing import Any

import numpy as np

from lora_dist.atomic import write_json_atomic
from lora_dist.data.freeform import perplexity
from lora_dist.distributed.collective import all_reduce_sum
from lora_dist.distributed.zero import frozen_local_numel, local_param_numel, model_state_bytes
from lora_dist.training.monitor import peak_memory


def run_report(
    trainer: Any, first_dev: float, dev: float, last: dict[str, float], tps: float, elapsed: float
) -> dict[str, Any]:
    """The metrics of a finished `Trainer` run; rank 0 writes them to metrics.json.

    A collective: every rank's peak memory (the training peak, see Trainer.training_peak) and
    shard sizes are summed into per-rank lists.
    """
    t = trainer
    module, w, rank = t.engine.module, t.world, t.rank
    local, total = local_param_numel(module)
    peak = t.training_peak or peak_memory()
    per_rank = [0.0] * (5 * w)
    per_rank[rank] = float(peak.allocated)
    per_rank[w + rank] = float(local)
    per_rank[2 * w + rank] = float(frozen_local_numel(module))
    per_rank[3 * w + rank] = float(model_state_bytes(t.engine)["total"])
    per_rank[4 * w + rank] = float(peak.reserved)
    per_rank = [int(x) for x in all_reduce_sum(per_rank, t.device)]
    trainable = sum(
        int(getattr(p, "ds_numel", p.numel())) for p in module.parameters() if p.requires_grad
    )
    metrics = {
        "steps": t.step,
        "train_losses": t.train_losses,
        "resumed_from": str(t.resumed_from) if t.resumed_from else None,
        "mode": "full_finetune" if t.cfg.full_finetune else "lora",
        "train_loss": last.get("loss"),
        "dev_loss_initial": first_dev,
        "dev_loss": dev,
        "dev_perplexity": perplexity(dev),
        "data": t.data.report(),
        "task_metrics": t.task_metrics,
        "tokens_per_s": tps,
        "step_time_median_s": float(np.median(t.step_times)) if t.step_times else None,
        "elapsed_s": elapsed,
        "peak_memory_bytes_per_rank": per_rank[:w],
        "peak_memory_reserved_bytes_per_rank": per_rank[4 * w :],
        "peak_memory_kind": "cuda_max_allocated" if peak.kind == "cuda" else "peak_rss",
        "peak_memory_scope": "training" if t.peak_reset else "whole process",
        "param_numel_per_rank": per_rank[w : 2 * w],
        "frozen_param_numel_per_rank": per_rank[2 * w : 3 * w],
        "model_state_bytes_per_rank": per_rank[3 * w : 4 * w],
        "model_state_bytes_rank0": model_state_bytes(t.engine),
        "skipped_steps": int(getattr(t.engine, "skipped_steps", 0)),
        "trainable_params": trainable,
        "total_params": total,
        "world_size": w,
        "dp": t.layout.dp,
        "tp": t.layout.tp,
        "zero_stage": t.stage,
        "global_batch": t.layout.global_batch,
    }
    for r in range(w):
        t.monitor.scalars(
            t.step,
            {
                f"memory/peak_bytes_rank{r}": per_rank[r],
                f"memory/reserved_bytes_rank{r}": per_rank[4 * w + r],
            },
        )
    hparams = {k: v for k, v in asdict(t.cfg).items() if v is not None}
    t.monitor.hparams(hparams, {"hparam/dev_loss": dev})
    if t.is_main:
        write_json_atomic(t.out / "metrics.json", metrics)
    return metrics
