"""The LoRA layer's math against float64 references, merging, and gradient flow."""

import math

import pytest
import torch
from torch import nn
from transformers.pytorch_utils import Conv1D

from lora_dist.inject import inject_lora
from lora_dist.lora import (
    LoraConfig,
    LoraLinear,
    merge_and_unload,
    merge_lora,
    merge_weight,
    unmerge_lora,
)
from tests.tiny_models import randomize_lora_b, tiny_gpt2, tiny_llama, tokens


def _nonzero_layer(base: nn.Module, **kw) -> LoraLinear:
    layer = LoraLinear(base, LoraConfig(**kw))
    with torch.no_grad():
        layer.lora_B.normal_(0, 0.2)
    return layer


@pytest.mark.parametrize("rslora", [False, True])
def test_forward_matches_float64_formula(rslora):
    torch.manual_seed(0)
    base = nn.Linear(12, 10)
    layer = _nonzero_layer(base, r=3, alpha=7.0, use_rslora=rslora)
    x = torch.randn(4, 12)
    s = 7.0 / (math.sqrt(3) if rslora else 3)
    w, b = base.weight.double(), base.bias.double()
    a, bb = layer.lora_A.double(), layer.lora_B.double()
    expected = x.double() @ w.T + b + s * (x.double() @ a.T @ bb.T)
    torch.testing.assert_close(layer(x).double(), expected, rtol=1e-6, atol=1e-6)


