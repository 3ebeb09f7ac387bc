"""PEFT-format adapters: written here, read by PEFT, and the other way round; bad files refused."""

import json

import pytest
import torch
from peft import LoraConfig as PeftLoraConfig
from peft import PeftModel, get_peft_model
from safetensors.torch import save_file

from lora_dist.adapter import (
    AdapterError,
    load_adapter,
    lora_state_dict,
    read_adapter_config,
    save_adapter,
)
from lora_dist.inject import find_targets, inject_lora, resolve_targets
from lora_dist.lora import LoraConfig
from lora_dist.lora_fused import split_slice_targets
from tests.tiny_models import randomize_lora_b, tiny_gpt2, tiny_llama, tokens

CASES = [
    (tiny_llama, "attn-all", False),
    (tiny_llama, "all", True),
    (tiny_gpt2, "all", False),
]


def _save(model, report, cfg, path):
    fan = any(layer.fan_in_fan_out for layer in report.layers.values())
    return save_adapter(
        path, lora_state_dict(model), cfg, report.target_modules, model.config, "tiny", fan
    )


@pytest.mark.parametrize("factory,targets,rslora", CASES)
def test_our_adapter_loads_in_peft(tmp_path, factory, targets, rslora):
    ours = factory()
    cfg = LoraConfig(r=4, alpha=8.0, targets=targets, use_rslora=rslora)
    report = inject_lora(ours, cfg)
    randomize_lora_b(ours)
    _save(ours, report, cfg, tmp_path / "adapter")
    ids = tokens()
    with torch.no_grad():
        ours_logits = ours(ids).logits
        peft_model = PeftModel.from_pretrained(factory(), tmp_path / "adapter").eval()
        peft_logits = peft_model(ids).logits
        base_logits = factory()(ids).logits
    assert (ours_logits - base_logits).abs().max() > 1e-3  # the adapter does something
    torch.testing.assert_close(peft_logits, ours_logits, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("factory,targets,rslora", CASES)
def test_peft_adapter_loads_here(tmp_path, factory, targets, rslora):
    model_type = factory().config.model_type
    # PEFT adapts GPT-2's whole c_attn; loaded here, it stays an ordinary LoRA on c_attn.
    target_modules = split_slice_targets(resolve_targets(targets, model_type))[0]
    peft_cfg = PeftLoraConfig(
        r=4,
        lora_alpha=8,
        target_modules=target_modules,
        use_rslora=rslora,
        fan_in_fan_out=model_type == "gpt2",
    )
    peft_model = get_peft_model(factory(), peft_cfg)
    randomize_lora_b(peft_model)
    peft_model.save_pretrained(tmp_path / "peft")
    ids = tokens()
    ours = factory()
    report = load_adapter(ours, tmp_path / "peft")
    assert len(report.layers) == len(find_targets(factory(), target_modules))
    with torch.no_grad():
        torch.testing.assert_close(
            ours(ids).logits, peft_model.eval()(ids).logits, rtol=1e-5, atol=1e-5
        )


def test_config_fields_and_round_trip(tmp_path):
    model = tiny_llama()
    cfg = LoraConfig(r=2, alpha=4, targets="attn", dropout=0.05)
    report = inject_lora(model, cfg)
    randomize_lora_b(model)
    _save(model, report, cfg, tmp_path / "a")
    written = json.loads((tmp_path / "a" / "adapter_config.json").read_text())
    for key in (
        "peft_type",
        "r",
        "lora_alpha",
        "lora_dropout",
        "target_modules",
        "use_rslora",
        "fan_in_fan_out",
        "bias",
        "task_type",
        "base_model_name_or_path",
    ):
        assert key in written, key
    assert written["target_modules"] == ["q_proj", "v_proj"] and written["r"] == 2
    other = tiny_llama(seed=5)
    load_adapter(other, tmp_path / "a")
    for key, value in lora_state_dict(model).items():
        assert torch.equal(lora_state_dict(other)[key], value)


def test_wrong_rank_is_refused(tmp_path):
    model = tiny_llama()
    cfg = LoraConfig(r=4, alpha=8)
    report = inject_lora(model, cfg)
    state = lora_state_dict(model)
    _save(model, report, cfg, tmp_path / "a")
    bad = {k: torch.zeros(v.shape[0] + 1, *v.shape[1:]) for k, v in state.items()}
    save_file(bad, str(tmp_path / "a" / "adapter_model.safetensors"))
    with pytest.raises(AdapterError, match="shape"):
        load_adapter(tiny_llama(), tmp_path / "a")


def test_different_base_is_refused(tmp_path):
    model = tiny_llama()
    cfg = LoraConfig(r=4, alpha=8)
    _save(model, inject_lora(model, cfg), cfg, tmp_path / "a")
    with pytest.raises(AdapterError, match="different base model"):
        load_adapter(tiny_llama(num_hidden_layers=3), tmp_path / "a")


def test_corrupt_and_pickled_files_are_refused(tmp_path):
    model = tiny_llama()
    cfg = LoraConfig(r=4, alpha=8)
    _save(model, inject_lora(model, cfg), cfg, tmp_path / "a")
    weights = tmp_path / "a" / "adapter_model.safetensors"
    weights.write_bytes(weights.read_bytes()[:100])
    with pytest.raises(AdapterError, match="corrupt"):
        load_adapter(tiny_llama(), tmp_path / "a")
    weights.unlink()
    (tmp_path / "a" / "adapter_model.bin").write_bytes(b"\x80\x04pickle")
    with pytest.raises(AdapterError, match="never"):
        load_adapter(tiny_llama(), tmp_path / "a")
    (tmp_path / "a" / "adapter_config.json").write_text("{not json")
    with pytest.raises(AdapterError, match="not valid JSON"):
        read_adapter_config(tmp_path / "a")
