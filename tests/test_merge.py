"""lora-dist merge and inspect (lora_dist.merge, lora_dist.inspection): merged models serve in plain
transformers; damage is refused."""

from __future__ import annotations

import json
import math
import os
import shutil
import subprocess
import sys
import textwrap
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaConfig, LlamaForCausalLM

from lora_dist import cli
from lora_dist.adapter import META_NAME, AdapterError, lora_state_dict, save_adapter
from lora_dist.inject import inject_lora
from lora_dist.lora import LoraConfig
from lora_dist.manifest import write_manifest
from lora_dist.merge import INDEX_NAME, SINGLE_NAME, MergeError, merge_checkpoint
from lora_dist.models import resolve_model_dir
from tests.tiny_models import randomize_lora_b, tiny_gpt2, tiny_llama, tokens

TOKENIZER_FILES = ("tokenizer.json", "tokenizer.model", "tokenizer_config.json")
TEXT = "SELECT name FROM table WHERE id = 7"

# Loads merged directories with nothing but transformers, and proves it via sys.modules.
CLEAN_LOADER = textwrap.dedent(
    """
    import json, sys
    import torch
    from safetensors.torch import save_file
    from transformers import AutoModelForCausalLM, AutoTokenizer
    jobs = json.loads(sys.argv[1])
    out = {}
    for name, job in jobs.items():
        model = AutoModelForCausalLM.from_pretrained(job["dir"], dtype=torch.float32).eval()
        with torch.no_grad():
            out[name] = model(torch.tensor(job["ids"])).logits.contiguous()
        if job.get("text"):
            ids = AutoTokenizer.from_pretrained(job["dir"])(job["text"])["input_ids"]
            out[name + ".tokens"] = torch.tensor(ids)
    leaked = sorted(m for m in sys.modules if m.split(".")[0] in ("lora_dist", "peft"))
    assert not leaked, f"the clean loader imported {leaked}"
    save_file(out, sys.argv[2])
    """
)


@dataclass
class Case:
    """A sharded base, an adapter for it, and the LoRA model's logits on `ids`."""

    base: Path
    adapter: Path
    ids: torch.Tensor
    lora_logits: torch.Tensor
    base_logits: torch.Tensor
    lora_params: int


def _make_case(root: Path, model, targets: str, rslora: bool, shard: str, name: str) -> Case:
    model.save_pretrained(root / "base", max_shard_size=shard)
    ids = tokens()
    with torch.no_grad():
        base_logits = model(ids).logits
    cfg = LoraConfig(r=4, alpha=8.0, targets=targets, use_rslora=rslora)
    report = inject_lora(model, cfg)
    randomize_lora_b(model)
    fan = any(layer.fan_in_fan_out for layer in report.layers.values())
    state = lora_state_dict(model)
    save_adapter(root / "adapter", state, cfg, report.target_modules, model.config, name, fan)
    with torch.no_grad():
        lora_logits = model(ids).logits
    assert (lora_logits - base_logits).abs().max() > 1e-3  # the adapter changes the outputs
    params = sum(t.numel() for t in state.values())
    return Case(root / "base", root / "adapter", ids, lora_logits, base_logits, params)


@pytest.fixture(scope="module")
def llama(tmp_path_factory: pytest.TempPathFactory) -> Case:
    """The embedded default LLaMA with its SentencePiece tokenizer, re-saved in ~15 shards."""
    root = tmp_path_factory.mktemp("llama")
    default = resolve_model_dir("tiny", root / "cache")
    model = AutoModelForCausalLM.from_pretrained(default, dtype=torch.float32).eval()
    case = _make_case(root, model, "all", True, "300KB", str(default))
    for name in TOKENIZER_FILES:
        shutil.copy(default / name, case.base / name)
    return case


@pytest.fixture(scope="module")
def gpt2(tmp_path_factory: pytest.TempPathFactory) -> Case:
    """Tiny GPT-2: Conv1D weights stored in x out, so the merge must transpose B·A."""
    return _make_case(tmp_path_factory.mktemp("gpt2"), tiny_gpt2(), "all", False, "20KB", "gpt2")


