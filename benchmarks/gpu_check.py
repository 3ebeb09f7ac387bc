"""The one-GPU readiness check that benchmarks/gpu_check.sh runs; every figure goes to one JSON.

Each item runs in its own process (the deepspeed launcher with one rank, so NCCL on a GPU) and
records {"ok", "seconds", ...figures} or the error, and the JSON is rewritten after every item,
so a check cut short still leaves what it measured. Items, in order:

  environment   versions, the GPU, NCCL, bf16 support
  ds_report     DeepSpeed's own report (saved next to the JSON), and its time
  fused_ops     time to JIT-build DeepSpeed's FusedAdam into a fresh TORCH_EXTENSIONS_DIR (the
                later items reuse it)
  model         a LLaMA-shaped model built from a config (~1.1B: hidden 2048, 22 layers, 32000
                vocabulary) saved in bf16, and a token set
  main_job      lora-dist train on it in bf16 (ZeRO-3, 20 steps, a checkpoint at 10): tokens/s,
                MFU, CUDA peak memory allocated and reserved (reset after setup)
  resume        the same run resumed from its step-10 checkpoint: losses 11-20 against it
  ratios        benchmarks/bench_memory_speed.py's lora, full and peft workers at one setting:
                tokens/s and peak memory of full fine-tuning and of PEFT over lora-dist's LoRA
  decode        greedy decode tokens/s of the model under ZeRO-3 against the plain module
  smollm2       the README's main job on the real default model, SmolLM2-135M-Instruct
  fp16_resume   the tiny model in fp16, overflowing at first: skipped steps are retried, and a
                resume carries the loss scale

--dry-run does all of it on the CPU with tiny models in about a minute, to prove the script.
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
import traceback
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
BENCH = REPO / "benchmarks" / "bench_memory_speed.py"
# Dense bf16 TFLOP/s (fp16 for V100) by a substring of torch.cuda.get_device_name().
PEAK_TFLOPS = {"H200": 989, "H100": 989, "A100": 312, "L40S": 362, "A10": 125, "V100": 125}
LLAMA_1B = dict(hidden_size=2048, intermediate_size=5632, num_hidden_layers=22,
                num_attention_heads=32, num_key_value_heads=4, vocab_size=32000)  # fmt: skip
LLAMA_DRY = dict(hidden_size=64, intermediate_size=176, num_hidden_layers=2,
                 num_attention_heads=4, num_key_value_heads=2, vocab_size=1024)  # fmt: skip


class Check:
    """Runs the items, keeps the figures, rewrites the JSON after each."""

    def __init__(self, args: argparse.Namespace) -> None:
        self.args, self.dry = args, args.dry_run
        self.work = Path(args.work).resolve()
        self.work.mkdir(parents=True, exist_ok=True)
        self.out = Path(args.out).resolve()
        self.started = time.monotonic()
        self.results: dict = {"dry_run": self.dry, "work_dir": str(self.work), "items": {}}
        self.env = dict(os.environ, PYTHONPATH=str(REPO), LORA_DIST_NO_PROGRESS="1")
        self.env["LORA_DIST_CACHE"] = str(self.work / "model_cache")
        if not self.dry:  # a fresh build directory, so fused_ops times a real build
            self.env["TORCH_EXTENSIONS_DIR"] = str(self.work / "torch_extensions")
        self.steps = 4 if self.dry else 20
        self.save_at = 2 if self.dry else 10

    # -- running ------------------------------------------------------------------------------
    def item(self, name: str, fn) -> None:
        left = self.args.budget_s - (time.monotonic() - self.started)
        if left < 20:
            self.results["items"][name] = {"ok": False, "skipped": "time budget spent"}
            self.save()
            return
        t0 = time.monotonic()
        print(f"[gpu_check] {name} ...", file=sys.stderr, flush=True)
        try:
            figures = fn() or {}
            record = {"ok": True, **figures}
        except Exception as exc:  # one item's failure must not hide the others' figures
            record = {"ok": False, "error": f"{type(exc).__name__}: {exc}"}
            (self.work / f"{name}.traceback.txt").write_text(traceback.format_exc())
        record["seconds"] = round(time.monotonic() - t0, 1)
        status = "ok" if record["ok"] else record["error"][:300]
        print(f"[gpu_check] {name}: {status} ({record['seconds']} s)", file=sys.stderr, flush=True)
        self.results["items"][name] = record
        self.save()

    def save(self) -> None:
        self.results["elapsed_s"] = round(time.monotonic() - self.started, 1)
        self.out.parent.mkdir(parents=True, exist_ok=True)
        tmp = self.out.with_suffix(".tmp")
        tmp.write_text(json.dumps(self.results, indent=1, default=str) + "\n")
        tmp.replace(self.out)

    def run(self, cmd: list[str], log: str, timeout: float = 600) -> str:
        """Run `cmd` from the repository root; its output goes to <work>/<log>.log."""
        with open(self.work / f"{log}.log", "w") as f:
            done = subprocess.run(
                cmd, cwd=REPO, env=self.env, stdout=f, stderr=subprocess.STDOUT, timeout=timeout
            )
        text = (self.work / f"{log}.log").read_text(errors="replace")
        if done.returncode != 0:
            raise RuntimeError(f"exit {done.returncode}; last lines:\n{text[-2000:]}")
        return text

    def deepspeed(self, *args: str) -> list[str]:
        """One rank under the deepspeed launcher (NCCL on a GPU), on a free port."""
        launcher = shutil.which("deepspeed") or str(Path(sys.executable).parent / "deepspeed")
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        return [launcher, "--num_gpus", "1", "--master_port", str(port), *args]

    # -- items ----------------------------------------------------------------------------------
    def environment(self) -> dict:
        import deepspeed
        import peft
        import torch
        import transformers

        out = {"python": sys.version.split()[0], "torch": torch.__version__}
        out |= {"deepspeed": deepspeed.__version__, "transformers": transformers.__version__}
        out |= {"peft": peft.__version__, "cuda": torch.version.cuda}
        if not torch.cuda.is_available():
            if not self.dry:
                raise RuntimeError("torch sees no CUDA device (use --dry-run to check on a CPU)")
            return out | {"device": "cpu (dry run)"}
        props = torch.cuda.get_device_properties(0)
        out |= {"device": props.name, "memory_gib": round(props.total_memory / 2**30, 1)}
        out |= {
            "capability": f"{props.major}.{props.minor}",
            "gpus_visible": torch.cuda.device_count(),
        }
        out |= {
            "nccl": ".".join(map(str, torch.cuda.nccl.version())),
            "bf16": torch.cuda.is_bf16_supported(),
        }
        out["peak_tflops"] = next((v for k, v in PEAK_TFLOPS.items() if k in props.name), None)
        self.results["peak_tflops"] = out["peak_tflops"]
        return out

    def ds_report(self) -> dict:
        text = self.run([shutil.which("ds_report") or "ds_report"], "ds_report", timeout=300)
        return {"report": str(self.work / "ds_report.log"), "lines": len(text.splitlines())}

    def fused_ops(self) -> dict:
        code = (
            "import time; from deepspeed.accelerator import get_accelerator as a; "
            "b = a().create_op_builder('FusedAdamBuilder'); t = time.perf_counter(); b.load(); "
            "print('BUILD_S', time.perf_counter() - t)"
        )
        text = self.run([sys.executable, "-c", code], "fused_ops", timeout=900)
        seconds = float(text.split("BUILD_S")[-1].split()[0])
        where = self.env.get("TORCH_EXTENSIONS_DIR", "torch's default cache (dry run: prebuilt)")
        return {"fused_adam_load_s": round(seconds, 1), "extensions_dir": where}

    def model(self) -> dict:
        code = """
