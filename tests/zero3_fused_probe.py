"""Probe launched by tests/test_lora_fused.py: fused-QKV families under ZeRO-3 on one rank.

`python tests/zero3_fused_probe.py OUT.json` (with RANK/WORLD_SIZE/MASTER_* set). For each tiny
fused family it records the initial loss of the model built three ways (plainly, under a bare
`deepspeed.zero.Init`, and with `build_zero3_from_config`), then loads the saved model into
ZeRO-3 partitions the trainer's way, injects slice LoRA on the partitioned fused weight, and
compares the logits of a DeepSpeed engine with the same LoRA on the plain model; and the merged
weights (gathered, merged, re-partitioned) with the unmerged logits.
"""

from __future__ import annotations

import json
import math
import sys
import tempfile
from pathlib import Path

import torch

DS = {
    "train_batch_size": 1,
    "train_micro_batch_size_per_gpu": 1,
    "optimizer": {"type": "SGD", "params": {"lr": 0.0}},
    "zero_allow_untested_optimizer": True,
    "zero_optimization": {"stage": 3, "stage3_param_persistence_threshold": 0},
    "steps_per_print": 10**9,
}


def _loss(model, ids) -> float:
    import deepspeed

    with deepspeed.zero.GatheredParameters(list(model.parameters())), torch.no_grad():
        return model(input_ids=ids, labels=ids).loss.item()


def probe(kind: str, workdir: Path) -> dict:
    import deepspeed

    from lora_dist.distributed.loading import build_zero3_from_config, load_base_model
    from lora_dist.distributed.zero import gathered
    from lora_dist.inject import inject_lora
    from lora_dist.lora import LoraConfig, lora_layers, merge_lora
    from tests.tiny_models import randomize_lora_b, tiny_fused, tokens

    plain = tiny_fused(kind)
    ids = tokens(2, 12)
    result = {"ln_vocab": math.log(plain.config.vocab_size), "plain": _loss(plain, ids)}
    try:  # recorded, not asserted: the pitfall that build_zero3_from_config avoids
        with deepspeed.zero.Init(config_dict_or_path=DS):
            bare = type(plain)(plain.config)
        result["bare_zero_init"] = _loss(bare, ids)
    except IndexError as exc:  # Phi-3 zeroes its padding row of an empty placeholder
        result["bare_zero_init"] = f"IndexError: {exc}"
    result["built"] = _loss(build_zero3_from_config(plain.config, DS), ids)

    plain.save_pretrained(workdir / kind)
    model = load_base_model(workdir / kind, DS, stage=3)  # the trainer's loading
    lora = LoraConfig(r=2, alpha=4.0, targets="attn")
    for m in (plain, model):
        torch.manual_seed(3)
        inject_lora(m, lora)
        randomize_lora_b(m)
    engine, *_ = deepspeed.initialize(
        model=model, model_parameters=[p for p in model.parameters() if p.requires_grad], config=DS
    )
    engine.eval()
    with torch.no_grad():
        expected = plain(ids).logits
        result["lora_vs_plain"] = (engine(ids).logits - expected).abs().max().item()
        result["lora_effect"] = (expected - tiny_fused(kind)(ids).logits).abs().max().item()
        layers = lora_layers(model).values()
        result["partitioned"] = all(layer.base_layer.weight.numel() == 0 for layer in layers)
        weights = [p for layer in layers for p in (layer.base_layer.weight, *layer.parameters())]
        with gathered(weights, modifier_rank=0):
            merge_lora(model)
        merged = engine(ids).logits
    result["merged_vs_unmerged"] = (merged - expected).abs().max().item()
    return result


def main(out: str) -> None:
    import deepspeed

    from tests.tiny_models import FUSED_KINDS

    deepspeed.init_distributed(dist_backend="gloo")
    with tempfile.TemporaryDirectory() as tmp:
        results = {kind: probe(kind, Path(tmp)) for kind in FUSED_KINDS}
    Path(out).write_text(json.dumps(results, indent=2))
    torch.distributed.barrier()
    torch.distributed.destroy_process_group()  # a clean teardown (see tp_fused_probe.py)


if __name__ == "__main__":
    main(sys.argv[1])