@pytest.fixture(scope="module")
def merged(llama: Case, gpt2: Case, tmp_path_factory: pytest.TempPathFactory) -> dict:
    """Both cases merged, then run in one subprocess that imports neither lora_dist nor peft."""
    root = tmp_path_factory.mktemp("merged")
    summaries = {
        "llama": merge_checkpoint(llama.base, llama.adapter, root / "llama", None, "200KB"),
        "gpt2": merge_checkpoint(gpt2.base, gpt2.adapter, root / "gpt2"),
    }
    jobs = {
        "llama": {"dir": str(root / "llama"), "ids": llama.ids.tolist(), "text": TEXT},
        "gpt2": {"dir": str(root / "gpt2"), "ids": gpt2.ids.tolist()},
    }
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    proc = subprocess.run(
        [sys.executable, "-c", CLEAN_LOADER, json.dumps(jobs), str(root / "logits.safetensors")],
        cwd=root,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    return {"root": root, "summaries": summaries, "out": load_file(root / "logits.safetensors")}


@pytest.mark.parametrize("name", ["llama", "gpt2"])
def test_merged_model_serves_in_plain_transformers(name, merged, request) -> None:
    case: Case = request.getfixturevalue(name)
    got = merged["out"][name]
    torch.testing.assert_close(got, case.lora_logits, rtol=1e-5, atol=1e-5)
    assert (got - case.base_logits).abs().max() > 1e-3
    n_adapted = sum(
        1 for k in load_file(case.adapter / "adapter_model.safetensors") if "lora_A" in k
    )
    assert merged["summaries"][name]["merged_tensors"] == n_adapted


def test_index_lists_every_tensor_once_and_tokenizer_is_copied(llama: Case, merged) -> None:
    out = merged["root"] / "llama"
    index = json.loads((out / INDEX_NAME).read_text())
    base_keys = set(json.loads((llama.base / INDEX_NAME).read_text())["weight_map"])
    seen, total = [], 0
    shards = sorted(p.name for p in out.glob("*.safetensors"))
    assert len(shards) > 3 and SINGLE_NAME not in shards
    for shard in shards:
        with safe_open(str(out / shard), framework="pt") as f:
            for key in f.keys():
                assert index["weight_map"][key] == shard
                tensor = f.get_tensor(key)
                total += tensor.numel() * tensor.element_size()
                seen.append(key)
    assert sorted(seen) == sorted(base_keys) == sorted(index["weight_map"])
    assert index["metadata"]["total_size"] == total
    assert set(index["weight_map"].values()) == set(shards)
    for name in (*TOKENIZER_FILES, "config.json", "generation_config.json"):
        assert (out / name).read_bytes() == (llama.base / name).read_bytes(), name
    reference = AutoTokenizer.from_pretrained(llama.base)(TEXT)["input_ids"]
    assert merged["out"]["llama.tokens"].tolist() == reference
    expected = set(shards) | {INDEX_NAME, "config.json", "generation_config.json"}
    assert {p.name for p in out.iterdir()} == expected | set(TOKENIZER_FILES)
    assert sorted(p.name for p in merged["root"].iterdir() if p.name.startswith(".")) == []


def test_single_shard_has_no_index(merged) -> None:
    out = merged["root"] / "gpt2"
    assert (out / SINGLE_NAME).is_file() and not (out / INDEX_NAME).exists()
    assert merged["summaries"]["gpt2"]["shards"] == [SINGLE_NAME]


def test_fan_in_fan_out_follows_shapes_over_config(tmp_path: Path) -> None:
    """c_attn is 32 x 96 (in x out): only the transposed update fits, whatever the config says."""
    model = tiny_gpt2()
    case = _make_case(tmp_path, model, "c_attn", False, "20KB", "gpt2")
    cfg_path = case.adapter / "adapter_config.json"
    cfg = json.loads(cfg_path.read_text())
    assert cfg["fan_in_fan_out"] is True
    cfg_path.write_text(json.dumps({**cfg, "fan_in_fan_out": False}))
    merge_checkpoint(case.base, case.adapter, tmp_path / "out", progress=None)
    got = load_file(tmp_path / "out" / SINGLE_NAME)
    base = tiny_gpt2().state_dict()
    factors = load_file(case.adapter / "adapter_model.safetensors")
    for layer in range(2):
        key = f"transformer.h.{layer}.attn.c_attn"
        a = factors[f"base_model.model.{key}.lora_A.weight"].double()
        b = factors[f"base_model.model.{key}.lora_B.weight"].double()
        want = base[f"{key}.weight"].double() + 2.0 * (b @ a).T
        torch.testing.assert_close(got[f"{key}.weight"].double(), want, rtol=0, atol=1e-6)
        untouched = f"transformer.h.{layer}.mlp.c_fc.weight"
        assert torch.equal(got[untouched], base[untouched])


def test_dtype_through_the_cli(gpt2: Case, tmp_path: Path) -> None:
    out = tmp_path / "bf16"
    argv = ["merge", "--base", str(gpt2.base), "--adapter", str(gpt2.adapter), "--out", str(out)]
    assert cli.main([*argv, "--dtype", "bf16", "--max_shard_size", "40KB"]) == 0
    assert json.loads((out / "config.json").read_text())["dtype"] == "bfloat16"
    for shard in out.glob("*.safetensors"):
        assert {t.dtype for t in load_file(shard).values()} == {torch.bfloat16}
    model = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32).eval()
    with torch.no_grad():
        torch.testing.assert_close(model(gpt2.ids).logits, gpt2.lora_logits, rtol=0.05, atol=0.05)