import json, shutil, sys, torch
from pathlib import Path
from transformers import LlamaConfig, LlamaForCausalLM
from lora_dist.models import resolve_model_dir
out, shape, seq = Path(sys.argv[1]), json.loads(sys.argv[2]), int(sys.argv[3])
cfg = LlamaConfig(**shape, max_position_embeddings=4096, tie_word_embeddings=False)
device = "cuda" if torch.cuda.is_available() else "cpu"
torch.manual_seed(0)
with torch.device(device):
    model = LlamaForCausalLM(cfg).to(torch.bfloat16)
model.save_pretrained(out, max_shard_size="2GB")
tok = resolve_model_dir("tiny")  # a tokenizer: 1024 ids, all inside the 32000-row vocabulary
for f in tok.iterdir():
    if "token" in f.name or f.name == "special_tokens_map.json":
        shutil.copy(f, out / f.name)
gen = torch.Generator().manual_seed(0)
torch.save(torch.randint(0, shape["vocab_size"], (64, seq), generator=gen), out / "tokens.pt")
print("PARAMS", sum(p.numel() for p in model.parameters()))
"""
        shape = LLAMA_DRY if self.dry else LLAMA_1B
        self.model_dir = self.work / "llama"
        seq = 64 if self.dry else 1024
        args = [str(self.model_dir), json.dumps(shape), str(seq)]
        text = self.run([sys.executable, "-c", code, *args], "model", timeout=600)
        self.params = int(text.split("PARAMS")[-1].split()[0])
        self.shape = shape
        return {"params": self.params, "shape": shape, "dir": str(self.model_dir), "seq": seq}

    def ds_json(self, name: str, **changes) -> Path:
        cfg = json.loads((REPO / "ds_configs" / "zero3.json").read_text())
        cfg.update(changes.pop("top", {}))
        for key, value in changes.items():
            cfg[key] = value
        cfg["tensorboard"] = {"enabled": False}
        path = self.work / f"{name}.json"
        path.write_text(json.dumps(cfg, indent=1))
        return path

    def train(self, name: str, model: str, ds: Path, *extra: str) -> dict:
        out = self.work / name
        flags = ["--model", model, "--ds_config", str(ds), "--output_dir", str(out)]
        flags += ["--max_steps", str(self.steps), "--eval_every", str(self.steps)]
        flags += ["--save_every", str(self.save_at), "--max_length", "64" if self.dry else "512"]
        cmd = self.deepspeed(str(REPO / "launcher" / "train.py"), *flags, *extra)
        self.run(cmd, name, timeout=900)
        return json.loads((out / "metrics.json").read_text())

    def figures(self, m: dict, model_dir: Path) -> dict:
        """Throughput, MFU and memory of a trainer run's metrics.json."""
        cfg = json.loads((model_dir / "config.json").read_text())
        layers, hidden, vocab = (cfg[k] for k in ("num_hidden_layers", "hidden_size", "vocab_size"))
        matmul = m["total_params"] - m["trainable_params"]  # the base
        if not cfg.get("tie_word_embeddings"):
            matmul -= vocab * hidden  # the input embedding is a lookup, not a matmul
        seq = m["tokens_per_s"] * m["step_time_median_s"] / m["global_batch"]
        # Frozen base: 2N forward + 2N for input gradients; attention 4*seq*hidden per layer each.
        flops_token = 2 * (2 * matmul + 4 * seq * hidden * layers)
        peak = self.results.get("peak_tflops")
        return {
            "tokens_per_s": round(m["tokens_per_s"], 1),
            "step_time_median_s": m["step_time_median_s"],
            "mean_tokens_per_sequence": round(seq, 1),
            "mfu": round(m["tokens_per_s"] * flops_token / (peak * 1e12), 4) if peak else None,
            "flops_per_token": flops_token,
            "flops_convention": "2 x (2N + 4 seq hidden layers): forward and input gradients, "
            "no base weight gradients (LoRA)",
            "peak_allocated_gib": round(m["peak_memory_bytes_per_rank"][0] / 2**30, 3),
            "peak_reserved_gib": round(m["peak_memory_reserved_bytes_per_rank"][0] / 2**30, 3),
            "peak_kind": m["peak_memory_kind"],
            "peak_scope": m["peak_memory_scope"],
            "train_loss_first_last": [m["train_losses"][0][1], m["train_losses"][-1][1]],
            "dev_loss": m["dev_loss"],
            "skipped_steps": m.get("skipped_steps"),
        }

    def main_job(self) -> dict:
        ds = self.ds_json(
            "ds_main", top={"train_batch_size": 16, "train_micro_batch_size_per_gpu": 4}
        )
        self.main = self.train("main", str(self.model_dir), ds, "--skip_task_eval")
        return self.figures(self.main, self.model_dir)

    def resume(self) -> dict:
        src, out = self.work / "main" / "checkpoints", self.work / "resume"
        shutil.copytree(src / f"step-{self.save_at}", out / "checkpoints" / f"step-{self.save_at}")
        (out / "checkpoints" / "latest").write_text(f"step-{self.save_at}\n")
        ds = self.work / "ds_main.json"
        got = self.train("resume", str(self.model_dir), ds, "--skip_task_eval", "--resume", "auto")
        ref = dict(map(tuple, self.main["train_losses"]))
        diffs = {s: abs(loss - ref[s]) / abs(ref[s]) for s, loss in got["train_losses"]}
        assert sorted(diffs) == list(range(self.save_at + 1, self.steps + 1)), sorted(diffs)
        worst = max(diffs.values())
        if worst > 2e-3:
            raise AssertionError(f"resumed losses differ from the uninterrupted run by {worst:.2e}")
        return {"steps_compared": sorted(diffs), "max_rel_loss_diff": worst,
                "bit_exact": worst == 0.0}  # fmt: skip

    def ratios(self) -> dict:
        ds = self.ds_json("ds_bench", top={"train_micro_batch_size_per_gpu": 1,
                                           "gradient_accumulation_steps": 1})  # fmt: skip
        runs = {}
        for worker in ("lora", "full", "peft"):
            out = self.work / "bench" / worker
            out.parent.mkdir(parents=True, exist_ok=True)
            cmd = self.deepspeed(str(BENCH), "--worker", worker, "--ds_config", str(ds))
            cmd += ["--model_dir", str(self.model_dir), "--data", str(self.model_dir / "tokens.pt")]
            cmd += ["--out", str(out), "--steps", "3" if self.dry else "6", "--warmup", "2"]
            self.run(cmd, f"bench_{worker}", timeout=900)
            runs[worker] = json.loads(Path(f"{out}.rank0.json").read_text())
        seq = int(__import__("torch").load(self.model_dir / "tokens.pt").shape[1])

        def tps(r: dict) -> float:
            return seq / (sum(r["step_times"]) / len(r["step_times"]))

        def peak(r: dict, key: str) -> float:
            return (r.get("cuda_peak") or {}).get(key) or r["train_peak_rss"]

        out = {w: {"tokens_per_s": round(tps(r), 1),
                   "peak_allocated_gib": round(peak(r, "allocated") / 2**30, 3),
                   "peak_reserved_gib": round(peak(r, "reserved") / 2**30, 3)}
               for w, r in runs.items()}  # fmt: skip
        lo = out["lora"]
        for other in ("full", "peft"):
            o = out[other]
            out[f"{other}_over_lora_tokens_per_s"] = round(
                o["tokens_per_s"] / lo["tokens_per_s"], 3
            )
            out[f"{other}_over_lora_peak_reserved"] = round(
                o["peak_reserved_gib"] / lo["peak_reserved_gib"], 3
            )
        return out | {"seq": seq, "micro_batch": 1}

    def decode(self) -> dict:
        out = self.work / "decode.json"
        cmd = self.deepspeed(str(Path(__file__)), "--worker", "decode")
        cmd += ["--model_dir", str(self.model_dir), "--out", str(out), "--work", str(self.work)]
        if self.dry:
            cmd.append("--dry-run")
        self.run(cmd, "decode", timeout=600)
        return json.loads(out.read_text())

    def smollm2(self) -> dict:
        model = "tiny" if self.dry else "smollm2-135m-instruct"
        ds = self.ds_json("ds_smol")  # ds_configs/zero3.json as the README runs it
        flags = ("--eval_limit", "8", "--eval_max_new_tokens", "32" if not self.dry else "4")
        m = self.train("smollm2", model, ds, *flags)
        from lora_dist.models import resolve_model_dir  # built by the run, in the same cache

        os.environ["LORA_DIST_CACHE"] = self.env["LORA_DIST_CACHE"]
        fig = self.figures(m, resolve_model_dir(model))
        return fig | {"model": model, "task_metrics": m["task_metrics"]}

    def fp16_resume(self) -> dict:
        from deepspeed.accelerator import get_accelerator

        if not get_accelerator().is_fp16_supported():  # this CPU (dry run): DeepSpeed refuses
            return {"skipped": f"{get_accelerator().device_name()} accelerator: no fp16"}
        # 2^24 overflows a random model's fp16 gradients: the first steps are skipped and retried
        fp16 = {"enabled": True, "initial_scale_power": 24, "loss_scale_window": 1000}
        ds = self.ds_json("ds_fp16", bf16={"enabled": False}, fp16=fp16)
        a = self.train("fp16_a", "tiny", ds, "--skip_task_eval")
        src, out = self.work / "fp16_a" / "checkpoints", self.work / "fp16_b" / "checkpoints"
        shutil.copytree(src / f"step-{self.save_at}", out / f"step-{self.save_at}")
        (out / "latest").write_text(f"step-{self.save_at}\n")
        b = self.train("fp16_b", "tiny", ds, "--skip_task_eval", "--resume", "auto")
        log = lambda run: [json.loads(x) for x in (self.work / run / "train_log.jsonl").open()]  # noqa: E731
        scale_a = {r["step"]: r.get("loss_scale") for r in log("fp16_a")}
        scale_b = {r["step"]: r.get("loss_scale") for r in log("fp16_b")}
        ref = dict(map(tuple, a["train_losses"]))
        worst = max(abs(loss - ref[s]) / abs(ref[s]) for s, loss in b["train_losses"])
        assert all(scale_b[s] == scale_a[s] for s in scale_b), (scale_a, scale_b)
        assert a["steps"] == self.steps and a["skipped_steps"] > 0, a["skipped_steps"]
        return {"skipped_steps": a["skipped_steps"], "loss_scale_by_step": scale_a,
                "max_rel_loss_diff_after_resume": worst}  # fmt: skip

    def all(self) -> int:
        for name in ("environment", "ds_report", "fused_ops", "model", "main_job", "resume",
                     "ratios", "decode", "smollm2", "fp16_resume"):  # fmt: skip
            self.item(name, getattr(self, name))
        bad = [n for n, r in self.results["items"].items() if not r.get("ok")]
        self.results["failed"] = bad
        self.save()
        print(f"[gpu_check] wrote {self.out}; failed: {bad or 'none'}", file=sys.stderr)
        return 1 if bad else 0


