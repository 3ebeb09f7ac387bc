"""The training job: LoRA (or full fine-tuning) of a causal LM inside a DeepSpeed engine.

Setup builds the model so that no rank ever holds the whole base under ZeRO-3, injects LoRA,
and hands only the trainable parameters to the optimizer. The loop reads a deterministic data
order, logs to TensorBoard from rank 0, evaluates the dev loss, and saves PEFT-format adapters.
"""

from __future__ import annotations

import argparse
import math
import os
import sys
import time
import warnings
from dataclasses import asdict
from pathlib import Path
from typing import Any

import numpy as np
import torch

from lora_dist.atomic import write_json_atomic
from lora_dist.distributed.ds_config import (
    BatchLayout,
    ConfigError,
    batch_layout,
    load_ds_config,
    prepare_for_run,
)
from lora_dist.distributed.engine_state import seed_everything
from lora_dist.distributed.host_memory import pin_mmap_threshold
from lora_dist.distributed.loading import load_base_model
from lora_dist.loading import resolve_model_dir
from lora_dist.lora import LoraConfig
from lora_dist.training.checkpointer import CheckpointMixin
from lora_dist.training.config import TrainConfig, config_from_args, configure_train

EXIT_PREEMPTED = 75  # checkpoint written after SIGTERM/SIGUSR1: requeue me
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")  # ranks must not fork tokenizer pools
# DeepSpeed calls torch's deprecated collective names on every step; one warning per call
# would flood every rank's log.
warnings.filterwarnings("ignore", category=FutureWarning, module="torch.distributed.c10d_logger")


def run_train(args: argparse.Namespace) -> int:
    return train(config_from_args(args))


