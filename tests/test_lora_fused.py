"""Slice LoRA on fused QKV projections, against the models' own attention code, float64 and PEFT.

The rows each model reads as q, k and v are probed here from its own code (a one-hot output of
the fused projection, captured where the model splits it), not taken from lora_fused.
"""

import json
import subprocess
import sys

import pytest
import torch
from peft import LoraConfig as PeftLoraConfig
from peft import PeftModel, get_peft_model
from transformers import AttentionInterface
from transformers.pytorch_utils import Conv1D

from lora_dist.adapter import AdapterError, load_adapter, lora_state_dict, save_adapter
from lora_dist.inject import inject_lora
from lora_dist.lora import LoraConfig, lora_layers, merge_lora, unmerge_lora
from lora_dist.lora_fused import FusedSliceLora, fused_layout
from lora_dist.planning.shapes import lora_param_count, shape_from_hf_config
from tests import runs
from tests.tiny_models import FUSED_KINDS, randomize_lora_b, tiny_fused, tokens

R, ALPHA = 2, 6.0
# Where each family keeps its first attention block and, in it, the fused projection.
ATTENTION = {
    "GPT2LMHeadModel": ("transformer.h.0.attn", "c_attn"),
    "BloomForCausalLM": ("transformer.h.0.self_attention", "query_key_value"),
    "GPTNeoXForCausalLM": ("gpt_neox.layers.0.attention", "query_key_value"),
    "FalconForCausalLM": ("transformer.h.0.self_attention", "query_key_value"),
    "Phi3ForCausalLM": ("model.layers.0.self_attn", "qkv_proj"),
}
_CAPTURED: dict[str, torch.Tensor] = {}


class _Stop(Exception):
    """Raised once q, k and v are captured: the rest of the forward is not needed."""


def _keep(qkv):
    _CAPTURED.update(zip("qkv", qkv, strict=True))
    raise _Stop


def _capture_attention(module, query, key, value, attention_mask, **kwargs):
    """An attention implementation that records the q, k, v it is handed, as (b, heads, s, d)."""
    _keep((query, key, value))


AttentionInterface.register("capture_qkv", _capture_attention)


def probe_rows(kind: str) -> dict[str, list[int]]:
    """The fused rows the model's attention code reads as q, k and v, element by element.

    Token b of a batch of `out` one-token sequences gets the fused output e_b, so an element of
    q (or k, v) equals 1 exactly for the row it is read from. One token at position 0 keeps
    rotary embeddings the identity. Heads that GQA broadcasts are counted once.
    """
    model = tiny_fused(kind, dtype=torch.float64)
    attn_path, fused_name = ATTENTION[type(model).__name__]
    attn = model.get_submodule(attn_path)
    fused = getattr(attn, fused_name)
    out = fused.weight.shape[1] if isinstance(fused, Conv1D) else fused.weight.shape[0]
    fused.register_forward_hook(lambda m, i, o: torch.eye(out, dtype=o.dtype)[:, None, :])
    _CAPTURED.clear()
    if hasattr(attn, "_split_heads"):  # Falcon: (b, s, heads, d)
        split = attn._split_heads
        attn._split_heads = lambda x: _keep([t.transpose(1, 2) for t in split(x)])
    elif hasattr(attn, "_reshape"):  # BLOOM: (b, heads, s, d)
        reshape = attn._reshape
        attn._reshape = lambda x: _keep(reshape(x))
    else:
        attn.config._attn_implementation = "capture_qkv"
    ids = torch.zeros(out, 1, dtype=torch.long)
    with torch.no_grad(), pytest.raises(_Stop):
        model(input_ids=ids, position_ids=torch.zeros_like(ids))
    rows = {}
    for part in "qkv":
        flat = _CAPTURED[part][:, :, 0, :].reshape(out, -1)  # (fused row, element)
        assert torch.equal(flat.sum(0), torch.ones(flat.shape[1], dtype=flat.dtype))
        seen = [int(i) for i in flat.argmax(0)]
        rows[part] = list(dict.fromkeys(seen))  # broadcast kv heads appear once
    return rows


@pytest.fixture(scope="module", params=FUSED_KINDS)
def kind(request) -> str:
    return request.param


@pytest.fixture(scope="module")
def rows(kind: str) -> dict[str, list[int]]:
    return probe_rows(kind)


