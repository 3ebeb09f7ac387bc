"""Entry point for deepspeed, torchrun, srun and mpirun launches: `lora-dist train` by path.

Every rank runs it with the same flags; see lora_dist.commands.train.
"""

import sys

from lora_dist.cli import main

if __name__ == "__main__":
    sys.exit(main(["train", *sys.argv[1:]]))