def test_conv1d_forward_matches_formula():
    torch.manual_seed(0)
    base = Conv1D(10, 12)  # GPT-2 layout: weight is (in, out)
    nn.init.normal_(base.weight)
    layer = _nonzero_layer(base, r=2, alpha=4.0)
    assert layer.lora_A.shape == (2, 12) and layer.lora_B.shape == (10, 2)
    x = torch.randn(3, 12)
    expected = x.double() @ base.weight.double() + base.bias.double()
    expected += 2.0 * (x.double() @ layer.lora_A.double().T @ layer.lora_B.double().T)
    torch.testing.assert_close(layer(x).double(), expected, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("init", ["kaiming", "gaussian"])
def test_fresh_adapter_changes_no_output_bit(init):
    model = tiny_llama()
    ids = tokens()
    before = model(ids).logits
    inject_lora(model, LoraConfig(r=4, alpha=8, targets="attn-all", init=init))
    assert torch.equal(model(ids).logits, before)
    layer = model.model.layers[0].self_attn.q_proj
    assert layer.lora_A.abs().sum() > 0 and torch.count_nonzero(layer.lora_B) == 0


@pytest.mark.parametrize("factory", [tiny_llama, tiny_gpt2])
def test_merge_equals_unmerged_and_unmerge_restores(factory):
    model = factory()
    originals = {n: p.detach().clone() for n, p in model.named_parameters()}
    inject_lora(model, LoraConfig(r=4, alpha=8, targets="all"))
    randomize_lora_b(model)
    ids = tokens()
    with torch.no_grad():
        unmerged = model(ids).logits
        merge_lora(model)
        merge_lora(model)  # idempotent: merging twice equals merging once
        merged = model(ids).logits
    torch.testing.assert_close(merged, unmerged, rtol=1e-5, atol=1e-5)
    unmerge_lora(model)
    unmerge_lora(model)
    for name, p in model.named_parameters():
        if "lora_" not in name:
            key = name.replace(".base_layer", "")
            torch.testing.assert_close(p, originals[key], rtol=0, atol=1e-6)


def test_merged_weight_matches_float64():
    torch.manual_seed(0)
    base = nn.Linear(6, 5, bias=False)
    w0 = base.weight.detach().double().clone()
    layer = _nonzero_layer(base, r=2, alpha=3.0)
    layer.merge()
    expected = w0 + 1.5 * layer.lora_B.double() @ layer.lora_A.double()
    torch.testing.assert_close(base.weight.double(), expected, rtol=1e-6, atol=1e-6)
    pure = merge_weight(w0.float(), layer.lora_A, layer.lora_B, 1.5)
    torch.testing.assert_close(pure.double(), expected, rtol=1e-6, atol=1e-6)


def test_merge_refuses_non_finite():
    layer = _nonzero_layer(nn.Linear(4, 4), r=2, alpha=2.0)
    with torch.no_grad():
        layer.lora_B[0, 0] = float("inf")
    w0 = layer.base_layer.weight.detach().clone()
    with pytest.raises(ValueError, match="NaN or Inf"):
        layer.merge()
    assert torch.equal(layer.base_layer.weight, w0) and not layer.merged


def test_training_a_merged_layer_is_refused():
    layer = _nonzero_layer(nn.Linear(4, 4), r=2, alpha=2.0)
    layer.merge()
    layer.train()
    with pytest.raises(RuntimeError, match="unmerge"):
        layer(torch.randn(2, 4))
    layer.eval()
    with torch.no_grad():
        layer(torch.randn(2, 4))


def test_gradients_flow_only_into_lora_factors():
    model = tiny_llama()
    report = inject_lora(model, LoraConfig(r=4, alpha=8, targets="attn"))
    randomize_lora_b(model)
    model.train()
    ids = tokens()
    model(ids, labels=ids).loss.backward()
    lora_params = {id(p) for layer in report.layers.values() for p in (layer.lora_A, layer.lora_B)}
    for name, p in model.named_parameters():
        if id(p) in lora_params:
            assert p.grad is not None and p.grad.abs().sum() > 0, name
        else:
            assert p.grad is None, name


def test_full_rank_lora_fits_any_update():
    torch.manual_seed(0)
    d_out, d_in = 6, 8
    base = nn.Linear(d_in, d_out, bias=False)
    base.requires_grad_(False)
    target = torch.randn(d_out, d_in)
    layer = LoraLinear(base, LoraConfig(r=min(d_in, d_out), alpha=6.0))
    opt = torch.optim.Adam([layer.lora_A, layer.lora_B], lr=1e-2)
    for _ in range(3000):
        opt.zero_grad()
        loss = (layer.delta_weight() - target).pow(2).mean()
        loss.backward()
        opt.step()
    torch.testing.assert_close(layer.delta_weight(), target, rtol=1e-4, atol=1e-4)


def test_fp32_factors_on_bf16_base():
    torch.manual_seed(0)
    base32 = nn.Linear(16, 8)
    base16 = nn.Linear(16, 8).to(torch.bfloat16)
    base16.load_state_dict({k: v.to(torch.bfloat16) for k, v in base32.state_dict().items()})
    layer = LoraLinear(base16, LoraConfig(r=4, alpha=8, lora_dtype=torch.float32))
    assert layer.lora_A.dtype == torch.float32 and layer.base_layer.weight.dtype == torch.bfloat16
    with torch.no_grad():
        layer.lora_B.normal_(0, 0.2)
    x = torch.randn(3, 16)
    out = layer(x.to(torch.bfloat16))
    assert out.dtype == torch.bfloat16
    expected = base32(x) + 2.0 * (x @ layer.lora_A.T @ layer.lora_B.T)
    torch.testing.assert_close(out.float(), expected, rtol=3e-2, atol=3e-2)
    out.float().sum().backward()
    assert layer.lora_A.grad.dtype == torch.float32


def test_config_validation():
    for bad in (dict(r=0), dict(alpha=-1), dict(dropout=1.0), dict(init="xavier")):
        with pytest.raises(ValueError):
            LoraConfig(**bad)


def test_merge_and_unload_gives_the_bare_base_architecture():
    model = tiny_llama()
    inject_lora(model, LoraConfig(r=4, alpha=8, targets="all"))
    randomize_lora_b(model)
    ids = tokens()
    with torch.no_grad():
        expected = model(ids).logits
        bare = merge_and_unload(model)
        got = bare(ids).logits
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)
    assert not any(isinstance(m, LoraLinear) for m in bare.modules())
    assert set(bare.state_dict()) == set(tiny_llama().state_dict())
