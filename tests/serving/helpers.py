"""Models and adapters for the serving tests: a tiny LLaMA with a real tokenizer, built in tmp dirs.

The tokenizer is a byte-level BPE trained in a few milliseconds on the packaged corpus, with
ChatML's special tokens and template, so prompts, chat and detokenization run as they do for
the default model. Adapters are written by lora-dist's own injection and save_adapter.
"""

from __future__ import annotations

from pathlib import Path

import torch
from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

from lora_dist.adapter import lora_state_dict, save_adapter
from lora_dist.inject import InjectionReport, inject_lora
from lora_dist.lora import LoraConfig

CORPUS = Path(__file__).resolve().parents[2] / "lora_dist" / "assets" / "corpus.txt"
CHATML = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n"
    "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)
# Different ranks, alphas, rsLoRA and targets; slot order is the order of this table.
TINY_ADAPTERS: dict[str, LoraConfig] = {
    "qv-r2": LoraConfig(r=2, alpha=4.0, targets=["q_proj", "v_proj"]),
    "all-r4-rs": LoraConfig(r=4, alpha=8.0, targets="all", use_rslora=True),
    "out-r8": LoraConfig(r=8, alpha=4.0, targets=r"re:model\.layers\.1\..*(o_proj|down_proj)"),
    "mlp-r2": LoraConfig(r=2, alpha=1.0, targets=["gate_proj", "up_proj"]),  # qv-r2's rank
}


def tiny_tokenizer() -> PreTrainedTokenizerFast:
    """A 400-token byte-level BPE with ChatML special tokens and chat template."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=400,
        special_tokens=["<|endoftext|>", "<|im_start|>", "<|im_end|>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(CORPUS.read_text().splitlines(), trainer)
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok, eos_token="<|im_end|>", pad_token="<|endoftext|>"
    )
    fast.chat_template = CHATML
    return fast


def tiny_base(out: Path, seed: int = 0, hidden: int = 32) -> Path:
    """Save a tiny seeded LLaMA and its tokenizer to `out` (a Hugging Face directory)."""
    tokenizer = tiny_tokenizer()
    torch.manual_seed(seed)
    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=hidden,
        intermediate_size=2 * hidden,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=256,
        initializer_range=0.1,  # peaked logits: greedy choices are far from ties
        tie_word_embeddings=False,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        bos_token_id=None,
    )
    model = LlamaForCausalLM(config).eval()
    model.generation_config.eos_token_id = tokenizer.eos_token_id
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)
    return out


def unwrap(model: torch.nn.Module, report: InjectionReport) -> None:
    """Put back the base modules that inject_lora wrapped (the base weights were frozen)."""
    for path, layer in report.layers.items():
        parent_path, _, child = path.rpartition(".")
        parent = model.get_submodule(parent_path) if parent_path else model
        setattr(parent, child, layer.base_layer)
    model.requires_grad_(False)


def random_adapter(
    model: torch.nn.Module, cfg: LoraConfig, out: Path, seed: int, scale: float = 1.0
) -> Path:
    """Write an adapter with random B (std `scale`) for `model` (left as it was) to `out`."""
    report = inject_lora(model, cfg)
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for layer in report.layers.values():
            layer.lora_B.copy_(torch.randn(layer.lora_B.shape, generator=gen) * scale)
    save_adapter(out, lora_state_dict(model), cfg, report.target_modules, model.config, "tiny")
    unwrap(model, report)
    return out


def tiny_adapters(base_dir: Path, out: Path) -> dict[str, Path]:
    """TINY_ADAPTERS written for the base in `base_dir`, as {name: directory}."""
    model = LlamaForCausalLM.from_pretrained(base_dir).eval()
    return {
        name: random_adapter(model, cfg, out / name, seed=i + 1)
        for i, (name, cfg) in enumerate(TINY_ADAPTERS.items())
    }


def peft_model(base: torch.nn.Module, adapters: dict[str, Path]):
    """`base` under PEFT with every adapter loaded by name (the reference for one adapter)."""
    from peft import PeftModel

    names = list(adapters)
    model = PeftModel.from_pretrained(base, adapters[names[0]], adapter_name=names[0])
    for name in names[1:]:
        model.load_adapter(adapters[name], adapter_name=name)
    return model.eval()


@torch.no_grad()
def peft_greedy(
    model, name: str | None, prompt_ids: list[int], max_tokens: int, eos: int
) -> list[int]:
    """Greedy continuation by PEFT with adapter `name` alone (None: adapters disabled)."""
    from contextlib import nullcontext

    ids = torch.tensor([prompt_ids])
    if name is not None:
        model.set_adapter(name)
    with model.disable_adapter() if name is None else nullcontext():
        out = model.generate(
            input_ids=ids,
            attention_mask=torch.ones_like(ids),
            max_new_tokens=max_tokens,
            do_sample=False,
            eos_token_id=eos,
            pad_token_id=eos,
        )
    tokens = out[0, len(prompt_ids) :].tolist()
    return tokens[: tokens.index(eos)] if eos in tokens else tokens


def load_default_model() -> tuple[torch.nn.Module, object]:
    """The project's default base (SmolLM2-135M-Instruct) in fp32, and its tokenizer."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from lora_dist.models import resolve_model_dir
    from tests import runs

    path = resolve_model_dir(None, runs.CACHE)  # built once per test session
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
    return model.eval().requires_grad_(False), AutoTokenizer.from_pretrained(path)


def train_adapter(
    model: torch.nn.Module, tokenizer, cfg: LoraConfig, text: str, out: Path, steps: int, lr: float
) -> list[float]:
    """A few AdamW steps of lora-dist LoRA on one text; saves the adapter, leaves `model` bare.

    Returns the losses, so a test can see that training moved the adapter.
    """
    report = inject_lora(model, cfg)
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=lr, weight_decay=0.0)
    ids = tokenizer(text, return_tensors="pt")["input_ids"]
    losses = []
    model.train()
    for _ in range(steps):
        loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        losses.append(loss.item())
    model.eval()
    save_adapter(out, lora_state_dict(model), cfg, report.target_modules, model.config, "default")
    unwrap(model, report)
    return losses