def test_layout_is_what_the_model_code_reads(kind, rows):
    layout = fused_layout(tiny_fused(kind).config)
    assert {p: list(layout.rows[p]) for p in "qkv"} == rows
    assert sorted(rows["q"] + rows["k"] + rows["v"]) == list(range(layout.out_features))


def _lora_model(kind: str, dtype=torch.float64, targets="attn"):
    model = tiny_fused(kind, dtype=dtype)
    report = inject_lora(model, LoraConfig(r=R, alpha=ALPHA, targets=targets))
    randomize_lora_b(model)
    return model, report


def _dense_view(module) -> torch.Tensor:
    """The fused weight as (out x in), sharing storage (GPT-2's Conv1D stores in x out)."""
    return module.weight.T if isinstance(module, Conv1D) else module.weight


def test_logits_equal_float64_reference_built_from_the_weights(kind, rows):
    model, report = _lora_model(kind)
    reference = tiny_fused(kind, dtype=torch.float64)  # same seed: the same W0
    s = ALPHA / R
    with torch.no_grad():
        for path, layer in report.layers.items():
            assert isinstance(layer, FusedSliceLora) and layer.slices == ("q", "v")
            a_q, a_v = layer.lora_A.split(R)
            b_q, b_v = layer.lora_B.split([len(rows["q"]), len(rows["v"])])
            w = _dense_view(reference.get_submodule(path))
            w[rows["q"]] += s * b_q @ a_q
            w[rows["v"]] += s * b_v @ a_v
    ids = tokens()
    with torch.no_grad():
        ours, ref = model(ids).logits, reference(ids).logits
        base = tiny_fused(kind, dtype=torch.float64)(ids).logits
    assert (ref - base).abs().max() > 1e-3
    torch.testing.assert_close(ours, ref, rtol=0, atol=1e-11)


def _peft_model(kind: str, fused_name: str, n: int, dtype=torch.float64):
    config = PeftLoraConfig(
        r=n * R,
        lora_alpha=n * ALPHA,
        target_modules=[fused_name],
        fan_in_fan_out=kind == "gpt2",
    )
    return get_peft_model(tiny_fused(kind, dtype=dtype), config)


def test_k_rows_get_no_gradient_and_q_v_gradients_equal_peft(kind, rows):
    """PEFT's rank-2r LoRA with our exported factors computes the same map; its gradient
    reaches the k rows of B', ours (mapped to PEFT's form) is exactly zero there."""
    ours, report = _lora_model(kind)
    fused_name = ATTENTION[type(ours).__name__][1]
    peft = _peft_model(kind, fused_name, 2)
    peft_layers = {n: m for n, m in peft.named_modules() if n.endswith(fused_name)}
    with torch.no_grad():
        for path, layer in report.layers.items():
            a, b = layer.export_factors(layer.lora_A, layer.lora_B)
            target = peft_layers[f"base_model.model.{path}"]
            target.lora_A["default"].weight.copy_(a)
            target.lora_B["default"].weight.copy_(b)
    ids = tokens()
    out_ours, out_peft = ours(ids, labels=ids), peft(input_ids=ids, labels=ids)
    torch.testing.assert_close(out_ours.logits, out_peft.logits, rtol=0, atol=1e-11)
    out_ours.loss.backward()
    out_peft.loss.backward()
    k_rows = rows["k"]
    for path, layer in report.layers.items():
        g_a, g_b = layer.export_factors(layer.lora_A.grad, layer.lora_B.grad)
        target = peft_layers[f"base_model.model.{path}"]
        p_a, p_b = target.lora_A["default"].weight.grad, target.lora_B["default"].weight.grad
        assert torch.count_nonzero(g_b[k_rows]) == 0
        assert p_b[k_rows].abs().max() > 1e-6  # PEFT would train k: the comparison means it
        torch.testing.assert_close(g_a, p_a, rtol=1e-9, atol=1e-12)
        for i, part in enumerate(("q", "v")):
            block = (rows[part], slice(i * R, (i + 1) * R))
            torch.testing.assert_close(g_b[block], p_b[block], rtol=1e-9, atol=1e-12)
        assert g_b[rows["q"], :R].abs().max() > 1e-6 and g_b[rows["v"], R:].abs().max() > 1e-6


