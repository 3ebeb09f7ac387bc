"""Saving and resuming a run's LoRA-only state: the Checkpointer a LoRA trainer holds.

Every method is a collective: all ranks call it at the same point. Saving gathers the LoRA
factors, their Adam state and every rank's RNG state, and rank 0 writes `checkpoints/step-<N>/`
(lora_dist.training.checkpoint_files has the layout). Resuming happens around the engine's
creation, which is why the engine is an argument rather than a member: `find_resume` and
`load_weights` run on the bare model before `deepspeed.initialize` (the engine copies the
weights it starts from), `restore` puts the optimizer, schedule, fp16 loss scale and RNG back
afterwards.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
from torch import nn

from lora_dist.adapter import AdapterSpec, load_adapter_into, read_adapter_weights
from lora_dist.atomic import write_json_atomic
from lora_dist.distributed.collective import barrier, broadcast_object, gather_objects_to_main
from lora_dist.distributed.ds_config import BatchLayout
from lora_dist.distributed.engine_state import (
    gather_lora_optimizer_state,
    loss_scaler_state,
    optimizer_step_counts,
    restore_lora_optimizer_state,
    restore_loss_scaler_state,
    rng_state,
    seed_everything,
    set_rng_state,
)
from lora_dist.distributed.launch import RankInfo
from lora_dist.distributed.zero import gather_lora_state
from lora_dist.errors import ConfigError
from lora_dist.lora import LoraConfig
from lora_dist.training.checkpoint_files import (
    base_fingerprint,
    check_compatible,
    find_checkpoint,
    load_tensors,
    save_tensors,
    write_checkpoint,
)
from lora_dist.training.monitor import Monitor
from lora_dist.training.schedule import DataOrder


def run_identity(
    model_dir: Path, lora: LoraConfig, target_modules: list[str] | str
) -> dict[str, Any]:
    """What a checkpoint must match to be resumed: the base model and the LoRA settings."""
    settings = {
        "r": lora.r,
        "alpha": lora.alpha,
        "targets": target_modules,
        "use_rslora": lora.use_rslora,
    }
    return {"base": base_fingerprint(model_dir), "lora": settings}


class Checkpointer:
    """Writes and restores resumable checkpoints of one LoRA run."""

    def __init__(
        self,
        output_dir: Path,
        identity: dict[str, Any],
        adapter: AdapterSpec,
        layout: BatchLayout,
        order: DataOrder,
        ranks: RankInfo,
        monitor: Monitor,
        *,
        total_steps: int,
        keep_last: int,
        seed: int,
    ) -> None:
        self.output_dir = Path(output_dir)
        self.identity = identity
        """run_identity(): refused on resume when it differs, recorded in every manifest."""
        self.adapter = adapter
        self.layout = layout
        self.order = order
        self.ranks = ranks
        self.monitor = monitor
        self.total_steps = total_steps
        self.keep_last = keep_last
        self.seed = seed
        """The run's seed: a resume on another world size reseeds from it."""

    @property
    def is_main(self) -> bool:
        return self.ranks.rank == 0

    def find_resume(self, spec: str) -> Path | None:
        """The checkpoint `--resume spec` names, checked against this run's identity.

        Rank 0 picks (skipping damaged ones under 'auto') and every rank takes its word, so
        all load the same one. None when 'auto' finds nothing.
        """
        choice = None
        if self.is_main:
            found = find_checkpoint(self.output_dir, spec, self.monitor.log)
            choice = str(found) if found else None
            if found is None:
                self.monitor.log(f"no checkpoint in {self.output_dir}; starting from step 0")
        choice = broadcast_object(choice)
        if choice is None:
            return None
        path = Path(choice)
        check_compatible(path, self.identity)
        return path

    def load_weights(self, path: Path, model: nn.Module) -> None:
        """Copy the checkpoint's LoRA factors into the model, before the engine is built."""
        load_adapter_into(model, read_adapter_weights(path / "adapter"))

    def restore(self, path: Path, engine: Any) -> int:
        """Put optimizer state, LR schedule and RNG back into a fresh engine; returns the step."""
        state = json.loads((path / "trainer_state.json").read_text())
        if state["global_batch"] != self.layout.global_batch:
            raise ConfigError(
                f"{path} was trained with global batch {state['global_batch']}, this run has "
                f"{self.layout.global_batch}; the data position would not carry over. Keep "
                "train_batch_size unchanged when resuming."
            )
        restore_lora_optimizer_state(
            engine, load_tensors(path / "optimizer.safetensors"), state["adam_steps"]
        )
        lambdas = [None] * len(state["scheduler"]["base_lrs"])  # functions are not saved
        engine.lr_scheduler.load_state_dict({**state["scheduler"], "lr_lambdas": lambdas})
        restore_loss_scaler_state(engine, state.get("loss_scaler"))
        engine.skipped_steps = int(state.get("skipped_steps", 0))
        last_lrs = state["scheduler"]["_last_lr"]
        for group, lr in zip(engine.optimizer.param_groups, last_lrs, strict=True):
            group["lr"] = lr
        step = state["step"]
        engine.global_steps = step
        engine.global_samples = step * self.layout.global_batch
        engine.micro_steps = step * self.layout.grad_accum
        rank, world = self.ranks.rank, self.ranks.world_size
        rng = load_tensors(path / "rng.safetensors")
        if state["world_size"] == world:
            set_rng_state(rng[f"rank{rank}.torch"], state["rng"][rank], rng.get(f"rank{rank}.cuda"))
        else:  # another world size: fresh but reproducible streams per rank
            seed_everything(self.seed + 1000 * step + rank)
        return step

    def save(self, step: int, engine: Any) -> Path | None:
        """Write checkpoints/step-<step>/ (all ranks gather, rank 0 writes); the path on rank 0."""
        lora_state = gather_lora_state(engine.module)
        optim_state = gather_lora_optimizer_state(engine)
        torch_rng, other_rng = rng_state()
        cuda_rng = torch.cuda.get_rng_state() if torch.cuda.is_available() else None
        rngs = gather_objects_to_main((torch_rng, cuda_rng, other_rng))
        path = None
        if self.is_main:
            layout = self.layout
            schedule = engine.lr_scheduler.state_dict()
            state = {
                "step": step,
                "epoch": self.order.epoch_of(step),
                "samples_consumed": step * layout.global_batch,
                "global_batch": layout.global_batch,
                "total_steps": self.total_steps,
                "seed": self.seed,
                "world_size": self.ranks.world_size,
                "adam_steps": optimizer_step_counts(engine),
                "scheduler": {k: v for k, v in schedule.items() if k != "lr_lambdas"},
                "loss_scaler": loss_scaler_state(engine),
                "skipped_steps": int(getattr(engine, "skipped_steps", 0)),
                "rng": [r[2] for r in rngs],
            }
            rng_tensors = {f"rank{r}.torch": t for r, (t, _, _) in enumerate(rngs)}
            rng_tensors |= {f"rank{r}.cuda": c for r, (_, c, _) in enumerate(rngs) if c is not None}

            def contents(tmp: Path) -> None:
                self.adapter.save(tmp / "adapter", lora_state)
                save_tensors(tmp / "optimizer.safetensors", optim_state)
                save_tensors(tmp / "rng.safetensors", rng_tensors)
                write_json_atomic(tmp / "trainer_state.json", state, sort_keys=False)

            world = {"world_size": self.ranks.world_size, "dp": layout.dp, "tp": layout.tp}
            extra = {**self.identity, "world": world}
            path = write_checkpoint(self.output_dir, step, contents, extra, self.keep_last)
            self.monitor.log(f"checkpoint saved: {path}")
        barrier()
        return path
