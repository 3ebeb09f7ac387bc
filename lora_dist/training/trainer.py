"""The training job: LoRA (or full fine-tuning) of a causal LM inside a DeepSpeed engine.

`Trainer.__init__` is the setup, top to bottom: join the process group, tokenize the data,
build the model so that no rank ever holds the whole base under ZeRO-3, inject LoRA, resume
if asked, and hand only the trainable parameters to the optimizer. `fit()` is the loop: a
deterministic data order, TensorBoard scalars and a progress bar from rank 0, dev-loss and
task evaluation, checkpoints through the Checkpointer, and a PEFT-format adapter at the end.
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

import deepspeed
import torch
from transformers import AutoTokenizer

from lora_dist.adapter import AdapterSpec
from lora_dist.data.freeform import perplexity
from lora_dist.distributed.collective import all_reduce_sum_, barrier
from lora_dist.distributed.ds_config import (
    AUTO_SIZED,
    batch_layout,
    has_auto,
    load_ds_config,
    model_dtype,
    prepare_for_run,
    zero3_budgets,
)
from lora_dist.distributed.engine_state import dynamic_loss_scale, seed_everything
from lora_dist.distributed.host_memory import pin_mmap_threshold
from lora_dist.distributed.launch import init_distributed, shutdown_distributed
from lora_dist.distributed.loading import load_base_model
from lora_dist.distributed.preemption import PreemptionWatch
from lora_dist.distributed.tp import (
    assert_tp_replicas_identical,
    inject_lora_tp,
    shard_base_for_tp,
    zero_init_config,
)
from lora_dist.distributed.zero import (
    gather_lora_state,
    gathered_sizes,
    lora_persistence_threshold,
    zero_stage,
)
from lora_dist.generate import GenerationStopped
from lora_dist.lora import LoraConfig
from lora_dist.models import resolve_model_dir
from lora_dist.tasks import get_task
from lora_dist.training.checkpointer import Checkpointer, run_identity
from lora_dist.training.config import TrainConfig
from lora_dist.training.data import generation_eval, load_training_data
from lora_dist.training.evaluation import DataShard, Decoding, EvalSplit, dev_loss, evaluate_engine
from lora_dist.training.monitor import Monitor, PeakMemory, peak_memory, reset_peak_memory
from lora_dist.training.report import run_report
from lora_dist.training.schedule import (
    MAX_SKIPPED_IN_A_ROW,
    DataOrder,
    lr_multiplier,
    step_until_applied,
)

EXIT_PREEMPTED = 75  # checkpoint written after SIGTERM/SIGUSR1: requeue me


class Trainer:
    """One run: setup in __init__, then fit()."""

    def __init__(self, cfg: TrainConfig) -> None:
        self.cfg = cfg
        self.out = Path(cfg.output_dir)
        pin_mmap_threshold(cfg.host_mmap_threshold)  # before anything large is allocated
        raw_cfg = load_ds_config(cfg.ds_config)
        self.ranks = init_distributed()
        self.rank, self.world = self.ranks.rank, self.ranks.world_size
        self.layout = batch_layout(raw_cfg, self.world)
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
        self.data = load_training_data(cfg, self.tokenizer, self.task, self.ranks.local_rank)
        self.order = DataOrder(self.data.units, self.layout.global_batch, cfg.seed)
        self.total_steps = cfg.max_steps or max(1, int(cfg.epochs * self.order.steps_per_epoch))
        self.eval_every = cfg.eval_every or max(1, self.total_steps // 5)
        self.monitor = Monitor(self.out, self.is_main, self.total_steps)

        base_cfg = prepare_for_run(raw_cfg, self.layout, self.out, None, cfg.lr)
        model = load_base_model(self.model_dir, zero_init_config(base_cfg), self.stage)
        self.train_batches, self.dev_batches = self.data.batches(
            self.tokenizer.pad_token_id, model.config._attn_implementation, model_dtype(raw_cfg)
        )
        self.mpu = shard_base_for_tp(model, base_cfg)  # AutoTP must see the bare linears
        self.adapter: AdapterSpec | None = None
        """What the adapter files record; None under --full_finetune, which ships no adapter."""
        self.injection_summary = ""
        if cfg.full_finetune:
            model.requires_grad_(True)
        else:
            self.adapter = self._inject_lora(model)
        if cfg.activation_checkpointing:
            model.gradient_checkpointing_enable(
                gradient_checkpointing_kwargs={"use_reentrant": False}
            )
        self.checkpointer: Checkpointer | None = None
        if self.adapter is not None:
            identity = run_identity(
                self.model_dir, self.adapter.config, self.adapter.target_modules
            )
            if self.data.identity() is not None:  # user data or packing: resume onto the same
                identity["data"] = self.data.identity()
            self.checkpointer = Checkpointer(
                self.out,
                identity,
                self.adapter,
                self.layout,
                self.order,
                self.ranks,
                self.monitor,
                total_steps=self.total_steps,
                keep_last=cfg.keep_last,
                seed=cfg.seed,
            )
        self.resumed_from: Path | None = None
        if cfg.resume and self.checkpointer is not None:
            self.resumed_from = self.checkpointer.find_resume(cfg.resume)
        if self.resumed_from is not None:
            self.checkpointer.load_weights(self.resumed_from, model)

        threshold = None if cfg.full_finetune else lora_persistence_threshold(model)
        trainable = [p for p in model.parameters() if p.requires_grad]
        n_trainable = sum(int(getattr(p, "ds_numel", p.numel())) for p in trainable)
        budgets = zero3_budgets(*gathered_sizes(model), n_trainable)
        if has_auto(raw_cfg):
            zero = raw_cfg["zero_optimization"]
            auto = {k: f"{budgets[k]:,}" for k in AUTO_SIZED if zero.get(k) == "auto"}
            self.monitor.log(f"ZeRO sizes from the model (elements): {auto}")
        ds_cfg = prepare_for_run(raw_cfg, self.layout, self.out, threshold, cfg.lr, budgets)
        warmup = min(cfg.warmup_steps, self.total_steps // 10)

        def schedule(optimizer: torch.optim.Optimizer) -> torch.optim.lr_scheduler.LambdaLR:
            return torch.optim.lr_scheduler.LambdaLR(
                optimizer, lambda s: lr_multiplier(s, self.total_steps, warmup, cfg.lr_schedule)
            )

        self.engine, _, _, self.scheduler = deepspeed.initialize(
            model=model,
            model_parameters=trainable,
            config=ds_cfg,
            lr_scheduler=schedule,
            mpu=self.mpu,
        )
        self.device = self.engine.device
        self.step = 0
        self.checkpointed_step: int | None = None
        """The step of the newest resumable checkpoint of this run."""
        if self.resumed_from is not None:
            self.step = self.checkpointer.restore(self.resumed_from, self.engine)
            self.checkpointed_step = self.step
            self.monitor.log(f"resumed from {self.resumed_from} at step {self.step}")
        self.preemption = PreemptionWatch(self.device)

        # What fit() records.
        self.train_losses: list[tuple[int, float]] = []
        self.step_times: list[float] = []
        self.task_metrics: dict[str, float] | None = None
        self.peak_reset = False
        """Whether the training peak could be reset after setup (see monitor.reset_peak_memory)."""
        self.training_peak: PeakMemory | None = None
        """This rank's peak memory from the first training step to the last, evaluations between
        steps included, loading, setup and the final evaluation not."""
        self.eval_stopped = False
        """True when a stop signal ended a task evaluation early."""
        self.stopped_early = False
        """True when a stop signal ended the run after a checkpoint (exit EXIT_PREEMPTED)."""

    def _inject_lora(self, model: torch.nn.Module) -> AdapterSpec:
        cfg = self.cfg
        lora = LoraConfig(
            r=cfg.lora_r,
            alpha=cfg.lora_alpha,
            dropout=cfg.lora_dropout,
            targets=cfg.lora_targets,
            use_rslora=cfg.use_rslora,
        )
        torch.manual_seed(cfg.seed)  # identical A on every rank
        injection = inject_lora_tp(model, lora)
        self.injection_summary = injection.summary()
        return AdapterSpec(
            config=lora,
            target_modules=injection.target_modules,
            base_config=model.config,
            base_name_or_path=str(cfg.model or self.model_dir),
            fan_in_fan_out=any(layer.fan_in_fan_out for layer in injection.layers.values()),
        )

    # -- evaluation -----------------------------------------------------------------------------
    def dev_loss(self) -> float:
        """The dev split's token-weighted loss (collective), logged with its own progress."""
        with self.monitor.phase(f"dev loss at step {self.step}") as progress:
            loss = dev_loss(self.engine, self.dev_batches, self.layout, self.dp_rank, progress)
        self.monitor.scalars(self.step, {"dev/loss": loss, "dev/perplexity": perplexity(loss)})
        return loss

    def task_eval(self) -> dict[str, float] | None:
        """Greedy generation on the dev split, scored by the task, or by exact match and ROUGE-L
        for user data (collective; rank 0 returns)."""
        cfg = self.cfg
        self.engine.eval()
        name = f"{self.task.name} eval at step {self.step}"
        try:
            if self.data.user is not None:
                name = f"generation eval at step {self.step}"
                path = self.out / "eval" / f"generations_step{self.step}.jsonl"
                with self.monitor.phase(name):
                    metrics = generation_eval(
                        self.engine.module,
                        self.tokenizer,
                        self.data.user,
                        cfg,
                        self.dp_rank,
                        self.layout.dp,
                        path,
                        stop=self.preemption.should_stop,  # generation can outlast a time limit
                    )
            else:
                metrics = self._task_metrics(name)
        except GenerationStopped as stopped:
            self.monitor.log(f"{name}: {stopped} on {self.preemption.signal_name()}")
            self.eval_stopped = True
            return None
        finally:
            self.engine.train()
        if metrics is not None:
            numeric = {k: float(v) for k, v in metrics.items() if isinstance(v, (int, float))}
            self.monitor.scalars(self.step, {f"dev/{k}": v for k, v in numeric.items()})
            self.monitor.log(f"step {self.step}: dev generations {numeric}")
        return metrics

    def _task_metrics(self, name: str) -> dict[str, float] | None:
        cfg = self.cfg
        with self.monitor.phase(name) as progress:
            metrics = evaluate_engine(
                self.engine.module,
                self.tokenizer,
                EvalSplit(self.task, self.data_dir, "dev", cfg.eval_limit),
                Decoding(cfg.eval_max_new_tokens, cfg.eval_batch_size),
                DataShard(self.dp_rank, self.layout.dp),
                self.out / "eval" / f"predictions_step{self.step}.jsonl",
                progress,
                stop=self.preemption.should_stop,  # generation can outlast a time limit
            )
        return metrics

    # -- training -------------------------------------------------------------------------------
    def _accumulate(self) -> tuple[torch.Tensor, int]:
        """Forward and backward over this rank's micro-batches of the step, then the optimizer
        step; returns the mean micro-batch loss (on the device) and the tokens seen.

        Nothing here waits for the device: a host read of the loss between micro-batches would
        stall the CPU before ZeRO-3 could issue the next micro-batch's prefetches.
        """
        micro_batches = self.order.rank_micro_batches(
            self.step, self.dp_rank, self.layout.dp, self.layout.micro_batch
        )
        loss_sum = torch.zeros((), dtype=torch.float32, device=self.device)
        tokens = 0
        for indices in micro_batches:
            batch = self.train_batches.batch(indices, self.device)
            tokens += batch.tokens  # counted on the host, before the copy
            loss = self.engine(**batch.inputs).loss
            self.engine.backward(loss)
            self.engine.step()
            loss_sum += loss.detach().float()
        return loss_sum / len(micro_batches), tokens

    def train_step(self) -> dict[str, float]:
        """One optimizer step (retried while fp16 overflow skips it); its mean loss, tokens and
        gradient norm over all ranks, read back to the host once, after the step."""
        (loss, tokens), skipped = step_until_applied(
            self._accumulate, self.engine.was_step_applied, MAX_SKIPPED_IN_A_ROW
        )
        if skipped:
            self.monitor.log(
                f"step {self.step + 1}: gradient overflow skipped {skipped} tries; "
                f"loss scale now {self.engine.optimizer.loss_scale:g}"
            )
        grad_norm = self.engine.get_global_grad_norm()
        grad_norm = float("nan") if grad_norm is None else grad_norm
        values = torch.stack(
            [
                loss.double(),
                torch.as_tensor(float(tokens), dtype=torch.float64, device=self.device),
                torch.as_tensor(grad_norm, dtype=torch.float64, device=self.device),
            ]
        )
        loss_sum, tokens_sum, norm_sum = all_reduce_sum_(values).tolist()
        return {
            "loss": loss_sum / self.world,
            "tokens": tokens_sum / self.layout.tp,
            "grad_norm": norm_sum / self.world,  # the same global norm on every rank
        }

    def fit(self) -> dict[str, Any]:
        cfg, mon, layout = self.cfg, self.monitor, self.layout
        if self.injection_summary:
            mon.log(self.injection_summary)
        mon.log(
            f"world {self.world} = DP {layout.dp} x TP {layout.tp}; global batch "
            f"{layout.global_batch} = micro {layout.micro_batch} x accum "
            f"{layout.grad_accum} x DP {layout.dp}; {self.total_steps} steps on {self.device}"
        )
        mon.log(self.data.summary())
        first_dev = dev = self.dev_loss()
        mon.log(f"step {self.step}: dev loss {first_dev:.4f}")
        self.peak_reset = reset_peak_memory()  # loading and setup are not the training peak
        mon.start(self.step)
        last: dict[str, float] = {}
        tokens_total, started = 0.0, time.perf_counter()
        final_saved = False
        while self.step < self.total_steps:
            t0 = time.perf_counter()
            last = self.train_step()
            dt = time.perf_counter() - t0
            self.step += 1
            self.train_losses.append((self.step, last["loss"]))
            self.step_times.append(dt)
            tokens_total += last["tokens"]
            tps = last["tokens"] / dt
            lr = self.scheduler.get_last_lr()[0]
            mon.scalars(
                self.step,
                {
                    "train/loss": last["loss"],
                    "lr": lr,
                    "grad_norm": last["grad_norm"],
                    "tokens_per_s": tps,
                    "samples_per_s": layout.global_batch / dt,
                },
            )
            mon.progress(self.step, last["loss"], tps, dt)
            scale = dynamic_loss_scale(self.engine)  # fp16 only
            self._append_log(
                {"step": self.step, "lr": lr, **last} | ({"loss_scale": scale} if scale else {})
            )
            final = self.step == self.total_steps
            if final:  # the result is on disk before any evaluation can fail or be cut off
                self.training_peak = peak_memory()
                self.save_final()
                final_saved = True
            if self.step % self.eval_every == 0 or final:
                dev = self.dev_loss()
                mon.log(f"step {self.step}: train loss {last['loss']:.4f}, dev loss {dev:.4f}")
            due = cfg.task_eval_every and self.step % cfg.task_eval_every == 0
            if due and not (final and not cfg.skip_task_eval):  # the final one follows below
                self.task_metrics = self.task_eval()
            if cfg.save_every and (self.step % cfg.save_every == 0 or final):
                self._checkpoint()
            if self.preemption.should_stop():
                return self._stop(f"at step {self.step}")
        elapsed = time.perf_counter() - started
        if self.training_peak is None:  # resumed at the last step: no training ran
            self.training_peak = peak_memory()
        if not final_saved:
            self.save_final()
        if not cfg.skip_task_eval:
            metrics = self.task_eval()
            if self.eval_stopped:  # the requeued job resumes here and only evaluates
                return self._stop("during the final evaluation")
            self.task_metrics = metrics
        return self.finish(first_dev, dev, last, tokens_total / elapsed, elapsed)

    def _checkpoint(self) -> None:
        self.checkpointer.save(self.step, self.engine)
        self.checkpointed_step = self.step

    def _stop(self, where: str) -> dict[str, Any]:
        """Checkpoint (unless this step has one) and end the run with EXIT_PREEMPTED."""
        self.monitor.log(f"stopping {where} on {self.preemption.signal_name()}")
        if self.checkpointer is not None and self.checkpointed_step != self.step:
            self._checkpoint()  # --full_finetune keeps no checkpoints
        self.monitor.close()
        self.stopped_early = True
        return {"steps": self.step, "preempted": True}

    def _append_log(self, row: dict[str, float]) -> None:
        """One JSON line per step in train_log.jsonl (rank 0); a resumed run appends to it."""
        if self.is_main:
            with open(self.out / "train_log.jsonl", "a") as f:
                f.write(json.dumps(row) + "\n")

    def save_final(self) -> None:
        """The final adapter in PEFT format (collective: every rank gathers, rank 0 writes)."""
        if self.adapter is None:
            return  # full fine-tuning is the memory/accuracy baseline; it ships no adapter
        state = gather_lora_state(self.engine.module)
        if self.mpu is not None:  # we save rank 0's factors for all TP peers
            self.monitor.log(assert_tp_replicas_identical(self.engine.module))
        if self.is_main:
            self.adapter.save(self.out / "adapter", state)
        barrier()  # no rank starts evaluating before the result is on disk

    def finish(
        self, first_dev: float, dev: float, last: dict[str, float], tps: float, elapsed: float
    ) -> dict[str, Any]:
        """Write metrics.json (rank 0; a collective) and close the monitor."""
        metrics = run_report(self, first_dev, dev, last, tps, elapsed)
        self.monitor.log(
            f"done: {self.step} steps, dev loss {first_dev:.4f} -> {dev:.4f}, "
            f"{tps:,.0f} tokens/s, outputs in {self.out}"
        )
        self.monitor.close()
        return metrics


def train(cfg: TrainConfig) -> int:
    """Run one training job; returns the process exit code (EXIT_PREEMPTED after a signal)."""
    trainer = Trainer(cfg)
    trainer.fit()
    trainer.preemption.close()
    shutdown_distributed()
    return EXIT_PREEMPTED if trainer.stopped_early else 0