def test_refuses_nonempty_output_unless_overwrite(gpt2: Case, tmp_path: Path) -> None:
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("precious")
    with pytest.raises(MergeError, match="not empty"):
        merge_checkpoint(gpt2.base, gpt2.adapter, out, progress=None)
    assert [p.name for p in out.iterdir()] == ["keep.txt"]
    merge_checkpoint(gpt2.base, gpt2.adapter, out, overwrite=True, progress=None)
    assert not (out / "keep.txt").exists() and (out / SINGLE_NAME).is_file()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]  # no temp dirs left behind


def test_refuses_adapter_of_another_base_before_writing(llama: Case, tmp_path: Path) -> None:
    other = _make_case(tmp_path / "other", tiny_llama(), "all", False, "20KB", "tiny")
    out = tmp_path / "x" / "out"
    with pytest.raises(AdapterError, match="different base model"):
        merge_checkpoint(llama.base, other.adapter, out, progress=None)
    # without our metadata (a PEFT-written adapter) the shapes still give it away
    (other.adapter / META_NAME).unlink()
    with pytest.raises(MergeError, match="do not fit"):
        merge_checkpoint(llama.base, other.adapter, out, progress=None)
    gpt = _make_case(tmp_path / "gpt", tiny_gpt2(), "attn", False, "20KB", "gpt2")
    (gpt.adapter / META_NAME).unlink()
    with pytest.raises(MergeError, match=r"match no base tensor.*transformer\.h\.0\.attn\.c_attn"):
        merge_checkpoint(llama.base, gpt.adapter, out, progress=None)
    assert not (tmp_path / "x").exists()


def test_refuses_pickled_base(gpt2: Case, tmp_path: Path) -> None:
    base = tmp_path / "pickled"
    base.mkdir()
    shutil.copy(gpt2.base / "config.json", base)
    (base / "pytorch_model.bin").write_bytes(b"\x80\x04 not to be unpickled")
    with pytest.raises(MergeError, match="never unpickles"):
        merge_checkpoint(base, gpt2.adapter, tmp_path / "out", progress=None)


def _checkpoint(case: Case, root: Path) -> Path:
    """A trainer-style checkpoint: step-N/ with the adapter in adapter/ and a manifest."""
    step = root / "checkpoints" / "step-3"
    shutil.copytree(case.adapter, step / "adapter")
    (step / "trainer_state.json").write_text('{"step": 3}')
    write_manifest(step)
    return step


def test_inspect_reports_config_and_counts(llama: Case, capsys) -> None:
    assert cli.main(["inspect", str(llama.adapter)]) == 0
    text = capsys.readouterr().out
    assert (
        "r: 4" in text and f"scaling: {8 / math.sqrt(4):g}" in text and "use_rslora: True" in text
    )
    assert "q_proj, k_proj, v_proj, o_proj, gate_proj, up_proj, down_proj" in text
    assert f"parameters: {llama.lora_params:,}" in text
    assert "no manifest: checksums not verified" in text


