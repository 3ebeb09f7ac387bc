"""Peak memory per rank while tensor parallelism is set up, against the TP slice it produces.

AutoTP gathers each ZeRO-3 partitioned weight whole and slices this rank's part out of it. The
trainer (`lora_dist.distributed.tp.shard_base_for_tp`) runs that pass inside zero.Init over the
data-parallel group, so each slice is partitioned over DP as soon as its layer is built; the
pass run bare (as before) keeps every slice whole until deepspeed.initialize, i.e. 1/TP of the
base on every rank. Both run here side by side, each in its own 4-rank job (TP 2 x DP 2, CPU,
bf16), on a LLaMA-shaped model built from a config and loaded under ZeRO-3 as the trainer does.
Per rank: the rise of the peak RSS (VmHWM, reset after loading and after the DP x TP process
groups exist) during the pass, the RSS it leaves behind, and the bytes of base parameters the
rank holds afterwards.

    PYTHONPATH=. python benchmarks/bench_tp_setup.py              # ~3 min here; under the lock
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_memory_speed import build_inputs, free_port, reset_rss_peak, rss_now, rss_peak  # noqa: E402

REPO = Path(__file__).resolve().parent.parent
# hidden 1024, 8 layers, MLP 2816, vocab 32000: 168M parameters, 336 MB in bf16.
SHAPE = dict(hidden=1024, layers=8, intermediate=2816, heads=16, vocab=32000)
CONFIG = {
    "train_batch_size": 4,
    "train_micro_batch_size_per_gpu": 2,
    "zero_optimization": {"stage": 3, "stage3_param_persistence_threshold": 0},
    "bf16": {"enabled": True},
    "tensor_parallel": {"autotp_size": 2},
}


def worker(args: argparse.Namespace) -> None:
    import deepspeed
    import torch

    from lora_dist.distributed.ds_config import batch_layout, prepare_for_run
    from lora_dist.distributed.host_memory import pin_mmap_threshold
    from lora_dist.distributed.launch import init_distributed
    from lora_dist.distributed.loading import load_base_model
    from lora_dist.distributed.tp import shard_base_for_tp, tp_groups, zero_init_config

    pin_mmap_threshold(4 * 2**20)  # as the trainer does: freed gather buffers leave RSS
    info = init_distributed()
    cfg = prepare_for_run(CONFIG, batch_layout(CONFIG, info.world_size), Path("."), None, None)
    model = load_base_model(Path(args.model_dir), zero_init_config(cfg), 3)
    base_bytes = sum(int(getattr(p, "ds_numel", p.numel())) * 2 for p in model.parameters())
    tp_groups(2)  # the DP x TP process groups first: their buffers are not the pass's memory
    torch.distributed.barrier()
    before = rss_now()
    reset_rss_peak()
    t0 = time.perf_counter()
    if args.variant == "bounded":
        shard_base_for_tp(model, cfg)  # the trainer's
    else:  # the pass run bare, as the trainer did before: slices stay whole until initialize
        import types

        from deepspeed.module_inject.layers import configure_tensor_parallel_runtime
        from deepspeed.runtime.engine import DeepSpeedEngine
        from deepspeed.runtime.tensor_parallel import get_tensor_parallel_config

        tp_config = get_tensor_parallel_config(cfg)
        configure_tensor_parallel_runtime(tp_config)
        view = types.SimpleNamespace(
            autotp_size=lambda: 2,
            local_rank=int(os.environ.get("LOCAL_RANK", "0")),
            is_deepcompile_enabled=lambda: False,
            compile_autotp=lambda: False,
        )
        DeepSpeedEngine._apply_autotp_partitioning(view, model, tp_config)
    seconds = time.perf_counter() - t0
    peak = rss_peak()
    held = 0
    for p in model.parameters():
        t = p.ds_tensor if hasattr(p, "ds_id") else p
        held += t.numel() * t.element_size()
    report = {
        "rank": info.rank,
        "base_bytes": base_bytes,
        "setup_peak_rise": peak - before,
        "rss_rise_after": rss_now() - before,
        "held_param_bytes": held,
        "seconds": seconds,
    }
    Path(f"{args.out}.rank{info.rank}.json").write_text(json.dumps(report))
    torch.distributed.barrier()
    deepspeed.comm.destroy_process_group()
    sys.stdout.flush()
    os._exit(0)  # gloo's threads can abort interpreter teardown; the result is written


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--work_dir", default=os.environ.get("LORA_DIST_BENCH_DIR", "/tmp/lora_bench"))
    p.add_argument("--results", default=str(REPO / "benchmarks" / "results" / "tp_setup.json"))
    p.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--variant", choices=("bounded", "bare"), help=argparse.SUPPRESS)
    p.add_argument("--model_dir", help=argparse.SUPPRESS)
    p.add_argument("--out", help=argparse.SUPPRESS)
    p.add_argument("--local_rank", type=int, default=-1, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.worker:
        worker(args)
        return 0
    work = Path(args.work_dir)
    model_dir, _ = build_inputs(SHAPE, work)
    out = work / f"tp_setup-{os.getpid()}"
    out.mkdir(parents=True, exist_ok=True)
    env = dict(os.environ, PYTHONPATH=str(REPO), OMP_NUM_THREADS="1")
    res: dict = {"shape": SHAPE, "world": 4, "tp": 2, "dp": 2, "dtype": "bf16"}
    for variant in ("bare", "bounded"):
        cmd = [str(Path(sys.executable).parent / "deepspeed"), "--num_gpus", "4"]
        cmd += ["--master_port", str(free_port()), __file__, "--worker", "--variant", variant]
        cmd += ["--model_dir", str(model_dir), "--out", str(out / variant)]
        done = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True)
        ranks = sorted(out.glob(f"{variant}.rank*.json"))
        if len(ranks) < 4:
            raise RuntimeError(f"{variant} failed ({done.returncode}):\n{done.stderr[-3000:]}")
        rows = [json.loads(r.read_text()) for r in ranks]
        base = rows[0]["base_bytes"]
        res[variant] = {
            "setup_peak_rise_mb": [round(r["setup_peak_rise"] / 1e6, 1) for r in rows],
            "rss_rise_after_mb": [round(r["rss_rise_after"] / 1e6, 1) for r in rows],
            "held_param_mb": [round(r["held_param_bytes"] / 1e6, 1) for r in rows],
            "seconds": [round(r["seconds"], 2) for r in rows],
        }
        res["base_mb"] = round(base / 1e6, 1)
    res["tp_slice_mb"] = round(res["base_mb"] / 2, 1)
    res["slice_over_dp_mb"] = round(res["base_mb"] / 4, 1)
    res["largest_tensor_mb"] = round(SHAPE["vocab"] * SHAPE["hidden"] * 2 / 1e6, 1)
    Path(args.results).parent.mkdir(parents=True, exist_ok=True)
    Path(args.results).write_text(json.dumps(res, indent=1) + "\n")
    print(json.dumps(res, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
