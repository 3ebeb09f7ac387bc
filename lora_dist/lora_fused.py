"""LoRA on slices of a fused QKV projection: one rank-r update per enabled slice, k untouched.

GPT-2, BLOOM, GPT-NeoX, Falcon and Phi-3 compute q, k and v with one fused linear map. The
LoRA paper adapts only W_q and W_v; loralib's `MergedLinear(enable_lora=[True, False, True])`
does that with one update per slice. Here, for each enabled slice s in (q, k, v):

    h[rows_s] = W0[rows_s]·x + s·B_s·A_s·dropout(x)        (every other row: h = W0·x)

with A_s (r x in) random and B_s (|rows_s| x r) zero at init. `rows_s` are the output rows of the
fused weight (out x in) that the model's attention code reads as s, in the order it flattens s
into (head, head_dim). They differ per architecture and are taken from transformers' modelling
code (see `fused_layout`). The factors are stored stacked, A = [A_q; A_v] ((n·r) x in) and
B = [B_q; B_v] ((|q|+|v|) x r), so the layer still has one `lora_A` and one `lora_B`.

PEFT cannot express a slice update (huggingface/peft #1705) but it can express the same map as
an ordinary rank-(n·r) LoRA on the fused module: A' = A, and B' (out x n·r) zero except B_s in
the rows of slice s and the columns of its r-block. PEFT scales by alpha'/(n·r), so alpha' =
n·alpha (rsLoRA: alpha/sqrt(r) needs alpha' = sqrt(n)·alpha). `export_factors` and
`import_factors` convert; `peft_patterns` gives the rank_pattern/alpha_pattern entries.

Nothing here imports torch.distributed or deepspeed. A tensor-parallel base passes the global
fused row of each of its local output rows (`local_rows`); the layer then applies only its own
part of each slice and merges into its own shard.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from lora_dist.lora import LoraConfig, LoraLinear, linear_dims

SLICES = ("q", "k", "v")
# The fused QKV module of each architecture that has one, by model_type.
FUSED_QKV_MODULE = {
    "gpt2": "c_attn",
    "bloom": "query_key_value",
    "gpt_neox": "query_key_value",
    "falcon": "query_key_value",
    "phi3": "qkv_proj",
}
_TARGET = re.compile(r"^(?P<name>[^\[\]]+)\[(?P<slices>[qkv](?:,[qkv])*)\]$")


@dataclass(frozen=True)
class FusedLayout:
    """Where q, k and v sit among the output rows of a fused weight (oriented out x in)."""

    out_features: int
    rows: dict[str, tuple[int, ...]]
    """rows[s][j]: the fused row holding element j of s, s flattened as (head, head_dim)."""

    def rows_of(self, part: str) -> torch.Tensor:
        return torch.tensor(self.rows[part], dtype=torch.long)


def _blocks(q: int, k: int, v: int) -> FusedLayout:
    """[Q | K | V]: GPT-2's c_attn (split by split_size), Phi-3, Falcon multi-query."""
    return FusedLayout(
        q + k + v,
        {
            "q": tuple(range(q)),
            "k": tuple(range(q, q + k)),
            "v": tuple(range(q + k, q + k + v)),
        },
    )


def _grouped(kv_heads: int, per_group: int, head_dim: int) -> FusedLayout:
    """(kv_heads, per_group + 2, head_dim): the per_group query heads of a group, then its k, v.

    With per_group = 1 this is BLOOM's and GPT-NeoX's (heads, 3, head_dim) interleaving.
    """
    width = (per_group + 2) * head_dim
    q = [g * width + m * head_dim + d for g in range(kv_heads) for m in range(per_group)
         for d in range(head_dim)]  # fmt: skip
    k = [g * width + per_group * head_dim + d for g in range(kv_heads) for d in range(head_dim)]
    v = [g * width + (per_group + 1) * head_dim + d for g in range(kv_heads)
         for d in range(head_dim)]  # fmt: skip
    return FusedLayout(kv_heads * width, {"q": tuple(q), "k": tuple(k), "v": tuple(v)})


