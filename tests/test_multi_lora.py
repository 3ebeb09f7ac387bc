"""Mixed-adapter batches: each row equals PEFT with that row's adapter; bad adapters refused."""

from __future__ import annotations

import json

import pytest
import torch
from peft import LoraConfig as PeftLoraConfig
from peft import PeftModel, get_peft_model
from safetensors.torch import load_file, save_file

from lora_dist.adapter import AdapterError
from lora_dist.lora import LoraConfig
from lora_dist.multi_lora import MultiLoraModel
from tests.serving.helpers import random_adapter
from tests.tiny_models import tiny_gpt2, tiny_llama, tokens

LLAMA_ADAPTERS = {
    "qv": LoraConfig(r=2, alpha=4.0, targets=["q_proj", "v_proj"]),
    "all-rs": LoraConfig(r=8, alpha=16.0, targets="all", use_rslora=True),
    "mlp": LoraConfig(r=4, alpha=3.0, targets=r"re:model\.layers\.0\.mlp\.(up|down)_proj"),
    "ko": LoraConfig(r=2, alpha=1.0, targets=["k_proj", "o_proj"]),  # shares qv's rank
}
GPT2_ADAPTERS = {
    "attn": LoraConfig(r=4, alpha=8.0, targets="attn"),
    "all": LoraConfig(r=2, alpha=2.0, targets="all", use_rslora=True),
}


def _write(factory, configs, root):
    model = factory()
    return {
        name: random_adapter(model, cfg, root / name, seed=i + 1)
        for i, (name, cfg) in enumerate(configs.items())
    }


def _peft_logits(factory, dirs, name, ids, mask):
    """Logits of PEFT with one adapter (None: the bare base) on the same batch."""
    model = factory()
    if name is not None:
        model = PeftModel.from_pretrained(model, dirs[name]).eval()
    with torch.no_grad():
        return model(input_ids=ids, attention_mask=mask).logits


@pytest.mark.parametrize(
    "factory,configs", [(tiny_llama, LLAMA_ADAPTERS), (tiny_gpt2, GPT2_ADAPTERS)]
)
def test_each_row_matches_peft_with_its_adapter(tmp_path, factory, configs):
    dirs = _write(factory, configs, tmp_path)
    mixed = MultiLoraModel(factory())
    slots = {name: mixed.add(mixed.read(path)) for name, path in dirs.items()}
    names = [*configs, None, *reversed(list(configs))]  # every adapter, the base, repeats
    ids = tokens(batch=len(names), length=9, seed=3)
    mask = torch.ones_like(ids)
    mask[1, :4] = 0  # a left-padded row
    with torch.no_grad():
        got = mixed(
            [slots[n] if n else 0 for n in names], input_ids=ids, attention_mask=mask
        ).logits
    base = _peft_logits(factory, dirs, None, ids, mask)
    for row, name in enumerate(names):
        want = _peft_logits(factory, dirs, name, ids, mask)[row]
        torch.testing.assert_close(got[row], want, rtol=1e-5, atol=1e-5, msg=f"row {row} {name}")
        if name is not None:  # the adapter does change this row
            assert (want - base[row]).abs().max() > 1e-2


