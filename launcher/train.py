"""Entry point for deepspeed, torchrun, srun and mpirun launches: see lora_dist.train."""

import sys

from lora_dist.train import main

if __name__ == "__main__":
    sys.exit(main())
