"""Sequence packing against one example per row, side by side, on skewed chat-like lengths.

Lengths are lognormal with median 150 tokens (sigma 1.0, clipped to [16, 2048]) and
max_length is 2048: a few long conversations among many short ones, as in real chat data.
The driver computes, for one whole epoch of `training.schedule.DataOrder`, the share of padding
tokens and the steps per epoch of both modes, then runs both for a few steps on 2 CPU ranks
(`deepspeed --num_gpus 2`, this file again with --worker) to measure useful (non-pad)
tokens per second.

The timed loop is a faithful copy of the trainer's step, not the trainer itself (which cannot
read users' data yet): the same DeepSpeed ZeRO-3 engine settings (tests/configs/zero3_fp32.json,
ds_configs/zero3.json in fp32), a LLaMA built from a config under zero.Init, LoRA r=8 on q,v
injected with lora_dist.inject.inject_lora, DataOrder.rank_micro_batches, and the batches the
trainer will draw from (lora_dist.data.batches.ExampleBatches / PackedBatches with SDPA's
block-diagonal mask), then engine(**inputs), engine.backward, engine.step per micro-batch. One
engine runs both modes, one after the other, so both see the same model and process.

    flock /tmp/multirank.lock env PYTHONPATH=. python benchmarks/bench_packing.py
    PYTHONPATH=. python benchmarks/bench_packing.py --quick      # small model, 2 steps

Results: benchmarks/results/packing.json (or --name).
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parent.parent
MODES = {"unpacked": 4, "packed": 1}  # micro-batch per rank: examples, or packed rows
SHAPES = {
    "default": dict(hidden=256, layers=4, heads=4, intermediate=688, vocab=8192),
    "quick": dict(hidden=64, layers=2, heads=4, intermediate=128, vocab=1024),
}


def synthetic_lengths(n: int, max_length: int, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    return np.clip(rng.lognormal(np.log(150), 1.0, n).astype(np.int64), 16, max_length)


def epoch_stats(lengths: np.ndarray, max_length: int, dp: int, seed: int) -> dict:
    """Padding share and steps per epoch of both modes, over one whole epoch."""
    from lora_dist.data.packing import plan_packs
    from lora_dist.training.schedule import DataOrder

    plan = plan_packs(lengths, max_length)
    out = {}
    for mode, micro in MODES.items():
        units = len(lengths) if mode == "unpacked" else len(plan)

        def size(i: int, mode: str = mode) -> int:
            return int(lengths[i]) if mode == "unpacked" else int(lengths[plan.pack(i)].sum())

        order = DataOrder(units, micro * dp, seed)
        real = slots = 0
        for step in range(order.steps_per_epoch):
            for rank in range(dp):
                for idx in order.rank_micro_batches(step, rank, dp, micro):
                    sizes = [size(i) for i in idx]
                    real += sum(sizes)
                    slots += len(sizes) * max(sizes)  # padded to the longest row
        out[mode] = {
            "micro_batch_per_rank": micro,
            "global_batch": micro * dp,
            "rows_per_epoch": units,
            "steps_per_epoch": order.steps_per_epoch,
            "padding_share": 1 - real / slots,
            "real_tokens_per_epoch": real,
        }
    out["packed"]["fill_of_max_length"] = plan.fill
    out["packed"]["examples_per_row"] = len(lengths) / len(plan)
    out["packed"]["steps_per_epoch_at_unpacked_global_batch"] = len(plan) // (
        MODES["unpacked"] * dp
    )
    return out


# -- worker: both modes on this rank -----------------------------------------------------------
def run_worker(args: argparse.Namespace) -> None:
    import datasets
    import deepspeed
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    from lora_dist.data.batches import ExampleBatches, PackedBatches
    from lora_dist.distributed.ds_config import batch_layout, load_ds_config, prepare_for_run
    from lora_dist.distributed.launch import init_distributed
    from lora_dist.distributed.zero import lora_persistence_threshold
    from lora_dist.inject import inject_lora
    from lora_dist.lora import LoraConfig
    from lora_dist.training.schedule import DataOrder

    info = init_distributed()
    shape = SHAPES[args.shape]
    raw = load_ds_config(str(REPO / "tests" / "configs" / "zero3_fp32.json"))
    raw.pop("train_batch_size", None)
    raw["train_micro_batch_size_per_gpu"], raw["gradient_accumulation_steps"] = 1, 1
    raw.pop("tensorboard", None)
    layout = batch_layout(raw, info.world_size)
    out = Path(args.out)
    cfg = prepare_for_run(raw, layout, out.parent, None, None)
    config = LlamaConfig(
        vocab_size=shape["vocab"],
        hidden_size=shape["hidden"],
        intermediate_size=shape["intermediate"],
        num_hidden_layers=shape["layers"],
        num_attention_heads=shape["heads"],
        num_key_value_heads=shape["heads"],
        max_position_embeddings=args.max_length,
        tie_word_embeddings=False,
        attn_implementation="sdpa",
    )
    torch.manual_seed(0)
    with deepspeed.zero.Init(config_dict_or_path=cfg):
        model = LlamaForCausalLM(config)
    torch.manual_seed(0)
    inject_lora(model, LoraConfig(r=8, alpha=16, targets="attn"))
    cfg = prepare_for_run(raw, layout, out.parent, lora_persistence_threshold(model), None)
    trainable = [p for p in model.parameters() if p.requires_grad]
    engine, *_ = deepspeed.initialize(model=model, model_parameters=trainable, config=cfg)
    engine.train()
    tokens = datasets.load_from_disk(args.data)
    report = {"rank": info.rank, "world": info.world_size}
    for mode, micro in MODES.items():
        if mode == "unpacked":
            batches = ExampleBatches(tokens, pad_id=0)
        else:
            batches = PackedBatches(tokens, args.max_length, 0, "sdpa", torch.float32)
        order = DataOrder(len(batches), micro * layout.dp, args.seed)
        times, real, slots, losses = [], 0, 0, []
        for step in range(args.warmup + args.steps):
            t0 = time.perf_counter()
            step_real = step_slots = 0
            for idx in order.rank_micro_batches(step, info.rank, layout.dp, micro):
                batch = batches.batch(idx, engine.device)
                loss = engine(**batch.inputs).loss
                engine.backward(loss)
                engine.step()
                losses.append(loss.item())
                step_real += batch.tokens
                step_slots += batch.inputs["input_ids"].numel()
            if step >= args.warmup:
                times.append(time.perf_counter() - t0)
                real += step_real
                slots += step_slots
        report[mode] = {"step_times": times, "real_tokens": real, "slots": slots, "losses": losses}
    Path(f"{args.out}.rank{info.rank}.json").write_text(json.dumps(report, indent=1))
    import torch.distributed as dist

    dist.barrier()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)  # gloo's threads can abort interpreter teardown; the results are written


# -- driver ------------------------------------------------------------------------------------
def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def write_tokens(lengths: np.ndarray, vocab: int, path: Path, seed: int = 0) -> None:
    """Random token ids with the given lengths; the first 30% of each is a masked prompt."""
    import datasets

    from lora_dist.data.userdata import TOKEN_FEATURES

    rng = np.random.default_rng(seed)
    ids, labels = [], []
    for n in lengths.tolist():
        x = rng.integers(1, vocab, n).astype(np.int32)
        y = x.copy()
        y[: max(1, int(0.3 * n))] = -100
        ids.append(x)
        labels.append(y)
    features = {k: TOKEN_FEATURES[k] for k in ("input_ids", "labels", "length", "row")}
    columns = {"input_ids": ids, "labels": labels, "length": lengths.tolist()}
    columns["row"] = list(range(len(lengths)))
    datasets.Dataset.from_dict(columns, features=datasets.Features(features)).save_to_disk(
        str(path)
    )


def summarize(stats: dict, reports: list[dict]) -> dict:
    timed = {}
    for mode in MODES:
        wall = max(sum(r[mode]["step_times"]) for r in reports)
        real = sum(r[mode]["real_tokens"] for r in reports)
        slots = sum(r[mode]["slots"] for r in reports)
        timed[mode] = {
            "useful_tokens_per_s": real / wall,
            "slot_tokens_per_s": slots / wall,
            "step_time_s": wall / len(reports[0][mode]["step_times"]),
            "padding_share_timed_steps": 1 - real / slots,
        }
    ratios = {
        "packed_over_unpacked_useful_tokens_per_s": timed["packed"]["useful_tokens_per_s"]
        / timed["unpacked"]["useful_tokens_per_s"],
        "unpacked_over_packed_steps_per_epoch_same_global_batch": stats["unpacked"][
            "steps_per_epoch"
        ]
        / stats["packed"]["steps_per_epoch_at_unpacked_global_batch"],
    }
    return {"timed": timed, "ratios": ratios}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--data", help=argparse.SUPPRESS)
    p.add_argument("--out", help=argparse.SUPPRESS)
    p.add_argument("--local_rank", type=int, default=-1, help=argparse.SUPPRESS)
    p.add_argument("--quick", action="store_true", help="small model, few examples and steps")
    p.add_argument("--shape", default="default", choices=sorted(SHAPES))
    p.add_argument("--examples", type=int, default=20000)
    p.add_argument("--max_length", type=int, default=2048)
    p.add_argument("--steps", type=int, default=6, help="timed steps per mode")
    p.add_argument("--warmup", type=int, default=1)
    p.add_argument("--seed", type=int, default=1234)
    p.add_argument("--name", default="packing")
    p.add_argument("--results", default=str(REPO / "benchmarks" / "results"))
    p.add_argument("--work_dir", default="/tmp/lora_dist_bench_packing")
    args = p.parse_args(argv)
    if args.worker:
        run_worker(args)
        return 0
    if args.quick:
        args.shape, args.examples, args.steps = "quick", 2000, 2
    lengths = synthetic_lengths(args.examples, args.max_length)
    t0 = time.perf_counter()
    stats = epoch_stats(lengths, args.max_length, dp=2, seed=args.seed)
    work = Path(args.work_dir)
    work.mkdir(parents=True, exist_ok=True)
    data = work / f"tokens-{args.examples}-{args.shape}"
    if not (data / "dataset_info.json").is_file():
        write_tokens(lengths, SHAPES[args.shape]["vocab"], data)
    out = work / args.name
    for old in work.glob(f"{args.name}.rank*.json"):
        old.unlink()
    bin_dir = Path(sys.executable).parent
    cmd = [str(bin_dir / "deepspeed"), "--num_gpus", "2", "--master_port", str(free_port())]
    cmd += [__file__, "--worker", "--data", str(data), "--out", str(out), "--shape", args.shape]
    cmd += ["--max_length", str(args.max_length), "--steps", str(args.steps)]
    cmd += ["--warmup", str(args.warmup), "--seed", str(args.seed)]
    env = dict(os.environ, PYTHONPATH=str(REPO), OMP_NUM_THREADS="1")
    env["PATH"] = f"{bin_dir}:{env.get('PATH', '')}"
    proc = subprocess.run(cmd, env=env, cwd=REPO, capture_output=True, text=True)
    files = sorted(work.glob(f"{args.name}.rank*.json"))
    if len(files) < 2:
        raise RuntimeError(f"worker failed ({proc.returncode}):\n{proc.stderr[-3000:]}")
    reports = [json.loads(f.read_text()) for f in files]
    result = {
        "command": "python benchmarks/bench_packing.py " + " ".join(argv or sys.argv[1:]),
        "loop": "faithful copy of the trainer's step (not the trainer): see module docstring",
        "lengths": {
            "distribution": "lognormal, median 150, sigma 1.0, clipped to [16, max_length]",
            "examples": len(lengths),
            "max_length": args.max_length,
            "mean": float(lengths.mean()),
            "median": float(np.median(lengths)),
            "p99": float(np.percentile(lengths, 99)),
            "max": int(lengths.max()),
        },
        "model": {**SHAPES[args.shape], "lora": "r=8 on q_proj,v_proj", "dtype": "fp32"},
        "epoch": stats,
        **summarize(stats, reports),
        "ranks": reports,
        "wall_s": time.perf_counter() - t0,
    }
    results = Path(args.results)
    results.mkdir(parents=True, exist_ok=True)
    (results / f"{args.name}.json").write_text(json.dumps(result, indent=1) + "\n")
    same_batch = {
        "unpacked": stats["unpacked"]["steps_per_epoch"],
        "packed": stats["packed"]["steps_per_epoch_at_unpacked_global_batch"],
    }
    for mode in MODES:
        e, t = stats[mode], result["timed"][mode]
        print(
            f"{mode:9s} padding {e['padding_share']:.3f}  steps/epoch at global batch "
            f"{stats['unpacked']['global_batch']} {same_batch[mode]:5d}  useful tokens/s "
            f"{t['useful_tokens_per_s']:7.0f}  step {t['step_time_s']:.2f} s"
        )
    print(json.dumps(result["ratios"], indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