def decode_worker(args: argparse.Namespace) -> None:
    """New tokens/s of a KV-cached greedy loop: the plain module, then under ZeRO-3."""
    import deepspeed
    import torch
    from transformers import AutoModelForCausalLM

    from lora_dist.distributed.ds_config import inference_config, load_ds_config, model_dtype
    from lora_dist.distributed.launch import init_distributed, shutdown_distributed
    from lora_dist.distributed.loading import load_base_model

    init_distributed()
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    batch, prompt, new = (2, 16, 8) if args.dry_run else (8, 128, 128)
    ids = torch.randint(0, 1000, (batch, prompt), generator=torch.Generator().manual_seed(0))

    @torch.no_grad()
    def tokens_per_s(model) -> float:
        def loop() -> None:
            out = model(input_ids=ids.to(device), use_cache=True)
            for _ in range(new):
                nxt = out.logits[:, -1:].argmax(-1)
                out = model(input_ids=nxt, past_key_values=out.past_key_values, use_cache=True)

        loop()  # warm-up
        if device.type == "cuda":
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        loop()
        if device.type == "cuda":
            torch.cuda.synchronize()
        return batch * new / (time.perf_counter() - t0)

    plain = AutoModelForCausalLM.from_pretrained(args.model_dir, dtype=torch.bfloat16).to(device)
    plain_tps = tokens_per_s(plain.eval())
    del plain
    cfg = load_ds_config(REPO / "ds_configs" / "zero3.json")
    cfg = inference_config(cfg, 1, 0)
    model = load_base_model(Path(args.model_dir), cfg, 3)
    engine, *_ = deepspeed.initialize(model=model, config=cfg)
    zero3_tps = tokens_per_s(engine.module.eval())
    result = {"plain_tokens_per_s": round(plain_tps, 1), "zero3_tokens_per_s": round(zero3_tps, 1)}
    result |= {"zero3_over_plain": round(zero3_tps / plain_tps, 3), "batch": batch}
    result |= {"prompt": prompt, "new_tokens": new, "dtype": str(model_dtype(cfg))}
    Path(args.out).write_text(json.dumps(result))
    shutdown_distributed()


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--out", default=str(REPO / "benchmarks" / "results" / "gpu_check.json"))
    p.add_argument("--work", default=os.environ.get("LORA_DIST_GPU_CHECK_DIR", "/tmp/gpu_check"))
    p.add_argument("--dry-run", action="store_true", help="the CPU, tiny models, world size 1")
    p.add_argument("--budget_s", type=float, default=450, help="skip items started after this")
    p.add_argument("--worker", choices=("decode",), help=argparse.SUPPRESS)
    p.add_argument("--model_dir", help=argparse.SUPPRESS)
    p.add_argument("--local_rank", type=int, default=-1, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.worker == "decode":
        decode_worker(args)
        return 0
    return Check(args).all()


if __name__ == "__main__":
    sys.exit(main())