def test_exported_adapter_loads_in_peft(kind, tmp_path):
    for targets in ("attn", "attn-all"):
        ours, report = _lora_model(kind, torch.float32, targets)
        fan = any(layer.fan_in_fan_out for layer in report.layers.values())
        cfg = LoraConfig(r=R, alpha=ALPHA, targets=targets)
        path = tmp_path / targets
        save_adapter(path, lora_state_dict(ours), cfg, report.target_modules, ours.config, "t", fan)
        peft = PeftModel.from_pretrained(tiny_fused(kind), path).eval()
        ids = tokens()
        with torch.no_grad():
            torch.testing.assert_close(peft(ids).logits, ours(ids).logits, rtol=1e-5, atol=1e-5)

        back = tiny_fused(kind)
        load_adapter(back, path)  # the slice form comes back, factor for factor
        for name, layer in lora_layers(back).items():
            original = report.layers[name]
            assert type(layer) is type(original)
            assert getattr(layer, "slices", None) == getattr(original, "slices", None)
            assert torch.equal(layer.lora_A, original.lora_A)
            assert torch.equal(layer.lora_B, original.lora_B)


def test_a_whole_fused_adapter_is_not_read_as_slices(tmp_path):
    ours, report = _lora_model("gpt2", torch.float32)
    cfg = LoraConfig(r=R, alpha=ALPHA, targets="attn")
    state = lora_state_dict(ours)
    key = next(k for k in state if k.endswith("lora_B.weight"))
    state[key] = state[key].clone()
    state[key][40, 0] = 1.0  # a k row of c_attn (rows 32..63)
    save_adapter(tmp_path, state, cfg, report.target_modules, ours.config, "t", True)
    with pytest.raises(AdapterError, match="outside the rows of its slices"):
        load_adapter(tiny_fused("gpt2"), tmp_path)


def test_merge_writes_only_q_and_v_rows_and_unmerge_restores(kind, rows):
    model, report = _lora_model(kind, torch.float32)
    ids = tokens()
    before = {p: _dense_view(layer.base_layer).clone() for p, layer in report.layers.items()}
    with torch.no_grad():
        unmerged = model(ids).logits
        merge_lora(model)
        merge_lora(model)  # idempotent
        merged = model(ids).logits
    torch.testing.assert_close(merged, unmerged, rtol=1e-5, atol=1e-5)
    untouched = sorted(set(range(fused_layout(model.config).out_features)) - set(rows["q"]))
    untouched = sorted(set(untouched) - set(rows["v"]))
    for path, layer in report.layers.items():
        w = _dense_view(layer.base_layer)
        assert torch.equal(w[untouched], before[path][untouched])  # k rows: bit for bit
        assert (w[rows["q"]] - before[path][rows["q"]]).abs().max() > 1e-4
        assert (w[rows["v"]] - before[path][rows["v"]]).abs().max() > 1e-4
    unmerge_lora(model)
    for path, layer in report.layers.items():
        w = _dense_view(layer.base_layer)
        assert torch.equal(w[untouched], before[path][untouched])
        torch.testing.assert_close(w, before[path], rtol=0, atol=1e-6)


@pytest.mark.parametrize("targets", ["attn", "attn-all", "all"])
def test_trainable_count_equals_the_planner(kind, targets):
    model = tiny_fused(kind)
    report = inject_lora(model, LoraConfig(r=3, targets=targets))
    shape = shape_from_hf_config(model.config.to_dict())
    assert report.trainable_params == lora_param_count(shape, 3, targets)
    assert report.trainable_params == sum(p.numel() for p in model.parameters() if p.requires_grad)


@pytest.fixture(scope="module")
def zero3(tmp_path_factory) -> dict:
    out = tmp_path_factory.mktemp("zero3") / "probe.json"
    env = runs.run_env(RANK="0", WORLD_SIZE="1", LOCAL_RANK="0", MASTER_ADDR="127.0.0.1")
    env["MASTER_PORT"] = str(runs.free_port())
    probe = runs.REPO / "tests" / "zero3_fused_probe.py"
    done = subprocess.run(
        [sys.executable, str(probe), str(out)],
        cwd=runs.REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    return json.loads(out.read_text())


def test_zero3_built_models_start_near_ln_vocab(kind, zero3):
    r = zero3[kind]
    assert abs(r["built"] - r["ln_vocab"]) < 0.25, r
    assert abs(r["plain"] - r["ln_vocab"]) < 0.25, r


def test_slice_lora_on_zero3_partitioned_fused_weights(kind, zero3):
    r = zero3[kind]
    assert r["partitioned"] and r["lora_effect"] > 1e-3
    assert r["lora_vs_plain"] < 1e-6 and r["merged_vs_unmerged"] < 1e-6
