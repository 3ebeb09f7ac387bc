"""Many LoRA adapters on one frozen base: each row of a batch uses its own adapter (BGMV-style).

For row i of a batch with adapter a(i), every adapted linear map computes

    h_i = W0·x_i + s_a·B_a·A_a·x_i        (slot 0, the bare base, adds nothing)

The base matmul W0·x runs once for the whole batch. Per module, the factors of the adapters that
target it are stacked, zero-padded to the largest rank among them: A as (n+1, r_max, in) and
B as (n+1, out, r_max), index 0 all zeros. A forward pass gathers each row's A and B by its
adapter's index and runs two batched matmuls, which is Punica/S-LoRA's BGMV written in plain
torch. Rows are grouped by their adapter's rank and gather the stacks cut to that rank, so no
work goes into the padding and each row's matmuls have the shapes its adapter alone would have
(a group whose rows all share one adapter uses its factors directly, without a gather). A row
computes what PEFT computes with that adapter, up to fp32 rounding in the GEMM kernels (bitwise,
except rows that fall in a kernel's tail block: see tests/serving/test_default_model.py).

Nothing is merged and the base weights are never written: adapters are added and removed by
rebuilding the small stacks, between forward passes. Reading an adapter directory (PEFT's
format, see lora_dist.adapter) checks it against the base and refuses a mismatch with the reason,
before anything in the model changes. No serving code and nothing distributed lives here.
"""

from __future__ import annotations

import math
import re
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from lora_dist.adapter import (
    check_base_identity,
    lora_config_from_peft,
    parse_peft_key,
    read_adapter_config,
    read_adapter_weights,
)
from lora_dist.errors import AdapterError
from lora_dist.inject import is_linear, resolve_targets
from lora_dist.lora import LoraConfig, linear_dims

BASE_SLOT = 0
"""The slot of the bare base model: rows with it get no LoRA update."""


@dataclass(frozen=True)
class AdapterFactors:
    """One adapter's factors, checked against a base and ready to install."""

    config: LoraConfig
    """Rank, alpha, rsLoRA and targets as the adapter's config states them."""
    factors: dict[str, tuple[torch.Tensor, torch.Tensor]]
    """module path -> (A of shape r x in, B of shape out x r)."""
    scales: dict[str, float]
    """module path -> s in h = W0·x + s·B·A·x (PEFT's rank and alpha patterns may set r)."""
    source: str = ""
    """Where the factors came from, for messages."""

    @property
    def modules(self) -> list[str]:
        """The adapted module paths, sorted."""
        return sorted(self.factors)

    @property
    def numel(self) -> int:
        """Elements in all factors."""
        return sum(a.numel() + b.numel() for a, b in self.factors.values())


@dataclass(frozen=True)
class RankGroup:
    """The rows of a batch whose adapters have one rank: one gather and two bmms per module."""

    rank: int
    slots: torch.Tensor
    """(rows in the group,) their adapter slots."""
    rows: torch.Tensor | None
    """Their row indices in the batch; None when the group is the whole batch."""
    members: frozenset[int]
    """The distinct slots in the group."""

    @property
    def only(self) -> int | None:
        """The slot, when every row of the group has the same adapter."""
        return next(iter(self.members)) if len(self.members) == 1 else None


class RowAdapters:
    """The slot of each row of the batch being run, shared by every MultiLoraLinear of a model."""

    def __init__(self, capacity: int) -> None:
        self.capacity = capacity
        """Slots are 0..capacity-1."""
        self.batch = 0
        """Rows in the batch being run (0 outside a forward pass)."""
        self.groups: list[RankGroup] = []
        """The rows that use an adapter, grouped by the adapter's rank (rows of the base: none)."""

    def set(self, slots: list[int], ranks: dict[int, int], device: torch.device) -> None:
        """Group the rows of a batch with these slots by rank; `ranks` maps slot -> rank."""
        by_rank: dict[int, list[int]] = {}
        for row, slot in enumerate(slots):
            if slot != BASE_SLOT:
                by_rank.setdefault(ranks[slot], []).append(row)
        groups = []
        for rank, rows in sorted(by_rank.items()):
            whole = len(rows) == len(slots)
            groups.append(
                RankGroup(
                    rank=rank,
                    slots=torch.tensor([slots[r] for r in rows], dtype=torch.long, device=device),
                    rows=None if whole else torch.tensor(rows, dtype=torch.long, device=device),
                    members=frozenset(slots[r] for r in rows),
                )
            )
        self.batch, self.groups = len(slots), groups


