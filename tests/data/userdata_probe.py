"""Probe launched by tests/data/test_userdata.py on 2 ranks: user data is tokenized once per node.

`python tests/data/userdata_probe.py TOKENIZER_DIR DATA CACHE OUT_DIR` with RANK, LOCAL_RANK,
WORLD_SIZE, MASTER_ADDR and MASTER_PORT set joins a gloo group, then calls prepare_user_data
inside node_main_first with a tokenizer that counts how often it tokenizes, and writes
OUT_DIR/rank<k>.json: that count, the tokens' Arrow files and the tokens themselves.
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path
from typing import Any

import torch.distributed as dist
from transformers import AutoTokenizer

from lora_dist.data.userdata import DataSpec, prepare_user_data
from lora_dist.distributed.collective import node_main_first


class CountingTokenizer:
    """The tokenizer, with a count of its tokenizing calls."""

    def __init__(self, tokenizer: Any) -> None:
        self._tokenizer = tokenizer
        self.calls = 0

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        self.calls += 1
        return self._tokenizer(*args, **kwargs)

    def __getattr__(self, name: str) -> Any:
        return getattr(self._tokenizer, name)


def main(tokenizer_dir: str, data: str, cache: str, out: str) -> None:
    dist.init_process_group("gloo")
    rank = dist.get_rank()
    tokenizer = CountingTokenizer(AutoTokenizer.from_pretrained(tokenizer_dir))
    with node_main_first(int(os.environ["LOCAL_RANK"])):
        loaded = prepare_user_data(DataSpec(train=data, dev_fraction=0.25), tokenizer, Path(cache))
    report = {
        "calls": tokenizer.calls,
        "files": sorted(f["filename"] for f in loaded.train.tokens.cache_files),
        "input_ids": [list(map(int, x)) for x in loaded.train.tokens["input_ids"]],
    }
    Path(out, f"rank{rank}.json").write_text(json.dumps(report))
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    main(*sys.argv[1:])
