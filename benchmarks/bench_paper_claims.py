"""The paper's central claims on the real default model and the shipped WikiSQL sample.

Every configuration is one run of the real trainer (`deepspeed --num_gpus 2 launcher/train.py`,
bf16, ZeRO-3, the same global batch, epochs and data order), scored by the trainer's own
end-of-run evaluation (greedy SQL generation executed in SQLite). The untrained model (lora-dist
eval on the bare base) is the floor; then the stages given by --stages, in that order:

  lr         the same 4-point learning-rate sweep (default, x2, x4, x8) for LoRA q,v r=8 and
             for full fine-tuning (seed 0), extended by up to 2 doublings for a method whose best
             is its highest lr; the best dev execution accuracy picks each method's lr for the
             stages after it
  headline   full fine-tuning vs LoRA q,v r=8, 3 seeds each (Table 4)
  rank       LoRA on q,v with r = 1, 2, 4, 8, 64 (Table 6)
  targets    LoRA on {q}, {v}, {q,v}, {q,k,v,o} and every linear layer at about the q,v r=8
             parameter budget (Table 5)
  steps      LoRA q,v r=8 and full fine-tuning at twice the epochs (seed 0): whether more steps
             close the gap that remains at the shared budget

Every run scores all 120 dev prompts (--prompts N: the first N). A run is named by its settings
and cached in --work_dir, so a configuration shared by two stages trains once. Results go to
benchmarks/results/<name>.json, .md and .png after every stage.

    flock /tmp/multirank.lock env PYTHONPATH=. python benchmarks/bench_paper_claims.py
    PYTHONPATH=. python benchmarks/bench_paper_claims.py --stages headline,lr,rank \
        --lock /tmp/multirank.lock  # each run takes the lock: other work can go between runs
    PYTHONPATH=. python benchmarks/bench_paper_claims.py --quick   # tiny model, 2 steps, 2 configs
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
DS_CONFIG = REPO / "benchmarks" / "ds_paper_claims.json"
LORA_LRS = (1e-3, 2e-3, 4e-3, 8e-3)  # the same sweep for both: the default lr, x2, x4, x8
FULL_LRS = (5e-5, 1e-4, 2e-4, 4e-4)
EXTEND_LRS = 2  # more doublings when a method is best at the top of its sweep
SEEDS = (0, 1, 2)
RANKS = (1, 2, 4, 8, 64)
# (label, --lora_targets, r): about the parameter budget of q,v at r=8 on SmolLM2
# (q: 576->576, k and v: 576->192, o: 576->576, MLP: 576<->1536), as Table 5 fixes 18M on GPT-3.
TARGETS = (
    ("q", "q_proj", 13),
    ("v", "v_proj", 20),
    ("q,v", "attn", 8),
    ("q,k,v,o", "attn-all", 4),
    ("all linear", "all-linear", 2),
)


LOCK: list[str] = []  # ["flock", FILE] with --lock: each run takes the machine's multi-rank lock


def _deepspeed(args: list[str], log: Path) -> None:
    port = 29500 + os.getpid() % 1000
    cmd = [*LOCK, str(Path(sys.executable).parent / "deepspeed"), "--num_gpus", "2"]
    cmd += ["--master_port", str(port), str(REPO / "launcher" / "train.py"), *args]
    env = {**os.environ, "LORA_DIST_NO_PROGRESS": "1", "PYTHONPATH": str(REPO)}
    with open(log, "w") as f:
        done = subprocess.run(cmd, cwd=REPO, env=env, stdout=f, stderr=subprocess.STDOUT)
    if done.returncode != 0:
        raise SystemExit(f"run failed ({done.returncode}); see {log}")


CACHED_ONLY: list[bool] = [False]  # --cached_only: tables from the finished runs, train nothing


def train(
    work: Path, tag: str, common: list[str], extra: list[str], prompts: int | None
) -> dict | None:
    """One trainer run; returns the numbers the tables need (cached in work/<tag>/), or None
    for a run not finished yet under --cached_only."""
    out = work / tag
    if not (out / "metrics.json").is_file():
        if CACHED_ONLY[0]:
            print(f"  {tag}: not run yet, left out", file=sys.stderr, flush=True)
            return None
        out.mkdir(parents=True, exist_ok=True)
        limit = ["--eval_limit", str(prompts)] if prompts else []
        started = time.perf_counter()
        _deepspeed([*common, *extra, *limit, "--output_dir", str(out)], out.parent / f"{tag}.log")
        print(f"  {tag}: {time.perf_counter() - started:.0f} s", file=sys.stderr, flush=True)
    m = json.loads((out / "metrics.json").read_text())
    task = m["task_metrics"] or {}
    return {
        "tag": tag,
        "execution_accuracy": task.get("execution_accuracy"),
        "logical_form_accuracy": task.get("logical_form_accuracy"),
        "n_prompts": task.get("n"),
        "dev_loss_initial": m["dev_loss_initial"],
        "dev_loss": m["dev_loss"],
        "trainable_params": m["trainable_params"],
        "peak_memory_bytes_per_rank": max(m["peak_memory_bytes_per_rank"]),
        "step_time_median_s": m["step_time_median_s"],
        "steps": m["steps"],
    }


def floor(work: Path, model: str, prompts: int | None) -> dict:
    out = work / "floor"
    if not (out / "eval.json").is_file():
        cmd = [sys.executable, "-m", "lora_dist.cli", "eval", "--output_dir", str(out)]
        cmd += ["--base", model] if model else []
        cmd += ["--limit", str(prompts)] if prompts else []
        env = {**os.environ, "PYTHONPATH": str(REPO)}
        subprocess.run(cmd, cwd=REPO, env=env, check=True, capture_output=True)
    metrics = json.loads((out / "eval.json").read_text())["metrics"]
    return {"tag": "floor", **metrics}


def summarize(runs: list[dict]) -> dict[str, Any]:
    """Mean and spread (min..max) of every number over the runs (seeds) of one configuration."""
    out: dict[str, Any] = {"tags": [r["tag"] for r in runs]}
    for key in ("execution_accuracy", "logical_form_accuracy", "dev_loss", "trainable_params"):
        values = [r[key] for r in runs]
        out[key] = {"mean": statistics.fmean(values), "min": min(values), "max": max(values)}
    out["peak_memory_gb_per_rank"] = statistics.fmean(
        r["peak_memory_bytes_per_rank"] / 1e9 for r in runs
    )
    out["step_time_s"] = statistics.fmean(r["step_time_median_s"] for r in runs)
    return out


def ratios(full: dict, lora: dict) -> dict[str, float]:
    """LoRA over full fine-tuning, for the headline's means."""

    def over(key: str) -> float:
        return lora[key]["mean"] / max(full[key]["mean"], 1e-9)

    return {
        "lora_over_full_execution_accuracy": over("execution_accuracy"),
        "lora_over_full_logical_form_accuracy": over("logical_form_accuracy"),
        "lora_over_full_peak_memory_per_rank": lora["peak_memory_gb_per_rank"]
        / full["peak_memory_gb_per_rank"],
        "lora_over_full_step_time": lora["step_time_s"] / full["step_time_s"],
    }