def fused_layout(config: Any) -> FusedLayout:
    """The q/k/v rows of a config's fused projection, as the model's attention code reads them.

    - gpt2 (`GPT2Attention.forward`): `c_attn(x).split(split_size=n_embd)`: [Q | K | V].
    - bloom (`BloomAttention._reshape`), gpt_neox (`GPTNeoXAttention.forward`): view as
      (heads, 3, head_dim) (NeoX: (heads, 3·head_dim) then chunk(3)): interleaved per head.
    - falcon (`FalconAttention._split_heads`): new_decoder_architecture views
      (kv_heads, heads/kv_heads + 2, head_dim); multi_query views (heads + 2, head_dim), i.e.
      [Q | K | V] with one k and one v head; otherwise (heads, 3, head_dim) as BLOOM.
    - phi3 (`Phi3Attention.forward`): slices at heads·head_dim and + kv_heads·head_dim.
    """
    kind = config.model_type
    if kind == "gpt2":
        h = config.n_embd
        return _blocks(h, h, h)
    if kind in ("bloom", "gpt_neox"):
        heads = config.num_attention_heads
        return _grouped(heads, 1, config.hidden_size // heads)
    if kind == "falcon":
        heads = config.num_attention_heads
        head_dim = config.hidden_size // heads
        if config.new_decoder_architecture:
            kv = config.num_kv_heads
            return _grouped(kv, heads // kv, head_dim)
        if config.multi_query:
            return _blocks(heads * head_dim, head_dim, head_dim)
        return _grouped(heads, 1, head_dim)
    if kind == "phi3":
        heads, kv = config.num_attention_heads, config.num_key_value_heads
        head_dim = getattr(config, "head_dim", None) or config.hidden_size // heads
        return _blocks(heads * head_dim, kv * head_dim, kv * head_dim)
    raise ValueError(
        f"no fused-QKV layout for model_type {kind!r}; layouts exist for "
        f"{', '.join(sorted(FUSED_QKV_MODULE))}"
    )


def parse_target(target: str) -> tuple[str, tuple[str, ...] | None]:
    """'c_attn[q,v]' -> ('c_attn', ('q', 'v')); a plain suffix -> (suffix, None)."""
    if "[" not in target:
        return target, None
    match = _TARGET.match(target)
    if match is None:
        raise ValueError(
            f"lora target {target!r}: a slice target is '<fused module>[<slices>]' with slices "
            "from q, k, v, e.g. 'c_attn[q,v]'"
        )
    slices = tuple(match["slices"].split(","))
    if len(set(slices)) != len(slices):
        raise ValueError(f"lora target {target!r} names a slice twice")
    return match["name"], tuple(s for s in SLICES if s in slices)


def slice_target(name: str, slices: tuple[str, ...]) -> str:
    """The inverse of parse_target: ('c_attn', ('q', 'v')) -> 'c_attn[q,v]'."""
    return f"{name}[{','.join(slices)}]"


def split_slice_targets(
    targets: list[str] | str,
) -> tuple[list[str] | str, dict[str, tuple[str, ...]]]:
    """Our targets -> (PEFT's target_modules, {fused module: its slices})."""
    if not isinstance(targets, list):
        return targets, {}
    parsed = [parse_target(t) for t in targets]
    return [name for name, _ in parsed], {name: s for name, s in parsed if s is not None}


def join_slice_targets(
    target_modules: list[str] | str, fused_slices: dict[str, list[str]]
) -> list[str] | str:
    """The inverse of split_slice_targets."""
    if not fused_slices:
        return target_modules
    if not isinstance(target_modules, list) or not set(fused_slices) <= set(target_modules):
        raise ValueError(
            f"slices are recorded for {sorted(fused_slices)}, which target_modules "
            f"{target_modules!r} does not list"
        )
    return [slice_target(t, tuple(fused_slices[t])) if t in fused_slices else t
            for t in target_modules]  # fmt: skip


def peft_scale_alpha(alpha: float, n_slices: int, use_rslora: bool) -> float:
    """PEFT's lora_alpha for the exported rank-(n·r) module, giving the same scale as ours."""
    return alpha * (math.sqrt(n_slices) if use_rslora else n_slices)


def peft_patterns(
    fused_slices: dict[str, tuple[str, ...]], config: LoraConfig
) -> tuple[dict[str, int], dict[str, float]]:
    """PEFT's rank_pattern and alpha_pattern entries for the exported fused modules."""
    ranks = {name: len(s) * config.r for name, s in fused_slices.items()}
    alphas = {
        name: peft_scale_alpha(config.alpha, len(s), config.use_rslora)
        for name, s in fused_slices.items()
    }
    return ranks, alphas


class FusedSliceLora(LoraLinear):
    """LoRA on the enabled slices of a fused QKV map: h[rows_s] += s·B_s·A_s·dropout(x).

    `lora_A` is [A_s; ...] ((n·r) x in), `lora_B` is [B_s; ...] (sum of |rows_s| x r), slices in
    (q, k, v) order. `local_rows[i]` is the fused row that output row i of `base` computes
    (all rows, in order, unless the base is a tensor-parallel shard).
    """

    def __init__(
        self,
        base: nn.Module,
        config: LoraConfig,
        layout: FusedLayout,
        slices: tuple[str, ...],
        local_rows: torch.Tensor | None = None,
    ) -> None:
        nn.Module.__init__(self)
        in_dim, out_dim, self.fan_in_fan_out = linear_dims(base)
        if local_rows is None:
            if out_dim != layout.out_features:
                raise ValueError(
                    f"fused module has {out_dim} outputs, the layout {layout.out_features}"
                )
            local_rows = torch.arange(out_dim)
        self.base_layer = base
        self.layout = layout
        self.slices = tuple(slices)
        self.r = config.r
        self.scaling = config.scaling
        self.merged = False
        device = base.weight.device
        dtype = config.lora_dtype or base.weight.dtype
        sizes = [len(layout.rows[s]) for s in self.slices]
        n = len(self.slices)
        self.lora_A = nn.Parameter(torch.empty(n * config.r, in_dim, device=device, dtype=dtype))
        self.lora_B = nn.Parameter(torch.zeros(sum(sizes), config.r, device=device, dtype=dtype))
        self.lora_dropout = nn.Dropout(config.dropout) if config.dropout > 0 else nn.Identity()
        with torch.no_grad():
            if config.init == "kaiming":  # per row the same bound as r x in; fan_in is `in`
                nn.init.kaiming_uniform_(self.lora_A, a=math.sqrt(5))
            else:
                nn.init.normal_(self.lora_A, std=1.0 / config.r)
        b_index, out_pos, self.local_counts = _local_selection(layout, self.slices, local_rows)
        self.register_buffer("b_index", b_index.to(device), persistent=False)
        self.register_buffer("out_pos", out_pos.to(device), persistent=False)

    def rows_of_b(self) -> torch.Tensor:
        """The rows of B that this layer's outputs use (all of them unless sharded)."""
        return self.lora_B.index_select(0, self.b_index)

    def enter_lora_branch(self, u: torch.Tensor) -> torch.Tensor:
        """Hook on u = A·x before the B products (a TP shard all-reduces du here)."""
        return u

    def lora_delta(self, x: torch.Tensor) -> torch.Tensor:
        """s·B_s·A_s·dropout(x) for every slice, concatenated in the order of `out_pos`."""
        a = self.lora_A
        u = self.enter_lora_branch(F.linear(self.lora_dropout(x).to(a.dtype), a))
        b = self.rows_of_b()
        parts = [
            F.linear(u_s, b_s)
            for u_s, b_s in zip(u.split(self.r, dim=-1), b.split(self.local_counts), strict=True)
        ]
        return torch.cat(parts, dim=-1) * self.scaling

    def add_delta(self, out: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        """The update goes into the adapted slices' columns of the fused output only."""
        return out.index_add(-1, self.out_pos, self.lora_delta(x).to(out.dtype))

    def slice_delta_rows(self) -> torch.Tensor:
        """s·B_s·A_s for the rows in `out_pos` (float32, oriented out x in)."""
        a, b = self.lora_A.float(), self.rows_of_b().float()
        parts = [
            b_s @ a_s for a_s, b_s in zip(a.split(self.r), b.split(self.local_counts), strict=True)
        ]
        return torch.cat(parts) * self.scaling

    def delta_weight(self) -> torch.Tensor:
        """s·B·A laid out like the base weight: zero outside the enabled slices' rows."""
        rows = self.slice_delta_rows()
        full = rows.new_zeros(int(self.local_rows_count), rows.shape[1])
        full[self.out_pos] = rows
        return full.T if self.fan_in_fan_out else full

    @property
    def local_rows_count(self) -> int:
        weight = self.base_layer.weight
        shape = getattr(weight, "ds_shape", weight.shape)
        return shape[1] if self.fan_in_fan_out else shape[0]

    def _write_rows(self, sign: float) -> None:
        """W0[rows] <- W0[rows] + sign·s·B·A, touching no other row of the base weight."""
        weight = self.base_layer.weight
        rows_view = weight.T if self.fan_in_fan_out else weight  # out x in, sharing storage
        new = rows_view[self.out_pos].float() + sign * self.slice_delta_rows().to(weight.device)
        if not torch.isfinite(new).all():
            raise ValueError("merging would write NaN or Inf into the base weight; not merged")
        with torch.no_grad():
            rows_view[self.out_pos] = new.to(weight.dtype)

    def merge(self) -> None:
        """W0[q, v rows] += s·B_s·A_s in place. Idempotent; other rows are never written."""
        if not self.merged:
            self._write_rows(1.0)
            self.merged = True

    def unmerge(self) -> None:
        """W0[q, v rows] -= s·B_s·A_s in place."""
        if self.merged:
            self._write_rows(-1.0)
            self.merged = False

    # -- PEFT's form: one rank-(n·r) LoRA on the whole fused module ------------------------------
    def export_factors(self, a: torch.Tensor, b: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Whole (gathered) stacked A, B -> PEFT's A' = A and B' (out x n·r), block-placed."""
        big = b.new_zeros(self.layout.out_features, a.shape[0])
        start = 0
        for i, part in enumerate(self.slices):
            rows = self.layout.rows_of(part)
            big[rows, i * self.r : (i + 1) * self.r] = b[start : start + len(rows)]
            start += len(rows)
        return a, big

    def import_factors(
        self, a: torch.Tensor, big: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """PEFT's A', B' -> stacked A, B; refuses a B' with anything outside the slice blocks."""
        n, out = len(self.slices), self.layout.out_features
        if tuple(big.shape) != (out, n * self.r) or a.shape[0] != n * self.r:
            raise ValueError(
                f"a slice adapter on {', '.join(self.slices)} needs lora_B of shape "
                f"{(out, n * self.r)}, got {tuple(big.shape)}: different rank or slices"
            )
        rest = big.clone()
        blocks = []
        for i, part in enumerate(self.slices):
            rows = self.layout.rows_of(part)
            cols = slice(i * self.r, (i + 1) * self.r)
            blocks.append(big[rows, cols])
            rest[rows, cols] = 0
        if rest.count_nonzero():
            raise ValueError(
                "lora_B has non-zero entries outside the rows of its slices: it is an ordinary "
                "LoRA on the whole fused module, not a slice adapter"
            )
        return a, torch.cat(blocks)

    def extra_repr(self) -> str:
        return f"slices={','.join(self.slices)}, " + super().extra_repr()


def _local_selection(
    layout: FusedLayout, slices: tuple[str, ...], local_rows: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor, list[int]]:
    """(rows of B used here, their output positions here, how many per slice)."""
    to_local = torch.full((layout.out_features,), -1, dtype=torch.long)
    to_local[local_rows.long().cpu()] = torch.arange(len(local_rows))
    b_index, out_pos, counts, start = [], [], [], 0
    for part in slices:
        rows = layout.rows_of(part)
        where = to_local[rows]
        kept = (where >= 0).nonzero().flatten()
        b_index.append(start + kept)
        out_pos.append(where[kept])
        counts.append(len(kept))
        start += len(rows)
    return torch.cat(b_index), torch.cat(out_pos), counts