class MultiLoraLinear(nn.Module):
    """Wraps a frozen linear map; row i adds s·B·A·x_i of the adapter in its slot, if any."""

    def __init__(self, base: nn.Module, rows: RowAdapters) -> None:
        super().__init__()
        self.base_layer = base
        self.rows = rows
        self.in_features, self.out_features, _ = linear_dims(base)
        self._adapters: dict[int, tuple[torch.Tensor, torch.Tensor, float]] = {}
        self._slots: frozenset[int] = frozenset()
        self._stacks: tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor] | None = None

    @property
    def weight(self) -> torch.Tensor:
        """The base weight, so code that inspects `module.weight` keeps working."""
        return self.base_layer.weight

    @property
    def slots(self) -> list[int]:
        """The slots whose adapter adapts this module."""
        return sorted(self._adapters)

    def set_adapter(self, slot: int, a: torch.Tensor, b: torch.Tensor, scaling: float) -> None:
        """Install (or replace) the factors of `slot` and rebuild the stacks."""
        self._adapters[slot] = (a, b, scaling)
        self._rebuild()

    def remove_adapter(self, slot: int) -> None:
        """Drop `slot`'s factors, if this module has them."""
        if self._adapters.pop(slot, None) is not None:
            self._rebuild()

    def _rebuild(self) -> None:
        self._slots = frozenset(self._adapters)
        if not self._adapters:
            self._stacks = None
            return
        first_a = next(iter(self._adapters.values()))[0]
        dtype, device = first_a.dtype, first_a.device
        r_max = max(a.shape[0] for a, _, _ in self._adapters.values())
        n = len(self._adapters) + 1
        a_stack = torch.zeros(n, r_max, self.in_features, dtype=dtype, device=device)
        b_stack = torch.zeros(n, self.out_features, r_max, dtype=dtype, device=device)
        scales = torch.zeros(n, dtype=dtype, device=device)
        local = torch.zeros(self.rows.capacity, dtype=torch.long, device=device)
        for pos, (slot, (a, b, scaling)) in enumerate(sorted(self._adapters.items()), start=1):
            a_stack[pos, : a.shape[0]] = a
            b_stack[pos, :, : b.shape[1]] = b
            scales[pos] = scaling
            local[slot] = pos
        self._stacks = (local, a_stack, b_stack, scales)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.base_layer(x)
        if self._stacks is None or not self.rows.groups:
            return out
        if self.rows.batch != x.shape[0]:
            raise ValueError(f"{self.rows.batch} row slots for a batch of {x.shape[0]} rows")
        local, a_stack, b_stack, scales = self._stacks
        for group in self.rows.groups:
            if group.members.isdisjoint(self._slots):
                continue
            rows = x if group.rows is None else x.index_select(0, group.rows)
            rows = rows.to(a_stack.dtype)
            if group.only is not None:  # one adapter for these rows: its factors as they are
                a, b, scaling = self._adapters[group.only]
                delta = F.linear(F.linear(rows, a), b) * scaling
            else:
                # Each row gathers its adapter's factors at the group's rank here: no flops on
                # the padding, and the matmul shapes of that adapter alone. Rows whose adapter
                # does not adapt this module gather stack entry 0, all zeros.
                rank = max(self._adapters[s][0].shape[0] for s in group.members & self._slots)
                pos = local[group.slots]
                rows = rows.reshape(rows.shape[0], -1, x.shape[-1])
                shrunk = torch.bmm(rows, a_stack[:, :rank][pos].transpose(1, 2))
                expand = b_stack[:, :, :rank][pos].transpose(1, 2)
                delta = torch.bmm(shrunk, expand) * scales[pos].view(-1, 1, 1)
            delta = delta.reshape(-1, *out.shape[1:]).to(out.dtype)
            if group.rows is None:
                out += delta
            else:
                out.index_add_(0, group.rows, delta)
        return out

    def extra_repr(self) -> str:
        return f"slots={self.slots}"


