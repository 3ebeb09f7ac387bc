"""The paper's Section 7 on the project's default model: Figures 3 and 4 and Table 7.

Trains three LoRA adapters on q and v with the project's trainer (`deepspeed --num_gpus 2
launcher/train.py`, bf16, ZeRO-3, the shipped WikiSQL sample, the same data and steps):
r=8 and r=64 with one seed, and r=8 with a second seed. lora_alpha is the same for both ranks,
as in the paper (alpha is set once and not tuned), so s = alpha/r is 8x smaller at r=64. Then:

  spectrum_r8, spectrum_r64     singular values and ||ΔW||_F per layer
  similarity_r8_r64             Figure 3: φ between the A matrices of r=8 and r=64
  similarity_seeds_r8           Figure 4: φ between two seeds (the paper used r=64 there)
  amplification_r8, _r64        Table 7: ||UᵀWVᵀ||_F for U, V from ΔW, W and random; ||ΔW||/that
  amplification_r64_top8        the r=64 update seen through its top 8 directions only

each as JSON and PNG figures under --results (default benchmarks/results/section7/), plus
section7.json and summary.md with the middle layer's numbers (the paper reports GPT-3's layer
48 of 96). Runs are cached in --work_dir: a finished run is not trained again.

    flock /tmp/multirank.lock env PYTHONPATH=. python benchmarks/section7.py
    PYTHONPATH=. python benchmarks/section7.py --model tiny --max_steps 3 --results /tmp/s7
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import statistics
import subprocess
import sys
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
DS_CONFIG = REPO / "benchmarks" / "ds_paper_claims.json"  # bf16, ZeRO-3, global batch 16
RUNS = {"r8": (8, 0), "r64": (64, 0), "r8_seed1": (8, 1)}  # tag -> (rank, seed)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def train(out: Path, rank: int, seed: int, common: list[str]) -> None:
    """One trainer run into `out`, skipped when it already finished."""
    if (out / "adapter" / "adapter_config.json").is_file() and (out / "metrics.json").is_file():
        return
    out.mkdir(parents=True, exist_ok=True)
    cmd = [str(Path(sys.executable).parent / "deepspeed"), "--num_gpus", "2"]
    cmd += ["--master_port", str(free_port()), str(REPO / "launcher" / "train.py"), *common]
    cmd += ["--lora_targets", "attn", "--lora_r", str(rank), "--seed", str(seed)]
    cmd += ["--output_dir", str(out)]
    env = {**os.environ, "LORA_DIST_NO_PROGRESS": "1", "PYTHONPATH": str(REPO)}
    with open(out.with_suffix(".log"), "w") as log:
        done = subprocess.run(cmd, cwd=REPO, env=env, stdout=log, stderr=subprocess.STDOUT)
    if done.returncode != 0:
        raise SystemExit(f"training {out.name} failed ({done.returncode}); see {log.name}")


def analyze(*argv: str) -> dict[str, Any]:
    """`lora-dist analyze ...` in this process; returns the JSON it wrote."""
    from lora_dist.cli import main as cli

    if cli(["analyze", *argv]) != 0:
        raise SystemExit(f"lora-dist analyze {' '.join(argv)} failed")
    out = Path(argv[argv.index("--output_dir") + 1])
    return json.loads((out / f"{argv[0]}.json").read_text())


def middle(rows: list[dict]) -> int:
    layers = sorted({r["layer"] for r in rows if r["layer"] is not None})
    return layers[len(layers) // 2]


def pick(rows: list[dict], kind: str, layer: int) -> dict:
    return next(r for r in rows if r["kind"] == kind and r["layer"] == layer)


def mean_over_layers(rows: list[dict], kind: str, value) -> float:
    return statistics.fmean(value(r) for r in rows if r["kind"] == kind)


def summarize(reports: dict[str, dict], runs: dict[str, dict]) -> dict[str, Any]:
    """The numbers the paper reports, at the middle layer and averaged over layers."""
    sim = reports["similarity_r8_r64"]["targets"]
    layer = middle(sim)
    out: dict[str, Any] = {"middle_layer": layer, "runs": runs, "figure3": {}, "figure4": {}}
    for fig, name in (("figure3", "similarity_r8_r64"), ("figure4", "similarity_seeds_r8")):
        rows = reports[name]["targets"]
        for kind in ("q_proj", "v_proj"):
            row = pick(rows, kind, layer)
            out[fig][kind] = {
                "phi_1_1_middle_layer": row["phi"][0][0],
                "phi_diagonal_middle_layer": row["phi_diagonal"],
                "phi_1_1_mean_over_layers": mean_over_layers(rows, kind, lambda r: r["phi"][0][0]),
                "chance_phi_1_1": row["expected_random_diagonal"][0],
            }
    out["table7"] = {}
    kept = ("k", "w_frobenius_norm", "delta_frobenius_norm", "projection", "amplification")
    for name in ("amplification_r8", "amplification_r64", "amplification_r64_top8"):
        rows = reports[name]["targets"]
        out["table7"][name] = {}
        for kind in ("q_proj", "v_proj"):
            row = pick(rows, kind, layer)
            out["table7"][name][kind] = {k: row[k] for k in kept}
            out["table7"][name][kind]["amplification_mean_over_layers"] = mean_over_layers(
                rows, kind, lambda r: r["amplification"]
            )
    for name in ("spectrum_r8", "spectrum_r64"):
        rows = reports[name]["targets"]
        out[name] = {
            kind: {
                "effective_rank_90_mean": mean_over_layers(
                    rows, kind, lambda r: r["effective_rank_90"]
                ),
                "top1_energy_mean": mean_over_layers(rows, kind, lambda r: r["energy"][0]),
            }
            for kind in ("q_proj", "v_proj")
        }
    return out


def markdown(s: dict[str, Any]) -> str:
    """summary.md: Table 7 for W_q at the middle layer, and φ(1, 1) for Figures 3 and 4."""
    layer = s["middle_layer"]
    lines = [
        f"Middle layer: {layer}.",
        "",
        f"| W_q, layer {layer} | k | ||UᵀWVᵀ||_F, U,V of ΔW | of W | random | ||W||_F "
        "| ||ΔW||_F | amplification |",
        "|---|---|---|---|---|---|---|---|",
    ]
    labels = {"amplification_r8": "r=8", "amplification_r64": "r=64"}
    labels["amplification_r64_top8"] = "r=64, top 8"
    for name, label in labels.items():
        q = s["table7"][name]["q_proj"]
        p = q["projection"]
        cells = [label, q["k"], f"{p['delta']:.3f}", f"{p['w']:.3f}", f"{p['random']:.3f}"]
        cells += [f"{q['w_frobenius_norm']:.2f}", f"{q['delta_frobenius_norm']:.3f}"]
        cells += [f"{q['amplification']:.2f}"]
        lines.append("| " + " | ".join(map(str, cells)) + " |")
    lines += [
        "",
        f"| φ(1, 1) | q, layer {layer} | v, layer {layer} | q, mean of layers "
        "| v, mean of layers | chance (1/k) |",
        "|---|---|---|---|---|---|",
    ]
    figures = {"figure3": "r=8 vs r=64 (Figure 3)", "figure4": "r=8, seed 0 vs 1 (Figure 4)"}
    for fig, label in figures.items():
        q, v = s[fig]["q_proj"], s[fig]["v_proj"]
        cells = [q["phi_1_1_middle_layer"], v["phi_1_1_middle_layer"]]
        cells += [q["phi_1_1_mean_over_layers"], v["phi_1_1_mean_over_layers"]]
        cells += [q["chance_phi_1_1"]]
        lines.append(f"| {label} | " + " | ".join(f"{c:.3f}" for c in cells) + " |")
    return "\n".join(lines) + "\n"


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    p.add_argument("--model", default=None, help="trainer --model (default: the trainer's default)")
    p.add_argument("--base", default=None, help="base for amplification (default: the adapters')")
    p.add_argument("--ds_config", default=str(DS_CONFIG))
    p.add_argument("--epochs", type=float, default=2.0)
    p.add_argument("--max_steps", type=int, default=None)
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--lora_alpha", type=float, default=16.0, help="the same for every rank")
    p.add_argument("--work_dir", type=Path, default=REPO / "runs" / "section7")
    p.add_argument("--results", type=Path, default=REPO / "benchmarks" / "results" / "section7")
    p.add_argument("--layers", type=int, action="append", default=[],
                   help="layers to draw φ heatmaps for (default: the middle one)")  # fmt: skip
    a = p.parse_args()
    common = ["--ds_config", a.ds_config, "--lr", str(a.lr), "--lora_alpha", str(a.lora_alpha)]
    common += ["--epochs", str(a.epochs), "--skip_task_eval", "--eval_every", "1000000"]
    common += ["--model", a.model] if a.model else []
    common += ["--max_steps", str(a.max_steps)] if a.max_steps else []
    runs: dict[str, dict] = {}
    for tag, (rank, seed) in RUNS.items():
        train(a.work_dir / tag, rank, seed, common)
        metrics = json.loads((a.work_dir / tag / "metrics.json").read_text())
        runs[tag] = {"rank": rank, "seed": seed}
        kept = ("steps", "elapsed_s", "trainable_params", "dev_loss_initial", "dev_loss")
        runs[tag].update({k: metrics.get(k) for k in kept})
        print(f"{tag}: {runs[tag]}", file=sys.stderr, flush=True)

    adapter = {tag: str(a.work_dir / tag / "adapter") for tag in RUNS}
    base = ["--model", a.base] if a.base else []  # default: the base the adapter names
    layer_flags = [f for layer in a.layers for f in ("--layers", str(layer))]
    jobs = {
        "spectrum_r8": ["spectrum", adapter["r8"]],
        "spectrum_r64": ["spectrum", adapter["r64"]],
        "similarity_r8_r64": ["similarity", adapter["r8"], adapter["r64"], *layer_flags],
        "similarity_seeds_r8": ["similarity", adapter["r8"], adapter["r8_seed1"], *layer_flags],
        "amplification_r8": ["amplification", adapter["r8"], *base],
        "amplification_r64": ["amplification", adapter["r64"], *base],
        "amplification_r64_top8": ["amplification", adapter["r64"], *base, "--top", "8"],
    }
    reports = {
        name: analyze(*argv, "--output_dir", str(a.results / name)) for name, argv in jobs.items()
    }
    summary = summarize(reports, runs)
    summary["settings"] = {k: str(v) for k, v in vars(a).items()}
    summary["base"] = reports["amplification_r8"]["base"]
    (a.results / "section7.json").write_text(json.dumps(summary, indent=1) + "\n")
    (a.results / "summary.md").write_text(markdown(summary))
    print(markdown(summary))
    return 0


if __name__ == "__main__":
    sys.exit(main())
