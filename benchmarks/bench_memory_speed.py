"""Memory and speed of lora-dist's LoRA vs full fine-tuning vs PEFT under ZeRO-3, side by side.

One invocation builds a LLaMA-shaped model from a config, saves it once as a sharded Hugging Face
directory, writes one synthetic token set, and runs each configuration in its own
`deepspeed --num_gpus N` subprocess (this file again, with --worker) on the same DeepSpeed JSON:

  lora   lora-dist LoRA (r=4 on q_proj, v_proj), 2 ranks     full   full fine-tuning, 2 ranks
  peft   PEFT's get_peft_model (r=4, q_proj, v_proj), 2 ranks  lora1  lora-dist LoRA on 1 rank
  latency  one process: forward of the bare base vs a merged adapter (merge_and_unload)

Each worker loads the base under ZeRO-3 in the config's dtype, trains `--warmup` + `--steps`
steps and reports per-rank peak RSS (VmHWM, split into the loading and the training phase),
model-state bytes counted from the engine's tensors, frozen-base partition bytes and the mean
step time. The driver prints a ratio table and writes benchmarks/results/<name>.json, including
`lora-dist plan`'s predictions for the same runs.

    PYTHONPATH=. python benchmarks/bench_memory_speed.py --size 551m
    PYTHONPATH=. python benchmarks/bench_memory_speed.py --quick   # tiny model, a few steps
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import statistics
import subprocess
import sys
import time
from pathlib import Path

from lora_dist.distributed.host_memory import ENV, MMAP_THRESHOLD

REPO = Path(__file__).resolve().parent.parent
DS_CONFIG = REPO / "benchmarks" / "ds_bench_zero3_bf16.json"
SEQ, LORA_R, TARGETS = 128, 4, ("q_proj", "v_proj")
# LLaMA shapes (vocab 32000, untied head) whose parameter counts give the names.
SIZES = {
    "quick": dict(hidden=256, layers=2, intermediate=688, heads=4, vocab=2000),
    "215m": dict(hidden=1024, layers=12, intermediate=2752, heads=16, vocab=32000),
    "551m": dict(hidden=1536, layers=16, intermediate=4096, heads=12, vocab=32000),
}
WORKERS = ("lora", "full", "peft", "lora1")


def rss_now() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def rss_peak() -> int:
    """VmHWM: this process's peak RSS since it started or since reset_rss_peak()."""
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    raise RuntimeError("no VmHWM in /proc/self/status")


def reset_rss_peak() -> None:
    with open("/proc/self/clear_refs", "w") as f:  # "5" resets the peak RSS (Linux >= 4.0)
        f.write("5")


# -- worker: one configuration on this rank --------------------------------------------------
def load_model(model_dir: Path, raw: dict, loader: str):
    import torch

    from lora_dist.distributed.ds_config import model_dtype
    from lora_dist.distributed.loading import load_base_model, load_streamed_zero3

    if loader == "streamed":
        return load_streamed_zero3(model_dir, raw, model_dtype(raw))
    model = load_base_model(model_dir, raw, 3)
    return model if loader == "from_pretrained" else model.to(torch.bfloat16)


