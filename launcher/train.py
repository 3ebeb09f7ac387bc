"""Entry point for `deepspeed launcher/train.py ...`, torchrun, srun and mpirun: see lora_dist.train."""

import sys

from lora_dist.train import main

if __name__ == "__main__":
    sys.exit(main())
