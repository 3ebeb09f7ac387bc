"""Multi-rank probe: LoRA on an AutoTP-sharded tiny LLaMA against the same LoRA, unsharded.

Run as `torchrun --nproc_per_node 2 tests/tp_probe.py OUT.json` (float64, no ZeRO, no engine).
Every rank builds the same model; the reference keeps it whole, the other copy is sharded by
DeepSpeed AutoTP. Rank 0 writes the largest differences of logits, loss and LoRA gradients.
"""

from __future__ import annotations

import copy
import json
import sys

import torch


def main(out_path: str) -> None:
    import deepspeed
    import deepspeed.comm as dist
    from transformers import LlamaConfig, LlamaForCausalLM

    from lora_dist.distributed.tp import inject_lora_tp, lora_factor_digest, shard_base_for_tp
    from lora_dist.inject import inject_lora
    from lora_dist.lora import LoraConfig, lora_layers

    deepspeed.init_distributed(dist_backend="gloo")
    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=64,
        hidden_size=32,
        intermediate_size=48,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=32,
        tie_word_embeddings=False,
    )
    base = LlamaForCausalLM(config).double()
    reference = copy.deepcopy(base)
    targets = [f"{n}_proj" for n in ("q", "k", "v", "o", "gate", "up", "down")] + ["lm_head"]
    lora = LoraConfig(r=4, alpha=8.0, targets=targets)

    torch.manual_seed(1)
    inject_lora(reference, lora)
    with torch.no_grad():  # B = 0 would hide every error in B's slice
        for layer in lora_layers(reference).values():
            layer.lora_B.normal_(std=0.1)

    mpu = shard_base_for_tp(base, {"tensor_parallel": {"autotp_size": 2}})
    torch.manual_seed(1)
    inject_lora_tp(base, lora)
    ref_layers, tp_layers = lora_layers(reference), lora_layers(base)
    same_init = all(
        torch.equal(ref_layers[k].lora_A, tp_layers[k].lora_A) for k in ref_layers
    ) and set(ref_layers) == set(tp_layers)
    with torch.no_grad():
        for name, layer in tp_layers.items():
            layer.lora_B.copy_(ref_layers[name].lora_B)

    ids = torch.randint(0, config.vocab_size, (3, 10), generator=torch.Generator().manual_seed(2))
    results: dict[str, object] = {
        "same_init": same_init,
        "kinds": sorted({type(m).__name__ for m in tp_layers.values()}),
        "base_kinds": sorted({type(m.base_layer).__name__ for m in tp_layers.values()}),
        "tp_world": mpu.get_tensor_model_parallel_world_size(),
    }
    outs = []
    for model in (reference, base):
        out = model(input_ids=ids, labels=ids)
        out.loss.backward()
        outs.append(out)
    results["logits_err"] = (outs[0].logits - outs[1].logits).abs().max().item()
    results["loss_err"] = abs(outs[0].loss.item() - outs[1].loss.item())
    grad_err = 0.0
    for name, ref in ref_layers.items():
        for factor in ("lora_A", "lora_B"):
            diff = getattr(ref, factor).grad - getattr(tp_layers[name], factor).grad
            grad_err = max(grad_err, diff.abs().max().item())
    results["grad_err"] = grad_err
    results["grad_scale"] = max(
        p.grad.abs().max().item()
        for layer in ref_layers.values()
        for p in layer.parameters()
        if p.grad is not None
    )

    # Gradients must also be identical across TP ranks, bit for bit.
    grads = torch.cat(
        [p.grad.flatten() for layer in tp_layers.values() for p in (layer.lora_A, layer.lora_B)]
    )
    gathered = [torch.zeros_like(grads) for _ in range(dist.get_world_size())]
    dist.all_gather(gathered, grads)
    results["grads_bit_identical"] = all(torch.equal(gathered[0], g) for g in gathered)
    digest = lora_factor_digest(base)
    gathered = [torch.zeros_like(digest) for _ in range(dist.get_world_size())]
    dist.all_gather(gathered, digest)
    results["factors_bit_identical"] = all(torch.equal(gathered[0], g) for g in gathered)

    # Merging into the local shard must give the unmerged output.
    with torch.no_grad():
        before = base(input_ids=ids).logits
        for layer in tp_layers.values():
            layer.merge()
        base.eval()
        after = base(input_ids=ids).logits
    results["merge_err"] = (before - after).abs().max().item()

    if dist.get_rank() == 0:
        with open(out_path, "w") as fh:
            json.dump(results, fh, indent=2)
    dist.barrier()
    torch.distributed.destroy_process_group()  # a clean teardown (see tp_fused_probe.py)


if __name__ == "__main__":
    main(sys.argv[1])
