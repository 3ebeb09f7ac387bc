"""Checkpointing for the trainer: save and resume LoRA-only state, every rank together.

`CheckpointMixin` is mixed into `lora_dist.training.trainer.Trainer` and uses its attributes:
cfg, out, engine, optimizer, scheduler, layout, order, rank, world, is_main, step, total_steps,
lora, injection, model_dir, monitor, resume_path. Saving is a collective (every rank gathers its
part of the LoRA state, rank 0 writes); see lora_dist.training.checkpoint_files for the files.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

import torch

from lora_dist.distributed.ds_config import ConfigError


class CheckpointMixin:
    """save_checkpoint() and the resume steps of a Trainer."""

    def _expected_identity(self) -> dict[str, Any]:
        from lora_dist.training.checkpoint_files import base_fingerprint

        lora = {
            "r": self.lora.r,
            "alpha": self.lora.alpha,
            "targets": self.injection.target_modules,
            "use_rslora": self.lora.use_rslora,
        }
        return {"base": base_fingerprint(self.model_dir), "lora": lora}

    def _find_resume(self) -> Path | None:
        """Rank 0 picks the checkpoint and every rank takes its word, so all load the same."""
        from lora_dist.distributed.collective import broadcast_object
        from lora_dist.training.checkpoint_files import check_compatible, find_checkpoint

        choice = None
        if self.is_main:
            found = find_checkpoint(self.out, self.cfg.resume, lambda m: print(m, file=sys.stderr))
            choice = str(found) if found else None
            if found is None:
                print(f"no checkpoint in {self.out}; starting from step 0", file=sys.stderr)
        choice = broadcast_object(choice)
        if choice is None:
            return None
        path = Path(choice)
        check_compatible(path, self._expected_identity())
        return path

    def _load_resume_weights(self, model: torch.nn.Module) -> None:
        from lora_dist.adapter import load_adapter_into, read_adapter_weights

        load_adapter_into(model, read_adapter_weights(self.resume_path / "adapter"))

    def _restore_engine_state(self) -> None:
        from lora_dist.distributed.engine_state import restore_lora_optimizer_state, set_rng_state
        from lora_dist.training.checkpoint_files import load_tensors

        path = self.resume_path
        state = json.loads((path / "trainer_state.json").read_text())
        if state["global_batch"] != self.layout.global_batch:
            raise ConfigError(
                f"{path} was trained with global batch {state['global_batch']}, this run has "
                f"{self.layout.global_batch}; the data position would not carry over. Keep "
                "train_batch_size unchanged when resuming."
            )
        restore_lora_optimizer_state(
            self.engine, load_tensors(path / "optimizer.safetensors"), state["adam_steps"]
        )
        lambdas = [None] * len(state["scheduler"]["base_lrs"])  # functions are not saved
        self.scheduler.load_state_dict({**state["scheduler"], "lr_lambdas": lambdas})
        last_lrs = state["scheduler"]["_last_lr"]
        for group, lr in zip(self.optimizer.param_groups, last_lrs, strict=True):
            group["lr"] = lr
        self.step = state["step"]
        self.engine.global_steps = self.step
        self.engine.global_samples = self.step * self.layout.global_batch
        self.engine.micro_steps = self.step * self.layout.grad_accum
        rng = load_tensors(path / "rng.safetensors")
        if state["world_size"] == self.world:
            cuda = rng.get(f"rank{self.rank}.cuda")
            set_rng_state(rng[f"rank{self.rank}.torch"], state["rng"][self.rank], cuda)
        else:  # another world size: fresh but reproducible streams per rank
            from lora_dist.distributed.engine_state import seed_everything

            seed_everything(self.cfg.seed + 1000 * self.step + self.rank)

    def save_checkpoint(self) -> Path | None:
        """Write checkpoints/step-<N>/ (collective: every rank gathers, rank 0 writes)."""
        from lora_dist.adapter import save_adapter
        from lora_dist.distributed.collective import barrier, gather_objects_to_main
        from lora_dist.distributed.engine_state import (
            gather_lora_optimizer_state,
            optimizer_step_counts,
            rng_state,
        )
        from lora_dist.distributed.zero import gather_lora_state
        from lora_dist.training.checkpoint_files import save_tensors, write_checkpoint

        lora_state = gather_lora_state(self.engine.module)
        optim_state = gather_lora_optimizer_state(self.engine)
        torch_rng, other_rng = rng_state()
        cuda_rng = torch.cuda.get_rng_state() if torch.cuda.is_available() else None
        rngs = gather_objects_to_main((torch_rng, cuda_rng, other_rng))
        path = None
        if self.is_main:
            state = {
                "step": self.step,
                "epoch": self.order.epoch_of(self.step),
                "samples_consumed": self.step * self.layout.global_batch,
                "global_batch": self.layout.global_batch,
                "total_steps": self.total_steps,
                "seed": self.cfg.seed,
                "world_size": self.world,
                "adam_steps": optimizer_step_counts(self.engine),
                "scheduler": {
                    k: v for k, v in self.scheduler.state_dict().items() if k != "lr_lambdas"
                },
                "rng": [r[2] for r in rngs],
            }
            rng_tensors = {f"rank{r}.torch": t for r, (t, _, _) in enumerate(rngs)}
            rng_tensors |= {f"rank{r}.cuda": c for r, (_, c, _) in enumerate(rngs) if c is not None}

            def contents(tmp: Path) -> None:
                self._save_adapter(tmp / "adapter", lora_state, save_adapter)
                save_tensors(tmp / "optimizer.safetensors", optim_state)
                save_tensors(tmp / "rng.safetensors", rng_tensors)
                (tmp / "trainer_state.json").write_text(json.dumps(state, indent=2) + "\n")

            world = {"world_size": self.world, "dp": self.layout.dp, "tp": self.layout.tp}
            extra = {**self._expected_identity(), "world": world}
            path = write_checkpoint(self.out, self.step, contents, extra, self.cfg.keep_last)
            self.monitor.log(f"checkpoint saved: {path}")
        barrier()
        return path