def run_worker(args: argparse.Namespace) -> None:
    import deepspeed
    import torch

    from lora_dist.distributed.ds_config import (
        batch_layout,
        load_ds_config,
        prepare_for_run,
        zero3_budgets,
    )
    from lora_dist.distributed.host_memory import pin_mmap_threshold
    from lora_dist.distributed.launch import init_distributed
    from lora_dist.distributed.zero import (
        frozen_local_numel,
        gathered_sizes,
        lora_persistence_threshold,
        model_state_bytes,
    )

    pin_mmap_threshold(args.host_mmap_threshold)  # as the trainer does, for every configuration
    info = init_distributed()
    baseline = rss_now()
    raw = load_ds_config(args.ds_config)
    raw.pop("train_batch_size", None)
    layout = batch_layout(raw, info.world_size)
    raw = prepare_for_run(raw, layout, Path(args.out).parent, None, None)
    reset_rss_peak()
    model = load_model(Path(args.model_dir), raw, args.loader)
    load_peak = rss_peak()
    reset_rss_peak()
    threshold = None
    if args.worker in ("lora", "lora1"):
        from lora_dist.inject import inject_lora
        from lora_dist.lora import LoraConfig

        torch.manual_seed(0)
        inject_lora(model, LoraConfig(r=LORA_R, alpha=2 * LORA_R, targets=",".join(TARGETS)))
        threshold = lora_persistence_threshold(model)
    elif args.worker == "peft":
        from peft import LoraConfig as PeftLoraConfig
        from peft import get_peft_model

        torch.manual_seed(0)
        model = get_peft_model(model, PeftLoraConfig(r=LORA_R, target_modules=list(TARGETS)))
        # The same persistence rule as lora-dist: the largest LoRA factor stays whole.
        threshold = max(p.numel() for p in model.parameters() if p.requires_grad)
    else:
        model.requires_grad_(True)
    trainable = [p for p in model.parameters() if p.requires_grad]
    # "auto" ZeRO sizes as the trainer resolves them, the same rule for every configuration.
    n_trainable = sum(int(getattr(p, "ds_numel", p.numel())) for p in trainable)
    budgets = zero3_budgets(*gathered_sizes(model), n_trainable)
    cfg = prepare_for_run(raw, layout, Path(args.out).parent, threshold, None, budgets)
    engine, *_ = deepspeed.initialize(model=model, model_parameters=trainable, config=cfg)
    engine.train()
    on_cuda = torch.cuda.is_available()
    if on_cuda:  # the training peak, after loading and setup (gpu_check.sh's figures)
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    tokens = torch.load(args.data)
    times, losses = [], []
    for step in range(args.warmup + args.steps):
        ids = tokens[(step * info.world_size + info.rank) % len(tokens)].unsqueeze(0)
        ids = ids.to(engine.device)
        t0 = time.perf_counter()
        loss = engine(input_ids=ids, labels=ids).loss
        engine.backward(loss)
        engine.step()
        losses.append(loss.item())  # waits for the step: the time is the step's
        if step >= args.warmup:
            times.append(time.perf_counter() - t0)
    frozen = [p for p in engine.module.parameters() if not p.requires_grad]
    report = {
        "rank": info.rank,
        "world": info.world_size,
        "baseline_rss": baseline,
        "load_peak_rss": load_peak,
        "train_peak_rss": rss_peak(),
        "model_state_bytes": model_state_bytes(engine),
        "frozen_numel": frozen_local_numel(engine.module),
        "frozen_bytes": sum(p.ds_tensor.numel() * p.ds_tensor.element_size() for p in frozen),
        "trainable_numel": sum(int(getattr(p, "ds_numel", p.numel())) for p in trainable),
        "step_times": times,
        "losses": losses,
    }
    if on_cuda:
        report["cuda_peak"] = {
            "allocated": torch.cuda.max_memory_allocated(),
            "reserved": torch.cuda.max_memory_reserved(),
        }
    report["peak_rss"] = max(report["load_peak_rss"], report["train_peak_rss"])
    Path(f"{args.out}.rank{info.rank}.json").write_text(json.dumps(report, indent=1))
    import torch.distributed as dist

    dist.barrier()
    # gloo's threads can abort interpreter teardown ("terminate called without an active
    # exception") after the results are written; nothing is left to clean up, so leave now.
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)


