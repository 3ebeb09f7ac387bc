"""Multi-rank probe: LoRA on TP-sharded fused-QKV models against the same LoRA, unsharded.

Run as `torchrun --nproc_per_node 2 tests/tp_fused_probe.py OUT.json KIND...` (float64, no ZeRO,
no engine). For each tiny model kind (tests.tiny_models) and each of the 'attn' (q, v slices)
and 'all' (q, k, v slices, o and MLP) presets, every rank builds the same model; the reference
keeps it whole, the other copy is sharded by `shard_base_for_tp` (our Conv1D split for GPT-2,
DeepSpeed AutoTP otherwise). Rank 0 writes the largest differences per case.
"""

from __future__ import annotations

import copy
import json
import sys

import torch


def compare(kind: str, targets: str) -> dict:
    import deepspeed.comm as dist

    from lora_dist.adapter import lora_state_dict
    from lora_dist.distributed.tp import inject_lora_tp, lora_factor_digest, shard_base_for_tp
    from lora_dist.inject import inject_lora
    from lora_dist.lora import LoraConfig, lora_layers
    from tests.tiny_models import randomize_lora_b, tiny_fused, tokens

    base = tiny_fused(kind, dtype=torch.float64)
    reference = copy.deepcopy(base)
    lora = LoraConfig(r=4, alpha=8.0, targets=targets)
    torch.manual_seed(1)
    inject_lora(reference, lora)
    randomize_lora_b(reference)
    shard_base_for_tp(base, {"tensor_parallel": {"autotp_size": 2}})
    torch.manual_seed(1)
    inject_lora_tp(base, lora)
    ref_layers, tp_layers = lora_layers(reference), lora_layers(base)
    r = {
        "same_layers": set(ref_layers) == set(tp_layers),
        "same_init": all(torch.equal(ref_layers[k].lora_A, tp_layers[k].lora_A) for k in tp_layers),
        "kinds": sorted({type(m).__name__ for m in tp_layers.values()}),
        "base_kinds": sorted({type(m.base_layer).__name__ for m in tp_layers.values()}),
    }
    with torch.no_grad():
        for name, layer in tp_layers.items():
            layer.lora_B.copy_(ref_layers[name].lora_B)
    ids = tokens(3, 10)
    outs = []
    for model in (reference, base):
        out = model(input_ids=ids, labels=ids)
        out.loss.backward()
        outs.append(out)
    r["logits_err"] = (outs[0].logits - outs[1].logits).abs().max().item()
    r["loss_err"] = abs(outs[0].loss.item() - outs[1].loss.item())
    grads = [(getattr(ref_layers[n], f).grad, getattr(tp_layers[n], f).grad)
             for n in tp_layers for f in ("lora_A", "lora_B")]  # fmt: skip
    r["grad_err"] = max((a - b).abs().max().item() for a, b in grads)
    r["grad_scale"] = max(a.abs().max().item() for a, _ in grads)
    mine = torch.cat([b.flatten() for _, b in grads])
    peers = [torch.zeros_like(mine) for _ in range(dist.get_world_size())]
    dist.all_gather(peers, mine)
    r["grads_bit_identical"] = all(torch.equal(peers[0], p) for p in peers)
    digest = lora_factor_digest(base)
    peers = [torch.zeros_like(digest) for _ in range(dist.get_world_size())]
    dist.all_gather(peers, digest)
    r["factors_bit_identical"] = all(torch.equal(peers[0], p) for p in peers)
    exported, expected = lora_state_dict(base), lora_state_dict(reference)
    r["export_equal"] = exported.keys() == expected.keys() and all(
        torch.equal(exported[k], expected[k]) for k in expected
    )
    with torch.no_grad():  # merging into each rank's shard gives the unmerged output
        before = base(input_ids=ids).logits
        for layer in tp_layers.values():
            layer.merge()
        base.eval()
        r["merge_err"] = (before - base(input_ids=ids).logits).abs().max().item()
    return r


def main(out_path: str, kinds: list[str]) -> None:
    import deepspeed
    import deepspeed.comm as dist

    deepspeed.init_distributed(dist_backend="gloo")
    results = {f"{k}/{t}": compare(k, t) for k in kinds for t in ("attn", "all")}
    if dist.get_rank() == 0:
        with open(out_path, "w") as fh:
            json.dump(results, fh, indent=2)
    dist.barrier()
    # A clean teardown: without it gloo's threads can abort the process at exit ("terminate
    # called without an active exception"), failing a run whose results are all written.
    torch.distributed.destroy_process_group()


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2:])
