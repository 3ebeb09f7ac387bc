"""Peak host memory of `lora-dist analyze amplification` on a ~2B-parameter LLaMA-shaped model.

The model is built from a config straight into sharded bf16 safetensors, one tensor (in chunks
of rows) at a time, so the builder never holds more than a chunk; its tensor names and shapes
are checked against transformers' LlamaForCausalLM built on the meta device. A random PEFT
adapter (r=8 on q_proj and v_proj of every layer, and on lm_head, the largest tensor) is
analysed in a child process, which reports its RSS after imports and its peak (VmHWM). The claim
under test: the peak grows by about one base tensor, not with the model.

    flock /tmp/multirank.lock env PYTHONPATH=. python benchmarks/bench_analysis_memory.py
    PYTHONPATH=. python benchmarks/bench_analysis_memory.py --size quick   # seconds

Results: benchmarks/results/<name>.json.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import shutil
import struct
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
SIZES = {
    # hidden 2560, 24 layers, MLP 6912, vocab 32000: 2.07B parameters, 4.1 GB in bf16
    "2b": dict(hidden_size=2560, intermediate_size=6912, num_hidden_layers=24,
               num_attention_heads=20, num_key_value_heads=20, vocab_size=32000),
    "quick": dict(hidden_size=256, intermediate_size=688, num_hidden_layers=2,
                  num_attention_heads=4, num_key_value_heads=4, vocab_size=4000),
}  # fmt: skip
SHARD_BYTES = 1 << 30
CHUNK_ELEMENTS = 1 << 24  # rows generated at once by the builder: 64 MB of float32
RANK = 8


def status_kib(field: str) -> int:
    """A field of /proc/self/status in KiB (VmRSS: now, VmHWM: the peak)."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise KeyError(field)


def llama_tensors(cfg: dict) -> dict[str, tuple[int, ...]]:
    """Tensor name -> shape of a LlamaForCausalLM with untied embeddings, in file order."""
    h, i, v = cfg["hidden_size"], cfg["intermediate_size"], cfg["vocab_size"]
    kv = h // cfg["num_attention_heads"] * cfg["num_key_value_heads"]
    shapes: dict[str, tuple[int, ...]] = {"model.embed_tokens.weight": (v, h)}
    for layer in range(cfg["num_hidden_layers"]):
        p = f"model.layers.{layer}."
        shapes[p + "input_layernorm.weight"] = (h,)
        shapes[p + "self_attn.q_proj.weight"] = (h, h)
        shapes[p + "self_attn.k_proj.weight"] = (kv, h)
        shapes[p + "self_attn.v_proj.weight"] = (kv, h)
        shapes[p + "self_attn.o_proj.weight"] = (h, h)
        shapes[p + "post_attention_layernorm.weight"] = (h,)
        shapes[p + "mlp.gate_proj.weight"] = (i, h)
        shapes[p + "mlp.up_proj.weight"] = (i, h)
        shapes[p + "mlp.down_proj.weight"] = (h, i)
    shapes["model.norm.weight"] = (h,)
    shapes["lm_head.weight"] = (v, h)
    return shapes