def run_latency(args: argparse.Namespace) -> None:
    """Forward latency of the bare base vs the base with a merged adapter, in one process."""
    import torch
    from transformers import AutoModelForCausalLM

    from lora_dist.distributed.host_memory import pin_mmap_threshold
    from lora_dist.inject import inject_lora
    from lora_dist.lora import LoraConfig, merge_and_unload

    pin_mmap_threshold(args.host_mmap_threshold)

    load = lambda: AutoModelForCausalLM.from_pretrained(args.model_dir, dtype=torch.bfloat16)  # noqa: E731
    base = load().eval()
    merged = load().eval()
    torch.manual_seed(0)
    inject_lora(merged, LoraConfig(r=LORA_R, alpha=2 * LORA_R, targets=",".join(TARGETS)))
    with torch.no_grad():
        for name, p in merged.named_parameters():
            if "lora_B" in name:  # a trained-looking adapter, so that merging changes weights
                p.normal_(0, 0.02)
    merge_and_unload(merged)
    ids = torch.load(args.data)[0].unsqueeze(0)
    times: dict[str, list[float]] = {"base": [], "merged": []}
    with torch.inference_mode():
        for _ in range(2):
            base(input_ids=ids), merged(input_ids=ids)
        for _ in range(args.repeats):  # interleaved, so drift hits both alike
            for name, model in (("base", base), ("merged", merged)):
                t0 = time.perf_counter()
                model(input_ids=ids)
                times[name].append(time.perf_counter() - t0)
        diff = (base(input_ids=ids).logits - merged(input_ids=ids).logits).abs().max().item()
    report = {k: statistics.median(v) for k, v in times.items()}
    report |= {"repeats": args.repeats, "max_logit_diff": diff}
    report["lora_modules_left"] = sum("lora_" in n for n, _ in merged.named_parameters())
    Path(f"{args.out}.json").write_text(json.dumps(report, indent=1))


# -- driver ------------------------------------------------------------------------------------
def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def build_inputs(shape: dict, work: Path, seed: int = 0) -> tuple[Path, Path]:
    """The model directory (sharded safetensors, bf16) and the token set, built once per shape."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    tag = "-".join(f"{k}{v}" for k, v in sorted(shape.items()))
    model_dir, data = work / f"llama-{tag}", work / f"tokens-{tag}.pt"
    if not (model_dir / "config.json").is_file():
        torch.manual_seed(seed)
        cfg = LlamaConfig(
            vocab_size=shape["vocab"],
            hidden_size=shape["hidden"],
            intermediate_size=shape["intermediate"],
            num_hidden_layers=shape["layers"],
            num_attention_heads=shape["heads"],
            num_key_value_heads=shape["heads"],
            max_position_embeddings=SEQ,
            tie_word_embeddings=False,
        )
        model = LlamaForCausalLM(cfg).to(torch.bfloat16)
        model.save_pretrained(str(model_dir), max_shard_size="200MB")
        del model
    if not data.is_file():
        gen = torch.Generator().manual_seed(seed)
        torch.save(torch.randint(0, shape["vocab"], (64, SEQ), generator=gen), data)
    return model_dir, data


def launch(worker: str, args: argparse.Namespace, model_dir: Path, data: Path, out: Path) -> None:
    env = dict(os.environ, PYTHONPATH=str(REPO), OMP_NUM_THREADS="1")
    bin_dir = Path(sys.executable).parent
    env["PATH"] = f"{bin_dir}:{env.get('PATH', '')}"
    common = ["--model_dir", str(model_dir), "--data", str(data), "--out", str(out / worker)]
    common += ["--host_mmap_threshold", str(args.host_mmap_threshold)]
    if worker == "latency":
        cmd = [sys.executable, __file__, "--worker", worker, "--repeats", str(args.repeats)]
    else:
        ranks = "1" if worker == "lora1" else "2"
        cmd = [str(bin_dir / "deepspeed"), "--num_gpus", ranks, "--master_port", str(free_port())]
        cmd += [__file__, "--worker", worker, "--ds_config", args.ds_config]
        cmd += ["--steps", str(args.steps), "--warmup", str(args.warmup), "--loader", args.loader]
    t0 = time.perf_counter()
    proc = subprocess.run(cmd + common, env=env, cwd=REPO, capture_output=True, text=True)
    expected = 1 if worker in ("lora1", "latency") else 2
    written = len(list(out.glob(f"{worker}.rank*.json"))) or (out / f"{worker}.json").is_file()
    if proc.returncode != 0 and written >= expected:  # every rank reported: an abort at exit
        print(f"  {worker}: exit code {proc.returncode} after writing results", file=sys.stderr)
    elif proc.returncode != 0:
        raise RuntimeError(f"{worker} failed ({proc.returncode}):\n{proc.stderr[-3000:]}")
    print(f"  {worker}: {time.perf_counter() - t0:.0f} s", file=sys.stderr)


def collect(worker: str, out: Path) -> dict:
    ranks = sorted(out.glob(f"{worker}.rank*.json"))
    rows = [json.loads(p.read_text()) for p in ranks]
    per_rank = {k: [r[k] for r in rows] for k in ("peak_rss", "load_peak_rss", "train_peak_rss")}
    per_rank["baseline_rss"] = [r["baseline_rss"] for r in rows]
    per_rank["model_state_bytes"] = [r["model_state_bytes"]["total"] for r in rows]
    per_rank["frozen_bytes"] = [r["frozen_bytes"] for r in rows]
    times = [t for r in rows for t in r["step_times"]]
    return {
        **per_rank,
        "model_state_detail_rank0": rows[0]["model_state_bytes"],
        "trainable_numel": rows[0]["trainable_numel"],
        "step_time_s": statistics.mean(times),
        "losses_rank0": rows[0]["losses"],
    }


def planner(model_dir: Path, ds_config: str) -> dict:
    """`lora-dist plan`'s per-rank totals (GiB -> bytes) for these runs, on the CPU."""
    cmd = [sys.executable, "-m", "lora_dist.cli", "plan", "--model", str(model_dir / "config.json")]
    cmd += ["--device", "cpu", "--nodes", "1", "--gpus_per_node", "2", "--ds_config", ds_config]
    cmd += ["--dtype", "bf16", "--micro_batch", "1", "--max_length", str(SEQ)]
    cmd += ["--lora_r", str(LORA_R), "--lora_targets", "q,v", "--no_activation_checkpointing"]
    cmd += ["--json"]
    env = dict(os.environ, PYTHONPATH=str(REPO))
    plan = json.loads(subprocess.run(cmd, env=env, check=True, capture_output=True).stdout)
    return {m: plan[m]["per_gpu_gib"] * 2**30 for m in ("full", "lora")} | {
        "items_gib": {
            m: {k: v / 2**30 for k, v in plan[m]["items"].items()} for m in ("full", "lora")
        }
    }


