"""An adapter trained on the real default model serves the same in PEFT and merged as with us."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
import torch
from peft import PeftModel
from transformers import AutoModelForCausalLM, AutoTokenizer

from lora_dist.adapter import load_adapter
from lora_dist.cli import main as cli
from lora_dist.data import encode_prompt
from lora_dist.generate import greedy_generate
from lora_dist.models import DEFAULT_MODEL, resolve_model_dir
from lora_dist.tasks.wikisql import TASK as WIKISQL
from tests import runs
from tests.runs import TrainedRun

STEPS = 4
PROMPTS = 4


def _small_wikisql(root: Path) -> Path:
    """The shipped sample cut to 32 training and 8 dev questions (the dev loss runs twice)."""
    data = root / "wikisql"
    shutil.copytree(WIKISQL.sample_dir(), data)
    for split, keep in (("train", 32), ("dev", 8)):
        path = data / f"{split}.jsonl"
        path.write_text("".join(path.read_text().splitlines(keepends=True)[:keep]))
    return data


@pytest.fixture(scope="module")
def trained(tmp_path_factory: pytest.TempPathFactory):
    """A LoRA r=8 q,v adapter: 4 bf16 ZeRO-3 steps on 2 ranks of the real default model."""
    root = tmp_path_factory.mktemp("real")
    out = root / "run"
    runs.train(
        2,
        *(
            "--model",
            DEFAULT_MODEL,
            "--ds_config",
            str(runs.REPO / "tests/configs/zero3_bf16_small.json"),
        ),
        *("--output_dir", str(out), "--max_steps", str(STEPS), "--eval_every", str(STEPS)),
        *(
            "--data",
            str(_small_wikisql(root)),
            "--max_length",
            "128",
            "--lora_r",
            "8",
            "--lora_targets",
            "attn",
            "--skip_task_eval",
        ),
    )
    return out


def _ours(base, adapter):
    model = AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32)
    load_adapter(model, adapter)
    return model.eval()


def _prompts() -> list[str]:
    rows = WIKISQL.load_split(WIKISQL.sample_dir(), "dev").to_list()[:PROMPTS]
    return [WIKISQL.prompt(r) for r in rows]


def test_training_moved_the_adapter_and_the_loss(trained) -> None:
    metrics = TrainedRun(trained).metrics
    assert metrics["dev_loss"] < metrics["dev_loss_initial"]
    b = [v for k, v in TrainedRun(trained).adapter().items() if "lora_B" in k]
    assert b and all(t.abs().max() > 0 for t in b)  # every B left zero: trained


def test_peft_gives_the_same_logits_and_generations(trained) -> None:
    base = resolve_model_dir(None, runs.CACHE)
    tok = AutoTokenizer.from_pretrained(base)
    ours = _ours(base, trained / "adapter")
    plain = AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32)
    peft = PeftModel.from_pretrained(plain, str(trained / "adapter")).eval()
    ids = torch.tensor([encode_prompt(tok, _prompts()[0])])
    with torch.no_grad():
        torch.testing.assert_close(peft(ids).logits, ours(ids).logits, rtol=0, atol=1e-5)
    texts = _prompts()
    with torch.no_grad():
        a = greedy_generate(ours, _AsInTraining(tok), texts, max_new_tokens=24, batch_size=PROMPTS)
        b = greedy_generate(peft, _AsInTraining(tok), texts, max_new_tokens=24, batch_size=PROMPTS)
    assert a == b and any(a)


def test_the_merged_model_generates_what_the_adapter_does(trained, tmp_path) -> None:
    base = resolve_model_dir(None, runs.CACHE)
    merged_dir = tmp_path / "merged"
    args = ["--base", str(base), "--adapter", str(trained), "--out", str(merged_dir)]
    assert cli(["merge", *args, "--dtype", "fp32"]) == 0
    tok = AutoTokenizer.from_pretrained(base)
    merged = AutoModelForCausalLM.from_pretrained(merged_dir, dtype=torch.float32).eval()
    ours = _ours(base, trained / "adapter")
    texts = _prompts()
    with torch.no_grad():
        a = greedy_generate(ours, _AsInTraining(tok), texts, max_new_tokens=24, batch_size=PROMPTS)
        b = greedy_generate(
            merged, _AsInTraining(tok), texts, max_new_tokens=24, batch_size=PROMPTS
        )
    assert a == b


class _AsInTraining:
    """The tokenizer as generation sees it, encoding prompts as training does (BOS + prompt)."""

    def __init__(self, tok) -> None:
        self._tok = tok

    def __call__(self, text: str) -> dict[str, list[int]]:
        return {"input_ids": encode_prompt(self._tok, text)}

    def __getattr__(self, name: str):
        return getattr(self._tok, name)
