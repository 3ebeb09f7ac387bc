"""Generate offline from a JSONL of requests, each naming its adapter, many adapters on one base.

    lora-dist generate --adapter sql=runs/sql --adapter chat=runs/chat \\
        --input requests.jsonl --output results.jsonl

Each input line is {"prompt": ...} or {"messages": [...]} (a chat, through the model's chat
template), with optional "model" (an --adapter NAME; omitted: the bare base), "id",
"max_tokens", "temperature" (default 0: greedy), "top_p", "seed", "stop" and "ignore_eos". The
output has one line per request, in input order: {"id", "model", "text", "finish_reason",
"prompt_tokens", "completion_tokens"}. Requests run with continuous batching: every row of a
batch uses its own adapter, and a request joins as soon as another leaves.
"""

from __future__ import annotations

import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from lora_dist.commands.options import Options, option
from lora_dist.errors import ConfigError
from lora_dist.serving.offline import Defaults, read_jobs, write_results
from lora_dist.serving.runtime import adapter_specs, build, check_startup, resolve_base
from lora_dist.settings import existing_file


@dataclass
class GenerateOptions(Options):
    input: str = option()
    """JSONL file of requests"""
    output: str = option()
    """where to write the JSONL results"""
    model: str | None = option(None, aliases=("--base",))
    """a built-in model (smollm2-135m-instruct, tiny) or a base model directory; default:
    smollm2-135m-instruct"""
    adapter: list[str] = option([], metavar="NAME=DIR")
    """serve the adapter in DIR as NAME (repeatable)"""
    max_tokens: int = option(128, minimum=1)
    """max_tokens of a request that sets none"""
    temperature: float = option(0.0, minimum=0.0)
    """temperature of a request that sets none (0: greedy)"""
    max_batch_size: int = option(16, minimum=1)
    """most requests decoded together"""
    max_model_len: int = option(2048, minimum=1)
    """most tokens of prompt plus completion"""
    dtype: Literal["fp32", "bf16", "fp16"] = "fp32"
    """dtype of the base and the adapters in memory"""
    device: str = "cpu"
    """torch device to run on (cpu, cuda, cuda:1, ...)"""

    def validate(self) -> None:
        check_startup(self.model, self.adapter)
        existing_file("--input", self.input)
        if Path(self.output).is_dir():
            raise ConfigError(f"--output {self.output} is a directory; name the results file")
        for parent in Path(self.output).parents:
            if parent.exists() and not parent.is_dir():
                raise ConfigError(f"--output {self.output} lies under the file {parent}")


OPTIONS = GenerateOptions


def run(opts: GenerateOptions) -> int:
    base_dir, base_name = resolve_base(opts.model)
    service = build(
        base_dir,
        adapter_specs(opts.adapter),
        base_name=base_name,
        max_batch_size=opts.max_batch_size,
        max_model_len=opts.max_model_len,
        max_waiting=sys.maxsize,
        dtype=opts.dtype,
        device=opts.device,
    )
    defaults = Defaults(max_tokens=opts.max_tokens, temperature=opts.temperature)
    jobs = read_jobs(
        Path(opts.input), service.tokenizer, service.registry, service.engine, defaults
    )
    start = time.perf_counter()
    results = service.engine.run([job.request for job in jobs])
    seconds = time.perf_counter() - start
    write_results(Path(opts.output), jobs, results)
    tokens = sum(r.completion_tokens for r in results)
    print(
        f"{len(results)} requests, {tokens} tokens in {seconds:.1f} s "
        f"({len(results) / seconds:.2f} requests/s); wrote {opts.output}"
    )
    failed = [r for r in results if r.finish_reason == "error"]
    return 1 if failed else 0