def summarize(res: dict) -> dict:
    lo, fu, pe, l1 = (res[w] for w in WORKERS)
    peak = lambda r: max(r["peak_rss"])  # noqa: E731 (the worst rank is what must fit)
    ratios = {
        "lora_over_full_peak_rss": peak(lo) / peak(fu),
        "lora_over_full_train_peak_rss": max(lo["train_peak_rss"]) / max(fu["train_peak_rss"]),
        "lora_over_full_model_state": max(lo["model_state_bytes"]) / max(fu["model_state_bytes"]),
        "lora_over_full_step_time": lo["step_time_s"] / fu["step_time_s"],
        "lora_over_peft_peak_rss": peak(lo) / peak(pe),
        "lora_over_peft_step_time": lo["step_time_s"] / pe["step_time_s"],
        "merged_over_base_latency": res["latency"]["merged"] / res["latency"]["base"],
        "frozen_base_2rank_over_1rank": max(lo["frozen_bytes"]) / max(l1["frozen_bytes"]),
    }
    plan = res.get("planner")
    if plan:
        ratios["planner_lora_error"] = plan["lora"] / peak(lo) - 1
        ratios["planner_full_error"] = plan["full"] / peak(fu) - 1
    return ratios


def print_table(res: dict) -> None:
    gb = lambda b: f"{b / 1e9:.3f}"  # noqa: E731
    print(f"\n{'config':<7}{'peak GB':>9}{'load pk':>9}{'train pk':>9}{'base':>7}"
          f"{'state GB':>10}{'frozen GB':>10}{'step s':>8}")  # fmt: skip
    for w in WORKERS:
        r = res[w]
        print(
            f"{w:<7}{gb(max(r['peak_rss'])):>9}{gb(max(r['load_peak_rss'])):>9}"
            f"{gb(max(r['train_peak_rss'])):>9}{gb(max(r['baseline_rss'])):>7}"
            f"{gb(max(r['model_state_bytes'])):>10}{gb(max(r['frozen_bytes'])):>10}"
            f"{r['step_time_s']:>8.3f}"
        )
    lat = res["latency"]
    print(f"forward latency: base {lat['base'] * 1e3:.1f} ms, merged {lat['merged'] * 1e3:.1f} ms")
    print("\nratio" + " " * 31 + "value")
    for k, v in res["ratios"].items():
        print(f"{k:<36}{v:>8.3f}")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--size", choices=list(SIZES), default="215m")
    p.add_argument("--quick", action="store_true", help="tiny model, 1 + 2 steps")
    for k in ("hidden", "layers", "intermediate", "heads", "vocab"):
        p.add_argument(f"--{k}", type=int, help="override the preset's shape")
    p.add_argument("--steps", type=int, default=4)
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--repeats", type=int, default=30, help="forward-latency repeats")
    p.add_argument("--ds_config", default=str(DS_CONFIG))
    p.add_argument("--loader", choices=("streamed", "from_pretrained"), default="streamed")
    p.add_argument(
        "--host_mmap_threshold",
        type=int,
        default=MMAP_THRESHOLD,
        help="the trainer's flag of that name, applied to every configuration (0: glibc default)",
    )
    p.add_argument("--name", help="results/<name>.json (default: the size)")
    p.add_argument("--results", default=str(REPO / "benchmarks" / "results"))
    p.add_argument("--work_dir", default=os.environ.get("LORA_DIST_BENCH_DIR", "/tmp/lora_bench"))
    p.add_argument("--worker", choices=(*WORKERS, "latency"), help=argparse.SUPPRESS)
    p.add_argument("--model_dir", help=argparse.SUPPRESS)
    p.add_argument("--data", help=argparse.SUPPRESS)
    p.add_argument("--out", help=argparse.SUPPRESS)
    p.add_argument("--local_rank", type=int, default=-1, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.worker == "latency":
        run_latency(args)
        return 0
    if args.worker:
        run_worker(args)
        return 0
    if args.quick:
        args.size, args.steps, args.warmup, args.repeats = "quick", 2, 1, 5
    shape = dict(SIZES[args.size])
    shape |= {k: getattr(args, k) for k in shape if getattr(args, k) is not None}
    work = Path(args.work_dir)
    model_dir, data = build_inputs(shape, work)
    out = work / f"run-{os.getpid()}"
    out.mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()
    res: dict = {"shape": shape, "seq": SEQ, "lora_r": LORA_R, "targets": list(TARGETS)}
    res |= {"ds_config": json.loads(Path(args.ds_config).read_text()), "loader": args.loader}
    res |= {"host_mmap_threshold": args.host_mmap_threshold, "malloc_env": os.environ.get(ENV)}
    res |= {"steps": args.steps, "warmup": args.warmup, "command": " ".join(sys.argv)}
    for worker in (*WORKERS, "latency"):
        launch(worker, args, model_dir, data, out)
        res[worker] = (
            collect(worker, out)
            if worker != "latency"
            else json.loads((out / "latency.json").read_text())
        )
    res["total_params"] = res["full"]["trainable_numel"]
    res["planner"] = planner(model_dir, args.ds_config)
    res["ratios"] = summarize(res)
    res["wall_s"] = time.perf_counter() - started
    name = args.name or args.size
    Path(args.results).mkdir(parents=True, exist_ok=True)
    (Path(args.results) / f"{name}.json").write_text(json.dumps(res, indent=1) + "\n")
    print_table(res)
    print(f"\nwrote {Path(args.results) / f'{name}.json'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