def check_against_transformers(cfg: dict, shapes: dict[str, tuple[int, ...]]) -> None:
    """The names and shapes are exactly transformers' LlamaForCausalLM's (built on meta)."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    with torch.device("meta"):
        model = LlamaForCausalLM(LlamaConfig(**cfg))
    want = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    assert want == shapes, set(want.items()) ^ set(shapes.items())


def write_safetensors(path: Path, shapes: dict[str, tuple[int, ...]], fill) -> None:
    """One bf16 safetensors file written tensor by tensor: header first, then each tensor's
    bytes as `fill(name, shape, first_row, rows)` makes them, a chunk of rows at a time."""
    import torch

    header, offset = {}, 0
    for name, shape in shapes.items():
        nbytes = math.prod(shape) * 2
        header[name] = {
            "dtype": "BF16",
            "shape": list(shape),
            "data_offsets": [offset, offset + nbytes],
        }
        offset += nbytes
    header["__metadata__"] = {"format": "pt"}
    raw = json.dumps(header, separators=(",", ":")).encode()
    raw += b" " * (-len(raw) % 8)
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(raw)) + raw)
        for name, shape in shapes.items():
            cols = shape[1] if len(shape) == 2 else shape[0]
            rows = shape[0] if len(shape) == 2 else 1
            step = max(1, CHUNK_ELEMENTS // cols)
            for first in range(0, rows, step):
                n = min(step, rows - first)
                chunk = fill(name, shape, first, n).to(torch.bfloat16).contiguous()
                f.write(chunk.view(torch.uint8).numpy().tobytes())


def build_model(out: Path, cfg: dict, seed: int = 0) -> dict:
    """config.json, sharded bf16 safetensors and their index; returns what was built."""
    import torch

    shapes = llama_tensors(cfg)
    check_against_transformers(cfg, shapes)
    out.mkdir(parents=True, exist_ok=True)
    full_cfg = {"architectures": ["LlamaForCausalLM"], "model_type": "llama", **cfg,
                "tie_word_embeddings": False, "torch_dtype": "bfloat16"}  # fmt: skip
    (out / "config.json").write_text(json.dumps(full_cfg, indent=1))
    shards: list[dict[str, tuple[int, ...]]] = [{}]
    size = 0
    for name, shape in shapes.items():
        nbytes = math.prod(shape) * 2
        if shards[-1] and size + nbytes > SHARD_BYTES:
            shards.append({})
            size = 0
        shards[-1][name] = shape
        size += nbytes
    gen = torch.Generator().manual_seed(seed)

    def fill(name: str, shape: tuple[int, ...], first: int, rows: int) -> torch.Tensor:
        if len(shape) == 1:
            return torch.ones(shape)
        return torch.randn(rows, shape[1], generator=gen) * 0.02

    weight_map = {}
    for index, part in enumerate(shards):
        file = f"model-{index + 1:05d}-of-{len(shards):05d}.safetensors"
        write_safetensors(out / file, part, fill)
        weight_map.update(dict.fromkeys(part, file))
    total = sum(math.prod(s) for s in shapes.values())
    (out / "model.safetensors.index.json").write_text(
        json.dumps({"metadata": {"total_size": total * 2}, "weight_map": weight_map})
    )
    largest = max(shapes, key=lambda n: math.prod(shapes[n]))
    return {
        "parameters": total,
        "bytes": total * 2,
        "shards": len(shards),
        "largest_tensor": largest,
        "largest_tensor_bytes": math.prod(shapes[largest]) * 2,
        "shapes": shapes,
    }


def make_adapter(out: Path, shapes: dict[str, tuple[int, ...]], seed: int = 1) -> list[str]:
    """A random PEFT adapter (r=8) on every q_proj and v_proj, and on lm_head."""
    import torch
    from safetensors.torch import save_file

    modules = [
        n[: -len(".weight")] for n in shapes if n.endswith(("q_proj.weight", "v_proj.weight"))
    ]
    modules.append("lm_head")
    gen = torch.Generator().manual_seed(seed)
    tensors = {}
    for module in modules:
        out_dim, in_dim = shapes[module + ".weight"]
        tensors[f"base_model.model.{module}.lora_A.weight"] = (
            torch.randn(RANK, in_dim, generator=gen) / in_dim**0.5
        )
        tensors[f"base_model.model.{module}.lora_B.weight"] = (
            torch.randn(out_dim, RANK, generator=gen) * 0.01
        )
    out.mkdir(parents=True, exist_ok=True)
    save_file(tensors, str(out / "adapter_model.safetensors"))
    config = {"peft_type": "LORA", "r": RANK, "lora_alpha": 16, "bias": "none",
              "target_modules": ["q_proj", "v_proj", "lm_head"]}  # fmt: skip
    (out / "adapter_config.json").write_text(json.dumps(config))
    return modules


def child(argv: list[str]) -> None:
    """Run `lora-dist analyze` in this process and print its RSS after imports and its peak."""
    import matplotlib.figure  # noqa: F401  (imported by the command; counted in the baseline)
    import torch  # noqa: F401

    import lora_dist.commands.analyze.amplification  # noqa: F401  (the command and its imports)
    from lora_dist.cli import main

    baseline = status_kib("VmRSS")
    start = time.perf_counter()
    code = main(argv)
    seconds = time.perf_counter() - start
    print(json.dumps({"code": code, "baseline_kib": baseline, "peak_kib": status_kib("VmHWM"),
                      "seconds": seconds}))  # fmt: skip


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    parser.add_argument("--size", choices=sorted(SIZES), default="2b")
    parser.add_argument(
        "--name", default=None, help="results file name (default: analysis_memory_<size>)"
    )
    parser.add_argument("--results", default=str(REPO / "benchmarks" / "results"))
    parser.add_argument("--work_dir", default="/tmp/lora_dist_bench_analysis")
    parser.add_argument(
        "--max_iters", type=int, default=10, help="rounds of W's subspace iteration"
    )
    parser.add_argument("--keep", action="store_true", help="keep the built model")
    parser.add_argument("--child", nargs=argparse.REMAINDER, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child is not None:
        return child(args.child)

    work = Path(args.work_dir)
    shutil.rmtree(work, ignore_errors=True)
    cfg = SIZES[args.size]
    start = time.perf_counter()
    built = build_model(work / "model", cfg)
    build_seconds = time.perf_counter() - start
    builder_peak = status_kib("VmHWM")
    modules = make_adapter(work / "adapter", built["shapes"])
    adapted = max(modules, key=lambda m: math.prod(built["shapes"][m + ".weight"]))
    gib = builder_peak / 2**20
    print(f"built {built['parameters'] / 1e9:.2f}B parameters in {built['shards']} shards "
          f"({build_seconds:.0f} s, builder peak {gib:.2f} GiB)", flush=True)  # fmt: skip

    env = {**os.environ, "PYTHONPATH": str(REPO)}

    def analyse(tag: str, extra: list[str]) -> dict:
        """One child process running the analysis; its RSS after imports, peak and report."""
        argv = ["analyze", "amplification", str(work / "adapter"), "--model", str(work / "model")]
        argv += ["--output_dir", str(work / tag), "--max_iters", str(args.max_iters), *extra]
        cmd = [sys.executable, __file__, "--child", *argv]
        proc = subprocess.run(cmd, env=env, cwd=REPO, capture_output=True, text=True)
        if proc.returncode != 0:
            sys.exit(f"analysis failed:\n{proc.stderr[-4000:]}")
        measured = json.loads(proc.stdout.strip().splitlines()[-1])
        assert measured["code"] == 0, measured
        report = json.loads((work / tag / "amplification.json").read_text())
        return {
            "analysis_seconds": measured["seconds"],
            "targets_reported": len(report["targets"]),
            "rss_after_imports_bytes": measured["baseline_kib"] * 1024,
            "peak_rss_bytes": measured["peak_kib"] * 1024,
            "peak_growth_bytes": (measured["peak_kib"] - measured["baseline_kib"]) * 1024,
            "report": report,
        }

    # The same analysis side by side: the q,v modules alone (largest tensor read: q_proj), then
    # with lm_head (largest tensor read: the model's largest). The peak should move by about
    # the difference of those two tensors, whatever the model's size.
    qv = analyse("analysis_qv", ["--modules", "q_proj|v_proj"])
    full = analyse("analysis_all", [])
    q_bytes = math.prod(built["shapes"]["model.layers.0.self_attn.q_proj.weight"]) * 2
    largest = built["largest_tensor_bytes"]
    growth = full["peak_growth_bytes"]
    lm_head = next(r for r in full.pop("report")["targets"] if r["module"] == "lm_head")
    qv.pop("report")
    result = {
        "size": args.size,
        "config": cfg,
        "parameters": built["parameters"],
        "model_bytes": built["bytes"],
        "shards": built["shards"],
        "largest_tensor": built["largest_tensor"],
        "largest_tensor_bytes": largest,
        "q_proj_bytes": q_bytes,
        "largest_adapted_tensor": adapted + ".weight",
        "adapted_modules": len(modules),
        "lora_rank": RANK,
        "max_iters": args.max_iters,
        "builder_peak_rss_bytes": builder_peak * 1024,
        "build_seconds": build_seconds,
        "q_v_only": qv,
        "q_v_and_lm_head": full,
        "ratios": {
            "peak_growth_over_largest_tensor": growth / largest,
            "peak_growth_over_model": growth / built["bytes"],
            "peak_rss_over_model": full["peak_rss_bytes"] / built["bytes"],
            "growth_difference_over_tensor_difference": (growth - qv["peak_growth_bytes"])
            / (largest - q_bytes),
        },
        "lm_head_amplification": lm_head["amplification"],
    }
    results = Path(args.results)
    results.mkdir(parents=True, exist_ok=True)
    name = args.name or f"analysis_memory_{args.size}"
    (results / f"{name}.json").write_text(json.dumps(result, indent=1) + "\n")
    print(json.dumps({k: v for k, v in result.items() if k != "config"}, indent=1))
    if not args.keep:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