def test_inspect_checkpoint_json_and_corruption(llama: Case, tmp_path: Path, capsys) -> None:
    step = _checkpoint(llama, tmp_path)
    assert cli.main(["inspect", str(step), "--json"]) == 0
    info = json.loads(capsys.readouterr().out)
    assert info["r"] == 4 and info["parameters"] == llama.lora_params
    assert info["adapted_modules"] == 4 * 7 and info["problems"] == []
    assert info["manifests"] == ["manifest.json"]
    weights = step / "adapter" / "adapter_model.safetensors"
    assert info["file_bytes"] == weights.stat().st_size
    data = bytearray(weights.read_bytes())
    data[-5] ^= 0xFF  # one flipped byte in the tensor data: still a loadable file
    weights.write_bytes(bytes(data))
    assert cli.main(["inspect", str(step)]) == 1
    assert "adapter/adapter_model.safetensors fails its SHA-256 checksum" in capsys.readouterr().out
    assert (
        cli.main(
            [
                "merge",
                "--base",
                str(llama.base),
                "--adapter",
                str(step),
                "--out",
                str(tmp_path / "out"),
            ]
        )
        == 2
    )
    assert "fails its checksums" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()


PEAK_RSS = textwrap.dedent(
    """
    import json, sys
    from pathlib import Path
    from lora_dist.merge import merge_checkpoint

    def kib(field):
        lines = Path("/proc/self/status").read_text().splitlines()
        return int(next(line.split()[1] for line in lines if line.startswith(field + ":")))

    root = Path(sys.argv[1])
    # a first, small merge imports every lazily imported module and starts the thread pools
    warm = root / "warm"
    merge_checkpoint(warm / "base", warm / "adapter", root / "warm-out", None, "4MB")
    # ru_maxrss carries pytest's own peak across fork+exec into this process, so reset the
    # process's high-water mark (VmHWM, the counter ru_maxrss reads) and read it back
    Path("/proc/self/clear_refs").write_text("5")
    before = kib("VmHWM")
    summary = merge_checkpoint(root / "base", root / "adapter", root / "out", None, "4MB")
    after = kib("VmHWM")
    print(json.dumps({"growth_kib": after - before, "before_kib": before, **summary}))
    """
)


def test_merge_streams_shard_by_shard(tmp_path: Path) -> None:
    """Merging a ~100 MB fp32 model in 4 MB shards must not hold the model in memory."""
    torch.manual_seed(0)
    dims = dict(vocab_size=1000, hidden_size=512, intermediate_size=1536, num_attention_heads=8)
    big = LlamaForCausalLM(LlamaConfig(**dims, num_hidden_layers=7, tie_word_embeddings=False))
    big = _make_case(tmp_path, big.eval(), "all", False, "4MB", "big")
    # the warm-up model has the same widths and one layer: same code paths, same tensor sizes
    warm = LlamaForCausalLM(LlamaConfig(**dims, num_hidden_layers=1, tie_word_embeddings=False))
    _make_case(tmp_path / "warm", warm.eval(), "all", False, "4MB", "warm")
    model_bytes = sum(p.stat().st_size for p in big.base.glob("*.safetensors"))
    assert model_bytes > 90e6 and len(list(big.base.glob("*.safetensors"))) >= 10
    proc = subprocess.run(
        [sys.executable, "-c", PEAK_RSS, str(tmp_path)],
        capture_output=True,
        text=True,
        timeout=300,
        # glibc's sliding mmap threshold would keep freed multi-MB tensors on the heap and make
        # RSS depend on allocation history; a fixed threshold makes it track live data
        env={
            **os.environ,
            "PYTHONPATH": str(Path(__file__).resolve().parent.parent),
            "MALLOC_MMAP_THRESHOLD_": str(1 << 20),
        },
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    assert result["merged_tensors"] == 7 * 7 and len(result["shards"]) >= 10
    growth = result["growth_kib"] * 1024
    assert growth < 0.4 * model_bytes, (
        f"peak RSS grew {growth / 1e6:.0f} MB from {result['before_kib'] / 1e3:.0f} MB"
    )