def test_add_and_remove_leave_the_base_and_the_others_alone(tmp_path):
    dirs = _write(tiny_llama, LLAMA_ADAPTERS, tmp_path)
    model = tiny_llama()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    mixed = MultiLoraModel(model, max_adapters=2)
    ids = tokens(batch=3, seed=5)
    first = mixed.add(mixed.read(dirs["qv"]))
    second = mixed.add(mixed.read(dirs["all-rs"]))
    with pytest.raises(AdapterError, match="2 adapters are loaded"):
        mixed.add(mixed.read(dirs["mlp"]))
    with torch.no_grad():
        both = mixed([first, second, 0], input_ids=ids).logits
        mixed.remove(first)
        third = mixed.add(mixed.read(dirs["mlp"]))
        assert third == first  # the freed slot is reused
        after = mixed([0, second, third], input_ids=ids).logits
        bare = tiny_llama()(input_ids=ids).logits
    torch.testing.assert_close(after[1], both[1], rtol=0, atol=0)
    torch.testing.assert_close(after[0], bare[0], rtol=0, atol=0)
    want = _peft_logits(tiny_llama, dirs, "mlp", ids, None)[2]
    torch.testing.assert_close(after[2], want, rtol=1e-5, atol=1e-5)
    for key, value in model.state_dict().items():  # wrapped modules keep their weights' keys
        plain = key.replace(".base_layer", "")
        assert torch.equal(value, before[plain]), key
    with pytest.raises(KeyError):
        with mixed.using([5, 0, 0]):
            pass


def test_peft_written_adapter_loads(tmp_path):
    peft_model = get_peft_model(
        tiny_llama(),
        PeftLoraConfig(
            r=3, lora_alpha=6, target_modules=["k_proj", "o_proj"], init_lora_weights=False
        ),
    )
    peft_model.save_pretrained(tmp_path / "peft")
    mixed = MultiLoraModel(tiny_llama())
    slot = mixed.add(mixed.read(tmp_path / "peft"))
    ids = tokens(batch=2, seed=7)
    with torch.no_grad():
        got = mixed([slot, 0], input_ids=ids).logits
        want = peft_model.eval()(input_ids=ids).logits
    torch.testing.assert_close(got[0], want[0], rtol=1e-5, atol=1e-5)


def _edit(path, **changes):
    cfg = json.loads((path / "adapter_config.json").read_text())
    cfg.update(changes)
    (path / "adapter_config.json").write_text(json.dumps(cfg))


def test_adapters_that_do_not_fit_are_refused_with_the_reason(tmp_path):
    mixed = MultiLoraModel(tiny_llama())
    cfg = LoraConfig(r=2, alpha=4.0, targets=["q_proj", "v_proj"])
    other_base = random_adapter(tiny_llama(hidden_size=48), cfg, tmp_path / "other", seed=1)
    with pytest.raises(AdapterError, match="trained on a different base model"):
        mixed.read(other_base)
    (other_base / "lora_dist.json").unlink()  # as PEFT writes it: shapes still tell
    with pytest.raises(AdapterError, match=r"A \(2, 48\).*needs A \(2, 32\)"):
        mixed.read(other_base)

    good = random_adapter(tiny_llama(), cfg, tmp_path / "good", seed=1)
    _edit(good, r=4)
    with pytest.raises(AdapterError, match="different rank"):
        mixed.read(good)
    _edit(good, r=2, target_modules=["k_proj"])
    with pytest.raises(AdapterError, match="do not match target_modules"):
        mixed.read(good)
    _edit(good, target_modules=["q_proj", "v_proj"])

    weights = load_file(good / "adapter_model.safetensors")
    key = next(iter(weights))
    save_file({**weights, key: torch.full_like(weights[key], float("nan"))}, str(good / "x"))
    (good / "x").replace(good / "adapter_model.safetensors")
    with pytest.raises(AdapterError, match="NaN or Inf"):
        mixed.read(good)
    renamed = {k.replace("q_proj", "qq_proj"): v for k, v in weights.items()}
    save_file(renamed, str(good / "adapter_model.safetensors"))
    with pytest.raises(AdapterError, match="not a linear layer of this base"):
        mixed.read(good)
    (good / "adapter_model.safetensors").write_bytes(b"\x08\x00\x00\x00\x00\x00\x00\x00{}garbage")
    with pytest.raises(AdapterError, match="corrupt or truncated"):
        mixed.read(good)
    (good / "adapter_model.safetensors").unlink()
    (good / "adapter_model.bin").write_bytes(b"pickle")
    with pytest.raises(AdapterError, match="never unpickles"):
        mixed.read(good)
    assert not mixed.adapters
