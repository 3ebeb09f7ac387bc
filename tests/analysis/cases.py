"""Adapters and base checkpoints on disk for the analysis tests, written without lora-dist code,
and the dense float64 references every analysed quantity is compared with."""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors.torch import save_file

from lora_dist.analysis.lowrank import random_orthonormal
from lora_dist.analysis.reports import target_seed


def write_adapter(
    out: Path, factors: dict[str, tuple[torch.Tensor, torch.Tensor]], **config
) -> Path:
    """A PEFT adapter directory: {module: (A, B)} as float32 factors plus adapter_config.json."""
    out.mkdir(parents=True, exist_ok=True)
    tensors = {}
    for module, (a, b) in factors.items():
        tensors[f"base_model.model.{module}.lora_A.weight"] = a.float().contiguous()
        tensors[f"base_model.model.{module}.lora_B.weight"] = b.float().contiguous()
    save_file(tensors, str(out / "adapter_model.safetensors"))
    cfg = {
        "peft_type": "LORA",
        "r": 4,
        "lora_alpha": 8,
        "target_modules": sorted({m.rsplit(".", 1)[-1] for m in factors}),
        "fan_in_fan_out": False,
        "use_rslora": False,
        "rank_pattern": {},
        "alpha_pattern": {},
        "bias": "none",
    }
    cfg.update(config)
    (out / "adapter_config.json").write_text(json.dumps(cfg))
    return out


def write_base(out: Path, tensors: dict[str, torch.Tensor], shards: int = 1) -> Path:
    """A model directory: one model.safetensors, or `shards` files and an index."""
    out.mkdir(parents=True, exist_ok=True)
    names = sorted(tensors)
    if shards == 1:
        save_file({n: tensors[n].contiguous() for n in names}, str(out / "model.safetensors"))
        return out
    weight_map = {}
    for i in range(shards):
        file = f"model-{i + 1:05d}-of-{shards:05d}.safetensors"
        part = {n: tensors[n].contiguous() for n in names[i::shards]}
        save_file(part, str(out / file))
        weight_map.update(dict.fromkeys(part, file))
    (out / "model.safetensors.index.json").write_text(json.dumps({"weight_map": weight_map}))
    return out


def dense_spectrum(delta: torch.Tensor, rank: int) -> torch.Tensor:
    """The top `rank` singular values of an explicit ΔW."""
    return torch.linalg.svdvals(delta.double())[:rank]


def dense_table7(
    w: torch.Tensor, delta: torch.Tensor, k: int, seed: int, name: str
) -> dict[str, float]:
    """Table 7's row from explicit W and ΔW (out x in) with full SVDs.

    The random subspace is the report's own seeded draw (the same generator calls), so that the
    comparison checks the streamed products; its distribution is tested separately.
    """
    w, delta = w.double(), delta.double()
    u, s, vh = torch.linalg.svd(delta, full_matrices=False)
    uw, sw, vhw = torch.linalg.svd(w, full_matrices=False)
    gen = torch.Generator().manual_seed(target_seed(seed, name))
    u_rand = random_orthonormal(w.shape[0], k, gen)
    v_rand = random_orthonormal(w.shape[1], k, gen)
    through_delta = float(torch.linalg.matrix_norm(u[:, :k].T @ w @ vh[:k].T))
    return {
        "delta": through_delta,
        "w": float(torch.linalg.matrix_norm(uw[:, :k].T @ w @ vhw[:k].T)),
        "random": float(torch.linalg.matrix_norm(u_rand.T @ w @ v_rand)),
        "w_norm": float(torch.linalg.matrix_norm(w)),
        "delta_norm": float(torch.linalg.matrix_norm(delta)),
        "amplification": float(torch.linalg.matrix_norm(delta)) / through_delta,
    }


def assert_row_matches(row: dict, ref: dict[str, float], tol: float = 1e-6) -> None:
    """An amplification report row against dense_table7, every quantity to `tol` (relative)."""
    got = {
        "delta": row["projection"]["delta"],
        "w": row["projection"]["w"],
        "random": row["projection"]["random"],
        "w_norm": row["w_frobenius_norm"],
        "delta_norm": row["delta_frobenius_norm"],
        "amplification": row["amplification"],
    }
    for key, want in ref.items():
        assert abs(got[key] - want) <= tol * max(1.0, abs(want)), (row["name"], key, got[key], want)