def _select(paths: Sequence[str], targets: list[str] | str) -> list[str]:
    """The paths PEFT would adapt for `targets`: suffixes, a full-match regex, or all-linear."""
    if targets == "all-linear":
        return list(paths)
    if isinstance(targets, str):
        return [p for p in paths if re.fullmatch(targets, p)]
    return [p for p in paths if any(p == t or p.endswith("." + t) for t in targets)]


def _pattern_value(pattern: dict[str, float] | None, path: str, default: float) -> float:
    """PEFT's rank_pattern/alpha_pattern lookup: the first key that matches the end of `path`."""
    for key, value in (pattern or {}).items():
        if re.match(rf"(.*\.)?({key})$", path):
            return value
    return default


class MultiLoraModel:
    """A causal LM holding many adapters at once; each forward pass names every row's slot.

    The model's targeted linear modules are wrapped (once, on first use) by MultiLoraLinear;
    their weights are left alone. `add` returns the slot of a new adapter; rows with slot 0 run
    the bare base. Add and remove only between forward passes.
    """

    def __init__(self, model: nn.Module, max_adapters: int = 64) -> None:
        if max_adapters < 1:
            raise ValueError(f"max_adapters must be >= 1, got {max_adapters}")
        self.model = model
        self.max_adapters = max_adapters
        self.rows = RowAdapters(max_adapters + 1)
        self.adapters: dict[int, AdapterFactors] = {}
        output = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
        self._linears: dict[str, nn.Module] = {
            name: m
            for name, m in model.named_modules()
            if (is_linear(m) or isinstance(m, MultiLoraLinear)) and m is not output
        }
        param = next(model.parameters())
        self.device, self.dtype = param.device, param.dtype

    @property
    def config(self):
        """The base model's Hugging Face config."""
        return self.model.config

    def read(self, adapter_dir: str | Path) -> AdapterFactors:
        """Read a PEFT adapter directory and check it against this base; the model is unchanged.

        Refuses, with the reason, an adapter recorded as trained on another base, one whose
        tensors name modules this base lacks or have shapes it cannot take, a corrupt file, and
        non-finite factors. Safe to call from any thread.
        """
        cfg = read_adapter_config(adapter_dir)
        check_base_identity(adapter_dir, self.model.config)
        weights = read_adapter_weights(adapter_dir)
        # PEFT's view of the file: a plain LoRA per module. Fused-QKV slice adapters are stored
        # that way too (lora_dist.lora_fused), as rank n·r on the fused module via rank_pattern.
        try:
            config = lora_config_from_peft({**cfg, "targets": cfg["target_modules"]})
        except ValueError as exc:
            raise AdapterError(f"{adapter_dir}: {exc}") from exc
        ranks, alphas = cfg.get("rank_pattern") or {}, cfg.get("alpha_pattern") or {}
        return self.check(config, weights, str(adapter_dir), ranks, alphas)

    def check(
        self,
        config: LoraConfig,
        weights: dict[str, torch.Tensor],
        source: str = "",
        rank_pattern: dict[str, int] | None = None,
        alpha_pattern: dict[str, float] | None = None,
    ) -> AdapterFactors:
        """Validate PEFT-keyed factors against this base; see `read`."""
        model_type = getattr(self.model.config, "model_type", None)
        try:
            targets = resolve_targets(config.targets, model_type)
        except ValueError as exc:
            raise AdapterError(f"{source}: {exc}") from exc
        wanted = set(_select(list(self._linears), targets))
        factors: dict[str, dict[str, torch.Tensor]] = {}
        for key, value in weights.items():
            parsed = parse_peft_key(key)
            if parsed is None:
                raise AdapterError(f"{source}: tensor {key} is not a LoRA factor this server runs")
            path, which = parsed
            if path not in self._linears:
                raise AdapterError(
                    f"{source}: {key} names module {path}, which is not a linear layer of this "
                    "base model: the adapter was made for a different base"
                )
            factors.setdefault(path, {})[which] = value
        if not factors:
            raise AdapterError(f"{source}: the adapter holds no LoRA factors")
        if wanted and set(factors) != wanted:
            missing = sorted(wanted - set(factors))[:3]
            extra = sorted(set(factors) - wanted)[:3]
            raise AdapterError(
                f"{source}: tensors do not match target_modules {targets!r} on this base "
                f"(missing {missing}, unexpected {extra})"
            )
        checked: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}
        scales: dict[str, float] = {}
        for path, pair in sorted(factors.items()):
            if set(pair) != {"lora_A", "lora_B"}:
                raise AdapterError(f"{source}: {path} has {sorted(pair)} but needs lora_A, lora_B")
            a, b = pair["lora_A"], pair["lora_B"]
            r = int(_pattern_value(rank_pattern, path, config.r))
            alpha = float(_pattern_value(alpha_pattern, path, config.alpha))
            in_dim, out_dim, _ = linear_dims(self._base_of(path))
            want_a, want_b = (r, in_dim), (out_dim, r)
            if tuple(a.shape) != want_a or tuple(b.shape) != want_b:
                raise AdapterError(
                    f"{source}: {path} has A {tuple(a.shape)} and B {tuple(b.shape)} but rank "
                    f"{r} on this base needs A {want_a} and B {want_b}: a different rank "
                    "or a different base model"
                )
            if not (a.is_floating_point() and b.is_floating_point()):
                raise AdapterError(f"{source}: {path} factors are not floating point")
            if not (torch.isfinite(a).all() and torch.isfinite(b).all()):
                raise AdapterError(f"{source}: {path} factors hold NaN or Inf")
            checked[path] = (
                a.to(self.device, self.dtype).contiguous(),
                b.to(self.device, self.dtype).contiguous(),
            )
            scales[path] = alpha / (math.sqrt(r) if config.use_rslora else r)
        return AdapterFactors(config=config, factors=checked, scales=scales, source=source)

    def _base_of(self, path: str) -> nn.Module:
        module = self._linears[path]
        return module.base_layer if isinstance(module, MultiLoraLinear) else module

    def _wrapped(self, path: str) -> MultiLoraLinear:
        module = self._linears[path]
        if isinstance(module, MultiLoraLinear):
            return module
        parent_path, _, child = path.rpartition(".")
        parent = self.model.get_submodule(parent_path) if parent_path else self.model
        wrapper = MultiLoraLinear(module, self.rows)
        setattr(parent, child, wrapper)
        self._linears[path] = wrapper
        return wrapper

    def add(self, adapter: AdapterFactors) -> int:
        """Install an adapter read by `read`; returns its slot (1, 2, ...)."""
        if len(self.adapters) >= self.max_adapters:
            raise AdapterError(
                f"{self.max_adapters} adapters are loaded already; unload one first or allow more"
            )
        slot = next(s for s in range(1, self.max_adapters + 1) if s not in self.adapters)
        for path, (a, b) in adapter.factors.items():
            self._wrapped(path).set_adapter(slot, a, b, adapter.scales[path])
        self.adapters[slot] = adapter
        return slot

    def remove(self, slot: int) -> None:
        """Uninstall the adapter in `slot`; its slot number may be reused by a later `add`."""
        adapter = self.adapters.pop(slot)
        for path in adapter.factors:
            self._wrapped(path).remove_adapter(slot)

    @contextmanager
    def using(self, slots: Sequence[int] | torch.Tensor) -> Iterator[None]:
        """Run forward passes whose row i uses the adapter in `slots[i]` (0: the bare base)."""
        slots = [int(s) for s in (slots.tolist() if isinstance(slots, torch.Tensor) else slots)]
        unknown = sorted(set(slots) - set(self.adapters) - {BASE_SLOT})
        if unknown:
            raise KeyError(f"no adapter in slots {unknown}")
        saved = self.rows.batch, self.rows.groups
        ranks = {slot: adapter.config.r for slot, adapter in self.adapters.items()}
        self.rows.set(slots, ranks, self.device)
        try:
            yield
        finally:
            self.rows.batch, self.rows.groups = saved

    def __call__(self, slots: Sequence[int] | torch.Tensor, **inputs):
        """The wrapped model's forward with row i using the adapter in `slots[i]`."""
        with self.using(slots):
            return self.model(**inputs)
