"""Fine-tune a causal LM with LoRA under DeepSpeed (ZeRO-3, tensor parallelism).

Launch it with any launcher; each rank runs the same command:

    deepspeed --num_gpus 8 launcher/train.py --ds_config ds_configs/zero3.json ...
    torchrun --nproc_per_node 8 -m lora_dist.cli train --ds_config ...
    srun python launcher/train.py ...   (see slurm/)
"""

from __future__ import annotations

from lora_dist.distributed.launch import prepare_rank_process
from lora_dist.training.config import TrainConfig
from lora_dist.training.trainer import train

OPTIONS = TrainConfig


def run(opts: TrainConfig) -> int:
    """Train; the exit code is 75 (EXIT_PREEMPTED) when a stop signal ended the run early."""
    prepare_rank_process()
    return train(opts)