class Trainer(CheckpointMixin):
    """One run: setup in __init__, then fit(). Checkpointing comes from CheckpointMixin."""

    def __init__(self, cfg: TrainConfig) -> None:
        import deepspeed
        from transformers import AutoTokenizer

        from lora_dist.data import tokenize_split
        from lora_dist.distributed.launch import init_distributed
        from lora_dist.distributed.preemption import PreemptionWatch
        from lora_dist.distributed.tp import inject_lora_tp, shard_base_for_tp, zero_init_config
        from lora_dist.distributed.zero import lora_persistence_threshold, zero_stage
        from lora_dist.tasks import get_task
        from lora_dist.training.monitor import Monitor
        from lora_dist.training.schedule import DataOrder, lr_multiplier

        self.cfg = cfg
        self.out = Path(cfg.output_dir)
        pin_mmap_threshold(cfg.host_mmap_threshold)  # before anything large is allocated
        raw_cfg = load_ds_config(cfg.ds_config)
        self.rank_info = init_distributed()
        self.rank, self.world = self.rank_info.rank, self.rank_info.world_size
        self.layout: BatchLayout = batch_layout(raw_cfg, self.world)
        self.dp_rank = self.rank // self.layout.tp
        self.is_main = self.rank == 0
        if self.is_main:
            self.out.mkdir(parents=True, exist_ok=True)
        self.stage = zero_stage(raw_cfg)

        seed_everything(cfg.seed)
        self.model_dir = resolve_model_dir(cfg.model)
        self.tokenizer = AutoTokenizer.from_pretrained(str(self.model_dir))
        self.task = get_task(cfg.task)
        self.data_dir = Path(cfg.data) if cfg.data else self.task.sample_dir()
        self.train_set = tokenize_split(
            self.task, self.data_dir, "train", self.tokenizer, cfg.max_length
        )
        self.dev_set = tokenize_split(
            self.task, self.data_dir, "dev", self.tokenizer, cfg.max_length
        )

        base_cfg = prepare_for_run(raw_cfg, self.layout, self.out, None, cfg.lr)
        model = load_base_model(self.model_dir, zero_init_config(base_cfg), self.stage)
        self.mpu = shard_base_for_tp(model, base_cfg)  # AutoTP must see the bare linears
        self.lora = None
        self.injection = None
        if cfg.full_finetune:
            if cfg.save_every or cfg.resume:
                raise ConfigError(
                    "--save_every/--resume checkpoint LoRA state only; --full_finetune is the "
                    "memory and accuracy baseline and keeps no checkpoints"
                )
            model.requires_grad_(True)
        else:
            self.lora = LoraConfig(
                r=cfg.lora_r,
                alpha=cfg.lora_alpha,
                dropout=cfg.lora_dropout,
                targets=cfg.lora_targets,
                use_rslora=cfg.use_rslora,
            )
            torch.manual_seed(cfg.seed)  # identical A on every rank
            self.injection = inject_lora_tp(model, self.lora)
        if cfg.activation_checkpointing:
            model.gradient_checkpointing_enable(
                gradient_checkpointing_kwargs={"use_reentrant": False}
            )
        self.resume_path = self._find_resume() if cfg.resume else None
        if self.resume_path is not None:
            self._load_resume_weights(model)
        threshold = None if cfg.full_finetune else lora_persistence_threshold(model)
        self.ds_cfg = prepare_for_run(raw_cfg, self.layout, self.out, threshold, cfg.lr)

        self.order = DataOrder(len(self.train_set), self.layout.global_batch, cfg.seed)
        self.total_steps = cfg.max_steps or max(1, int(cfg.epochs * self.order.steps_per_epoch))
        self.eval_every = cfg.eval_every or max(1, self.total_steps // 5)
        warmup = min(cfg.warmup_steps, self.total_steps // 10)

        def schedule(optimizer):
            return torch.optim.lr_scheduler.LambdaLR(
                optimizer,
                lambda s: lr_multiplier(s, self.total_steps, warmup, cfg.lr_schedule),
            )

        trainable = [p for p in model.parameters() if p.requires_grad]
        self.engine, self.optimizer, _, self.scheduler = deepspeed.initialize(
            model=model,
            model_parameters=trainable,
            config=self.ds_cfg,
            lr_scheduler=schedule,
            mpu=self.mpu,
        )
        self.device = self.engine.device
        self.step = 0
        self.train_losses: list[tuple[int, float]] = []
        self.step_times: list[float] = []
        if self.resume_path is not None:
            self._restore_engine_state()
        self.preemption = PreemptionWatch(self.device)
        self.monitor = Monitor(self.out, self.is_main, self.total_steps, self.step)
        if self.resume_path is not None:
            self.monitor.log(f"resumed from {self.resume_path} at step {self.step}")

    # -- data -----------------------------------------------------------------------------------
    def _batch(self, dataset, indices: list[int]) -> dict[str, torch.Tensor]:
        from lora_dist.data import collate

        batch = collate([dataset[i] for i in indices], self.tokenizer.pad_token_id)
        return {k: v.to(self.device) for k, v in batch.items()}

    def _all_reduce(self, values: list[float]) -> list[float]:
        import torch.distributed as dist

        t = torch.tensor(values, dtype=torch.float64, device=self.device)
        if dist.is_initialized() and self.world > 1:
            dist.all_reduce(t)
        return t.tolist()

    # -- evaluation -----------------------------------------------------------------------------
    @torch.no_grad()
    def dev_loss(self) -> float:
        """Token-weighted mean loss over the whole dev split, sharded over data-parallel ranks.

        Every rank runs the same number of forward passes (ZeRO-3 gathers collectively), so a
        rank whose shard runs out repeats an example with weight zero.
        """
        self.engine.eval()
        n, dp, micro = len(self.dev_set), self.layout.dp, self.layout.micro_batch
        mine = list(range(self.dp_rank, n, dp))
        batches = math.ceil(math.ceil(n / dp) / micro)
        total = count = 0.0
        for b in range(batches):
            idx = mine[b * micro : (b + 1) * micro]
            weight = 1.0 if idx else 0.0
            batch = self._batch(self.dev_set, idx or [0])
            loss = self.engine(**batch).loss.float().item()
            tokens = float((batch["labels"][:, 1:] != -100).sum())
            total += weight * loss * tokens
            count += weight * tokens
        self.engine.train()
        total, count = self._all_reduce([total / self.layout.tp, count / self.layout.tp])
        return total / max(count, 1.0)

    def task_eval(self) -> dict[str, float] | None:
        """Greedy generation on the dev split, scored by the task (collective; rank 0 returns)."""
        from lora_dist.training.evaluation import evaluate_engine

        self.engine.eval()
        metrics = evaluate_engine(
            self.engine.module,
            self.tokenizer,
            self.task,
            self.data_dir,
            "dev",
            self.rank,
            self.world,
            self.dp_rank,
            self.layout.dp,
            max_new_tokens=self.cfg.eval_max_new_tokens,
            batch_size=self.cfg.eval_batch_size,
            limit=self.cfg.eval_limit,
            predictions_path=self.out / "eval" / f"predictions_step{self.step}.jsonl",
        )
        self.engine.train()
        if metrics is not None:
            numeric = {k: float(v) for k, v in metrics.items() if isinstance(v, (int, float))}
            self.monitor.scalars(self.step, {f"dev/{k}": v for k, v in numeric.items()})
            self.monitor.log(f"step {self.step}: dev {self.task.name} {numeric}")
        return metrics

    # -- training -------------------------------------------------------------------------------
    def train_step(self) -> dict[str, float]:
        micro_batches = self.order.rank_micro_batches(
            self.step, self.dp_rank, self.layout.dp, self.layout.micro_batch
        )
        losses, tokens = [], 0.0
        for indices in micro_batches:
            batch = self._batch(self.train_set, indices)
            loss = self.engine(**batch).loss
            self.engine.backward(loss)
            self.engine.step()
            losses.append(loss.detach().float().item())
            tokens += float(batch["attention_mask"].sum())
        loss_sum, tokens = self._all_reduce([sum(losses) / len(losses), tokens])
        grad_norm = self.engine.get_global_grad_norm()
        return {
            "loss": loss_sum / self.world,
            "tokens": tokens / self.layout.tp,
            "grad_norm": float(grad_norm) if grad_norm is not None else float("nan"),
        }

    def fit(self) -> dict[str, Any]:
        cfg, mon = self.cfg, self.monitor
        self.stopped_early = False
        self.task_metrics: dict[str, float] | None = None
        if self.injection is not None:
            mon.log(self.injection.summary())
        mon.log(
            f"world {self.world} = DP {self.layout.dp} x TP {self.layout.tp}; global batch "
            f"{self.layout.global_batch} = micro {self.layout.micro_batch} x accum "
            f"{self.layout.grad_accum} x DP {self.layout.dp}; {self.total_steps} steps"
        )
        first_dev = self.dev_loss()
        mon.scalars(self.step, {"dev/loss": first_dev})
        mon.log(f"step {self.step}: dev loss {first_dev:.4f}")
        last: dict[str, float] = {}
        dev = first_dev
        tokens_total, started = 0.0, time.perf_counter()
        while self.step < self.total_steps:
            t0 = time.perf_counter()
            last = self.train_step()
            dt = time.perf_counter() - t0
            self.step += 1
            self.train_losses.append((self.step, last["loss"]))
            self.step_times.append(dt)
            tokens_total += last["tokens"]
            tps = last["tokens"] / dt
            mon.scalars(
                self.step,
                {
                    "train/loss": last["loss"],
                    "lr": self.scheduler.get_last_lr()[0],
                    "grad_norm": last["grad_norm"],
                    "tokens_per_s": tps,
                    "samples_per_s": self.layout.global_batch / dt,
                },
            )
            mon.progress(self.step, last["loss"], tps)
            self._append_log(last)
            if self.step % self.eval_every == 0 or self.step == self.total_steps:
                dev = self.dev_loss()
                mon.scalars(self.step, {"dev/loss": dev})
                mon.log(f"step {self.step}: train loss {last['loss']:.4f}, dev loss {dev:.4f}")
            if cfg.task_eval_every and self.step % cfg.task_eval_every == 0:
                self.task_metrics = self.task_eval()
            if cfg.save_every and (
                self.step % cfg.save_every == 0 or self.step == self.total_steps
            ):
                self.save_checkpoint()
            if self.preemption.should_stop():
                mon.log(f"stopping at step {self.step} on {self.preemption.signal_name()}")
                self.save_checkpoint()
                mon.close()
                self.stopped_early = True
                return {"steps": self.step, "preempted": True}
        elapsed = time.perf_counter() - started
        if not cfg.skip_task_eval:
            self.task_metrics = self.task_eval()
        self.save_final()
        return self.finish(first_dev, dev, last, tokens_total / elapsed, elapsed)

    def _append_log(self, values: dict[str, float]) -> None:
        """One JSON line per step in train_log.jsonl (rank 0); a resumed run appends to it."""
        import json

        if self.is_main:
            row = {"step": self.step, "lr": self.scheduler.get_last_lr()[0], **values}
            with open(self.out / "train_log.jsonl", "a") as f:
                f.write(json.dumps(row) + "\n")

    def _save_adapter(self, where: Path, state: dict[str, torch.Tensor], save_adapter) -> None:
        layers = self.injection.layers.values()
        save_adapter(
            where,
            state,
            self.lora,
            self.injection.target_modules,
            self.engine.module.config,
            str(self.cfg.model or self.model_dir),
            fan_in_fan_out=any(layer.fan_in_fan_out for layer in layers),
        )

    def save_final(self) -> None:
        from lora_dist.adapter import save_adapter
        from lora_dist.distributed.tp import assert_tp_replicas_identical
        from lora_dist.distributed.zero import gather_lora_state

        if self.lora is None:
            return  # full fine-tuning is the memory/accuracy baseline; it ships no adapter
        state = gather_lora_state(self.engine.module)
        if self.mpu is not None:  # we save rank 0's factors for all TP peers
            self.monitor.log(assert_tp_replicas_identical(self.engine.module))
        if self.is_main:
            self._save_adapter(self.out / "adapter", state, save_adapter)

    def finish(
        self, first_dev: float, dev: float, last: dict[str, float], tps: float, elapsed: float
    ) -> dict[str, Any]:
        from lora_dist.distributed.zero import (
            frozen_local_numel,
            local_param_numel,
            model_state_bytes,
        )
        from lora_dist.training.monitor import memory_kind, peak_memory_bytes

        local, total = local_param_numel(self.engine.module)
        w = self.world
        per_rank = [0.0] * (4 * w)
        per_rank[self.rank] = float(peak_memory_bytes())
        per_rank[w + self.rank] = float(local)
        per_rank[2 * w + self.rank] = float(frozen_local_numel(self.engine.module))
        per_rank[3 * w + self.rank] = float(model_state_bytes(self.engine)["total"])
        per_rank = self._all_reduce(per_rank)
        trainable = sum(
            int(getattr(p, "ds_numel", p.numel()))
            for p in self.engine.module.parameters()
            if p.requires_grad
        )
        metrics = {
            "steps": self.step,
            "train_losses": self.train_losses,
            "resumed_from": str(self.resume_path) if self.resume_path else None,
            "mode": "full_finetune" if self.cfg.full_finetune else "lora",
            "train_loss": last.get("loss"),
            "dev_loss_initial": first_dev,
            "dev_loss": dev,
            "task_metrics": self.task_metrics,
            "tokens_per_s": tps,
            "step_time_median_s": float(np.median(self.step_times)) if self.step_times else None,
            "elapsed_s": elapsed,
            "peak_memory_bytes_per_rank": [int(x) for x in per_rank[:w]],
            "peak_memory_kind": memory_kind(),
            "param_numel_per_rank": [int(x) for x in per_rank[w : 2 * w]],
            "frozen_param_numel_per_rank": [int(x) for x in per_rank[2 * w : 3 * w]],
            "model_state_bytes_per_rank": [int(x) for x in per_rank[3 * w :]],
            "model_state_bytes_rank0": model_state_bytes(self.engine),
            "trainable_params": trainable,
            "total_params": total,
            "world_size": self.world,
            "dp": self.layout.dp,
            "tp": self.layout.tp,
            "zero_stage": self.stage,
            "global_batch": self.layout.global_batch,
        }
        for r, peak in enumerate(metrics["peak_memory_bytes_per_rank"]):
            self.monitor.scalars(self.step, {f"memory/peak_bytes_rank{r}": peak})
        hparams = {k: v for k, v in asdict(self.cfg).items() if v is not None}
        self.monitor.hparams(hparams, {"hparam/dev_loss": dev})
        if self.is_main:
            write_json_atomic(self.out / "metrics.json", metrics)
        self.monitor.log(
            f"done: {self.step} steps, dev loss {first_dev:.4f} -> {dev:.4f}, "
            f"{tps:,.0f} tokens/s, outputs in {self.out}"
        )
        self.monitor.close()
        return metrics


def train(cfg: TrainConfig) -> int:
    """Run one training job; returns the process exit code (EXIT_PREEMPTED after a signal)."""
    import torch.distributed as dist

    trainer = Trainer(cfg)
    trainer.fit()
    trainer.preemption.close()
    if dist.is_initialized():  # a clean teardown; without it gloo can abort the process at exit
        dist.barrier()
        dist.destroy_process_group()
    return EXIT_PREEMPTED if trainer.stopped_early else 0


def main(argv: list[str] | None = None) -> int:
    """`launcher/train.py`: the training flags without a subcommand."""
    parser = argparse.ArgumentParser(prog="train.py", description=__doc__)
    configure_train(parser)
    args = parser.parse_args(argv)
    from lora_dist.adapter import AdapterError
    from lora_dist.training.checkpoint_files import CheckpointError

    try:
        return run_train(args)
    except (ConfigError, AdapterError, CheckpointError, FileNotFoundError, ValueError) as exc:
        # Bad input (config, data, model, checkpoint): one line that says what to change.
        if os.environ.get("LORA_DIST_DEBUG") == "1":
            raise
        print(f"lora-dist: error: {exc}", file=sys.stderr)
        return 2