def _spread(d: dict[str, float]) -> str:
    extra = f" ({d['min']:.3f}-{d['max']:.3f})" if d["max"] > d["min"] else ""
    return f"{d['mean']:.3f}{extra}"


def table(rows: list[tuple[str, dict]]) -> str:
    lines = [
        "| configuration | trainable params | execution acc. | logical-form acc. | "
        "peak memory/rank | step time |",
        "|---|---|---|---|---|---|",
    ]
    for label, s in rows:
        ex, lf = s["execution_accuracy"], s["logical_form_accuracy"]
        lines.append(
            f"| {label} | {int(s['trainable_params']['mean']):,} | {_spread(ex)} | {_spread(lf)} | "
            f"{s['peak_memory_gb_per_rank']:.2f} GB | {s['step_time_s']:.2f} s |"
        )
    return "\n".join(lines)


def plot(path: Path, floor_acc: float, rows: list[tuple[str, dict]]) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    labels = ["untrained"] + [label for label, _ in rows]
    means = [floor_acc] + [s["execution_accuracy"]["mean"] for _, s in rows]
    low = [0.0] + [
        s["execution_accuracy"]["mean"] - s["execution_accuracy"]["min"] for _, s in rows
    ]
    high = [0.0] + [
        s["execution_accuracy"]["max"] - s["execution_accuracy"]["mean"] for _, s in rows
    ]
    fig, ax = plt.subplots(figsize=(10, 4.2))
    ax.bar(range(len(labels)), means, yerr=[low, high], capsize=3, color="#4c72b0")
    ax.set_xticks(range(len(labels)), labels, rotation=35, ha="right", fontsize=8)
    ax.set_ylabel("WikiSQL dev execution accuracy")
    ax.set_ylim(0, 1)
    ax.set_title("SmolLM2-135M-Instruct on the WikiSQL sample: LoRA vs full fine-tuning")
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    p.add_argument("--name", default="paper_claims")
    p.add_argument("--results", type=Path, default=REPO / "benchmarks" / "results")
    p.add_argument("--work_dir", type=Path, default=REPO / "runs" / "paper_claims")
    p.add_argument("--epochs", type=float, default=1.0)
    p.add_argument("--prompts", type=int, default=None, help="dev prompts scored (default: all)")
    p.add_argument("--quick", action="store_true", help="tiny model, 2 steps: a smoke test")
    p.add_argument(
        "--stages",
        default="lr,headline,rank,targets",
        help="comma-separated, run in this order; without lr, --lora_lr and --full_lr are used",
    )
    p.add_argument("--lora_lr", type=float, default=1e-3, help="LoRA's lr when lr is not swept")
    p.add_argument("--full_lr", type=float, default=5e-5, help="full FT's lr when lr is not swept")
    p.add_argument(
        "--lock", help="take this flock(1) file around each run, not the whole benchmark"
    )
    p.add_argument("--cached_only", action="store_true", help="tables from finished runs only")
    a = p.parse_args()
    if a.lock:
        LOCK[:] = ["flock", a.lock]
    CACHED_ONLY[0] = a.cached_only
    a.work_dir.mkdir(parents=True, exist_ok=True)
    a.results.mkdir(parents=True, exist_ok=True)
    model = "tiny" if a.quick else ""
    common = ["--ds_config", str(DS_CONFIG), "--epochs", str(a.epochs), "--max_length", "256"]
    common += ["--eval_every", "1000000", "--eval_max_new_tokens", "48"]
    common += ["--model", model] if model else []
    if a.quick:
        common += ["--max_steps", "2"]
    n = 4 if a.quick else a.prompts

    def epochs(factor: int) -> tuple[str, list[str]]:
        """The tag suffix and flags for `factor` times the shared epochs (none at 1)."""
        return ("", []) if factor == 1 else (f"-ex{factor}", ["--epochs", str(factor * a.epochs)])

    def lora(r: int, targets: str, lr: float, seed: int, factor: int = 1) -> dict | None:
        # Runs are named by their settings, so one configuration is trained once and shared by
        # every stage that needs it (the headline's seed 0 is also a point of each sweep).
        suffix, more = epochs(factor)
        tag = f"lora-{targets}-r{r}-lr{lr:g}-s{seed}{suffix}"
        extra = ["--lora_r", str(r), "--lora_alpha", str(2 * r), "--lora_targets", targets]
        extra += ["--lr", str(lr), "--seed", str(seed), *more]
        return train(a.work_dir, tag, common, extra, n)

    def full(lr: float, seed: int, factor: int = 1) -> dict | None:
        suffix, more = epochs(factor)
        extra = ["--full_finetune", "--lr", str(lr), "--seed", str(seed), *more]
        return train(a.work_dir, f"full-lr{lr:g}-s{seed}{suffix}", common, extra, n)

    def best(runs: list[dict]) -> dict:
        return max(runs, key=lambda r: (r["execution_accuracy"], -r["dev_loss"]))

    def lr_sweep(run: Any, lrs: tuple[float, ...]) -> dict[str, dict]:
        """`run` at each lr; while the best is the highest lr tried, the sweep goes on doubling
        (at most EXTEND_LRS more points), so each method's chosen lr has a worse one above it."""
        done = {lr: run(lr) for lr in lrs}
        extended = 0
        while not a.quick and extended < EXTEND_LRS:
            finished = {lr: r for lr, r in done.items() if r is not None}
            if not finished or best(list(finished.values())) is not finished[max(finished)]:
                break
            top = 2 * max(finished)
            done[top] = run(top)
            extended += 1
            if done[top] is None:  # --cached_only and not run yet
                break
        return {f"{lr:g}": r for lr, r in sorted(done.items()) if r is not None}

    result: dict[str, Any] = {"floor": floor(a.work_dir, model, n)}
    result["settings"] = {"epochs": a.epochs, "prompts": n, "ds_config": str(DS_CONFIG)}
    lr_of = {"lora": a.lora_lr, "full": a.full_lr}
    rows: list[tuple[str, dict]] = []
    for stage in a.stages.split(","):
        if stage == "lr":  # seed 0; the chosen lr applies to the stages after this one
            lrs_l, lrs_f = (LORA_LRS[:1], FULL_LRS[:1]) if a.quick else (LORA_LRS, FULL_LRS)
            sweep = {
                "lora": lr_sweep(lambda lr: lora(8, "attn", lr, 0), lrs_l),
                "full": lr_sweep(lambda lr: full(lr, 0), lrs_f),
            }
            chosen = {k: best(list(v.values())) for k, v in sweep.items()}
            lr_of = {
                k: float(next(lr for lr, r in sweep[k].items() if r is chosen[k])) for k in sweep
            }
            result["lr_sweep"] = {
                "runs": sweep,
                "chosen": lr_of,
                "ratios_at_chosen_lr_seed0": ratios(
                    summarize([chosen["full"]]), summarize([chosen["lora"]])
                ),
            }
            for method, label in (("full", "full FT"), ("lora", "LoRA q,v r=8")):
                rows += [
                    (f"{label}, lr {lr}, seed 0", summarize([r])) for lr, r in sweep[method].items()
                ]
        elif stage == "headline":
            seeds = SEEDS[:1] if a.quick else SEEDS
            head_full = [full(lr_of["full"], s) for s in seeds]
            head_lora = [lora(8, "attn", lr_of["lora"], s) for s in seeds]
            f, l_ = summarize(head_full), summarize(head_lora)
            result["headline"] = {"full fine-tuning": f, "LoRA q,v r=8": l_, "lr": dict(lr_of)}
            rows[:0] = [
                (f"full fine-tuning (lr {lr_of['full']:g})", f),
                (f"LoRA q,v r=8 (lr {lr_of['lora']:g})", l_),
            ]
            result["ratios"] = ratios(f, l_)
        elif stage == "rank":
            ranks = RANKS[:1] if a.quick else RANKS
            runs = [lora(r, "attn", lr_of["lora"], 0) for r in ranks]
            sweep_rows = [
                (f"q,v r={r} (lr {lr_of['lora']:g})", summarize([run]))
                for r, run in zip(ranks, runs, strict=True)
                if run is not None
            ]
            result["rank_sweep"] = dict(sweep_rows)
            rows += sweep_rows
        elif stage == "targets":
            specs = TARGETS[:1] if a.quick else TARGETS
            runs = [lora(r, spec, lr_of["lora"], 0) for _, spec, r in specs]
            sweep_rows = [
                (f"{label} r={r} (lr {lr_of['lora']:g})", summarize([run]))
                for (label, _, r), run in zip(specs, runs, strict=True)
                if run is not None
            ]
            result["target_sweep"] = dict(sweep_rows)
            rows += sweep_rows
        elif stage == "steps":  # a later flag on the command line wins: --epochs is doubled
            runs = {
                "lora": lora(8, "attn", lr_of["lora"], 0, factor=2),
                "full": full(lr_of["full"], 0, factor=2),
            }
            sweep_rows = [
                (f"{label}, lr {lr_of[k]:g}, {2 * a.epochs:g} epochs", summarize([runs[k]]))
                for k, label in (("full", "full FT"), ("lora", "LoRA q,v r=8"))
                if runs[k] is not None
            ]
            result["steps"] = dict(sweep_rows)
            if runs["lora"] is not None and runs["full"] is not None:
                result["steps"]["ratios"] = ratios(
                    summarize([runs["full"]]), summarize([runs["lora"]])
                )
            rows += sweep_rows
        else:
            raise SystemExit(f"unknown stage {stage!r}: use lr, headline, rank, targets, steps")
        # Written after every stage: a run cut short keeps what it measured.
        (a.results / f"{a.name}.json").write_text(json.dumps(result, indent=2) + "\n")
        plot(a.results / f"{a.name}.png", result["floor"]["execution_accuracy"], rows)
        (a.results / f"{a.name}.md").write_text(table(rows) + "\n")
    print(f"untrained: execution accuracy {result['floor']['execution_accuracy']:.3f}")
    print(table(rows))
    print(json.dumps(result.get("ratios"), indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
