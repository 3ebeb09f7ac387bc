"""Entry point for deepspeed, torchrun, srun and mpirun launches: see lora_dist.training.trainer."""

import sys

from lora_dist.training.trainer import main

if __name__ == "__main__":
    sys.exit(main())
