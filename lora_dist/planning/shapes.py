"""Model shapes for `lora-dist plan` (presets or a local HF config.json) and their LoRA sizes."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

from lora_dist.errors import ConfigError, ModelError
from lora_dist.targets import TARGET_PRESETS, preset_roles

# Megatron tensor parallelism splits these by output columns (their biases split with them); the
# remaining projections (o, down, fc_out) split by input rows and keep a replicated bias.
COLUMN_PARALLEL = frozenset({"q", "k", "v", "qkv", "gate", "up", "gate_up", "fc_in"})
DTYPE_BYTES = {"fp32": 4, "bf16": 2, "fp16": 2}


@dataclass(frozen=True)
class ModelShape:
    """The dimensions of a decoder-only transformer that decide its memory and its LoRA size."""

    name: str
    layers: int
    hidden: int
    heads: int
    kv_heads: int
    head_dim: int
    intermediate: int
    vocab: int
    tied_embeddings: bool
    gated_mlp: bool
    projections: dict[str, tuple[int, int]]
    """(in, out) of each LoRA-targetable Linear in one layer. Fused attention has one "qkv"."""
    biased: frozenset[str] = frozenset()
    """Projections that carry a bias vector."""
    norms_per_layer: int = 2
    norm_bias: bool = False
    """LayerNorm (weight and bias) rather than RMSNorm (weight only)."""
    positions: int = 0
    """Rows of a learned position embedding; 0 for rotary or ALiBi models."""
    embed_dim: int = 0
    """Width of the token embedding when it differs from `hidden` (OPT-350m); 0 means hidden."""
    extra_params: int = 0
    """Small replicated tensors outside the layers: final norm, embedding norm, lm_head bias."""
    seq_len: int = 2048
    """The model's context length, used when the run does not set one."""

    @property
    def fused_qkv(self) -> bool:
        return "qkv" in self.projections

    def is_slice(self, key: str) -> bool:
        """Whether `key` is a q, k or v slice of this model's fused QKV projection."""
        return self.fused_qkv and key in ("q", "k", "v")

    def lora_dims(self, key: str) -> tuple[int, int]:
        """(in, out) of what LoRA adapts for `key`: a projection, or a q/k/v slice of a fused one.

        A slice of a fused QKV gets its own rank-r update (lora_fused.FusedSliceLora), so it
        counts as the separate projection would: q is heads x head_dim wide, k and v kv_heads x
        head_dim.
        """
        if self.is_slice(key):
            heads = self.heads if key == "q" else self.kv_heads
            return self.hidden, heads * self.head_dim
        return self.projections[key]

    def tensors(self) -> list[tuple[int, int, bool]]:
        """Every parameter tensor as (numel, how many, split by tensor parallelism)."""
        rows = [(i * o, self.layers, True) for i, o in self.projections.values()]
        rows += [
            (o, self.layers, p in COLUMN_PARALLEL)
            for p, (_, o) in self.projections.items()
            if p in self.biased
        ]
        rows.append((self.hidden, self.layers * self.norms_per_layer * (1 + self.norm_bias), False))
        embed = self.embed_dim or self.hidden
        rows.append((self.vocab * embed, 1 if self.tied_embeddings else 2, True))  # vocab-parallel
        if embed != self.hidden:  # project_in and project_out
            rows.append((embed * self.hidden, 2, False))
        if self.positions:
            rows.append((self.positions * self.hidden, 1, False))
        if self.extra_params:
            rows.append((self.extra_params, 1, False))
        return rows

    @property
    def param_count(self) -> int:
        return sum(n * count for n, count, _ in self.tensors())


def _get(cfg: dict[str, Any], *keys: str, default: Any = None) -> Any:
    for key in keys:
        if cfg.get(key) is not None:
            return cfg[key]
    if default is None:
        raise ModelError(f"config.json has none of the fields {', '.join(keys)}")
    return default


def _llama(cfg: dict[str, Any]) -> dict[str, Any]:
    """LLaMA, Mistral, Qwen2: separate q/k/v/o, gated SiLU MLP, RMSNorm, rotary."""
    h, a = cfg["hidden_size"], cfg["num_attention_heads"]
    kv = _get(cfg, "num_key_value_heads", default=a)
    hd, i = _get(cfg, "head_dim", default=h // a), cfg["intermediate_size"]
    proj = {"q": (h, a * hd), "k": (h, kv * hd), "v": (h, kv * hd), "o": (a * hd, h)}
    proj |= {"gate": (h, i), "up": (h, i), "down": (i, h)}
    biased = {"q", "k", "v"} if cfg.get("model_type") == "qwen2" else set()
    biased |= {"q", "k", "v", "o"} if cfg.get("attention_bias") else set()
    biased |= {"gate", "up", "down"} if cfg.get("mlp_bias") else set()
    return dict(
        heads=a,
        kv_heads=kv,
        head_dim=hd,
        intermediate=i,
        gated_mlp=True,
        projections=proj,
        biased=frozenset(biased),
        extra_params=h,
        tied_embeddings=cfg.get("tie_word_embeddings", False),
        seq_len=_get(cfg, "max_position_embeddings", default=4096),
    )


def _phi3(cfg: dict[str, Any]) -> dict[str, Any]:
    """Phi-3: LLaMA's layer with q, k, v fused into qkv_proj and gate, up into gate_up_proj."""
    fields = _llama(cfg)
    h, a, kv, hd, i = (cfg["hidden_size"], fields["heads"], fields["kv_heads"],
                       fields["head_dim"], fields["intermediate"])  # fmt: skip
    proj = {"qkv": (h, (a + 2 * kv) * hd), "o": (a * hd, h), "gate_up": (h, 2 * i), "down": (i, h)}
    return fields | dict(projections=proj, biased=frozenset())


def _plain(h: int, a: int, kv: int, i: int, fused: bool, **rest: Any) -> dict[str, Any]:
    """A GELU MLP with fc_in/fc_out and attention either fused (qkv) or separate."""
    hd = h // a
    attn = {"qkv": (h, (a + 2 * kv) * hd)} if fused else {"q": (h, h), "k": (h, h), "v": (h, h)}
    proj = attn | {"o": (h, h), "fc_in": (h, i), "fc_out": (i, h)}
    return dict(
        heads=a,
        kv_heads=kv,
        head_dim=hd,
        intermediate=i,
        gated_mlp=False,
        projections=proj,
        norm_bias=True,
        **rest,
    )


def _gpt2(cfg: dict[str, Any]) -> dict[str, Any]:
    h, a = cfg["n_embd"], cfg["n_head"]
    return _plain(
        h,
        a,
        a,
        _get(cfg, "n_inner", default=4 * h),
        True,
        biased=frozenset({"qkv", "o", "fc_in", "fc_out"}),
        positions=cfg["n_positions"],
        extra_params=2 * h,
        tied_embeddings=cfg.get("tie_word_embeddings", True),
        seq_len=cfg["n_positions"],
    )


def _neox(cfg: dict[str, Any]) -> dict[str, Any]:
    h, a = cfg["hidden_size"], cfg["num_attention_heads"]
    bias = {"qkv", "o"} if cfg.get("attention_bias", True) else set()
    return _plain(
        h,
        a,
        a,
        cfg["intermediate_size"],
        True,
        biased=frozenset(bias | {"fc_in", "fc_out"}),
        extra_params=2 * h,
        tied_embeddings=cfg.get("tie_word_embeddings", False),
        seq_len=_get(cfg, "max_position_embeddings", default=2048),
    )


def _opt(cfg: dict[str, Any], position_offset: int = 2) -> dict[str, Any]:
    """OPT (and GPT-3, which OPT copies): separate q/k/v/o and fc1/fc2, all biased, learned pos."""
    h, a = cfg["hidden_size"], cfg["num_attention_heads"]
    seq = cfg["max_position_embeddings"]
    final_norm = cfg.get("do_layer_norm_before", True) and not cfg.get("_remove_final_layer_norm")
    biased = {"q", "k", "v", "o", "fc_in", "fc_out"} if cfg.get("enable_bias", True) else set()
    return _plain(
        h,
        a,
        a,
        cfg["ffn_dim"],
        False,
        biased=frozenset(biased),
        positions=seq + position_offset,
        extra_params=2 * h if final_norm else 0,
        embed_dim=_get(cfg, "word_embed_proj_dim", default=h),
        tied_embeddings=cfg.get("tie_word_embeddings", True),
        seq_len=seq,
    )


def _falcon(cfg: dict[str, Any]) -> dict[str, Any]:
    h, a = cfg["hidden_size"], _get(cfg, "num_attention_heads", "n_head")
    new, parallel = cfg.get("new_decoder_architecture"), cfg.get("parallel_attn", True)
    if new:
        kv = _get(cfg, "num_kv_heads", "n_head_kv", default=a)
    else:
        kv = 1 if cfg.get("multi_query", True) else a
    # Falcon's decoder layer: two norms unless attention runs in parallel with one shared norm.
    norms = _get(cfg, "num_ln_in_parallel_attn", default=2 if new else 1) if parallel else 2
    bias = frozenset({"qkv", "o", "fc_in", "fc_out"}) if cfg.get("bias") else frozenset()
    return _plain(
        h,
        a,
        kv,
        _get(cfg, "ffn_hidden_size", default=4 * h),
        True,
        biased=bias,
        norms_per_layer=norms,
        extra_params=2 * h,
        tied_embeddings=cfg.get("tie_word_embeddings", True),
        seq_len=_get(cfg, "max_position_embeddings", default=2048),
    )


def _bloom(cfg: dict[str, Any]) -> dict[str, Any]:
    h, a = _get(cfg, "hidden_size", "n_embed"), _get(cfg, "n_head", "num_attention_heads")
    return _plain(
        h,
        a,
        a,
        4 * h,
        True,
        biased=frozenset({"qkv", "o", "fc_in", "fc_out"}),
        extra_params=4 * h,  # word_embeddings_layernorm and ln_f
        tied_embeddings=cfg.get("tie_word_embeddings", True),
        seq_len=_get(cfg, "seq_length", default=2048),
    )


def _gptj(cfg: dict[str, Any]) -> dict[str, Any]:
    h, a, tied = cfg["n_embd"], cfg["n_head"], cfg.get("tie_word_embeddings", False)
    return _plain(
        h,
        a,
        a,
        _get(cfg, "n_inner", default=4 * h),
        False,
        biased=frozenset({"fc_in", "fc_out"}),
        norms_per_layer=1,
        extra_params=2 * h + (0 if tied else cfg["vocab_size"]),  # ln_f, lm_head bias
        tied_embeddings=tied,
        seq_len=cfg["n_positions"],
    )


FAMILIES: dict[str, Callable[[dict[str, Any]], dict[str, Any]]] = {
    "llama": _llama,
    "mistral": _llama,
    "qwen2": _llama,
    "gpt2": _gpt2,
    "gpt_neox": _neox,
    "opt": _opt,
    "gpt3": lambda cfg: _opt(cfg, position_offset=0),
    "phi3": _phi3,
    "falcon": _falcon,
    "RefinedWeb": _falcon,
    "RefinedWebModel": _falcon,
    "bloom": _bloom,
    "gptj": _gptj,
}


def shape_from_hf_config(cfg: dict[str, Any], name: str = "model") -> ModelShape:
    """Read a Hugging Face config dict. Fused-QKV families get one "qkv" projection."""
    family = cfg.get("model_type")
    if family not in FAMILIES:
        raise ModelError(
            f"{name}: model_type {family!r} is not supported; supported: "
            f"{', '.join(sorted(FAMILIES))}"
        )
    try:
        fields = FAMILIES[family](cfg)
        layers = _get(cfg, "num_hidden_layers", "n_layer", "num_layers")
        hidden = _get(cfg, "hidden_size", "n_embd", "n_embed", "d_model")
        return ModelShape(
            name=name, layers=layers, hidden=hidden, vocab=cfg["vocab_size"], **fields
        )
    except KeyError as missing:
        raise ModelError(f"{name}: config.json for {family} lacks the field {missing}") from None


def resolve_targets(shape: ModelShape, targets: str | Sequence[str]) -> tuple[str, ...]:
    """Projection keys of `shape` that a target spec adapts.

    A preset (lora_dist.targets, the trainer's table) or a comma list of projection roles. On a
    fused-QKV model q, k and v stay keys of their own: slices of the fused projection, as the
    trainer adapts them. "qkv" adapts the whole fused map (PEFT's way).
    """
    if isinstance(targets, str) and targets in TARGET_PRESETS:
        return preset_roles(targets, shape.projections)
    names = [t.strip() for t in targets.split(",")] if isinstance(targets, str) else targets
    keys: list[str] = []
    for name in names:
        key = name
        if key not in shape.projections and not shape.is_slice(key):
            raise ConfigError(
                f"target {name!r} is not a projection of {shape.name}; use "
                f"{', '.join(TARGET_PRESETS)} or a comma list of "
                f"{', '.join(shape.projections)}"
            )
        if key not in keys:
            keys.append(key)
    return tuple(keys)


def lora_param_count(shape: ModelShape, r: int, targets: str | Sequence[str]) -> int:
    """Trainable LoRA parameters: r * (d_in + d_out) per adapted Linear or slice per layer."""
    keys = resolve_targets(shape, targets)
    return shape.layers * sum(r * sum(shape.lora_dims(k)) for k in keys)


def adapter_bytes(shape: ModelShape, r: int, targets: str | Sequence[str], dtype: str) -> int:
    """Size of the saved adapter tensors (file headers aside).

    Slices of a fused QKV are saved in PEFT's form, one rank-(n·r) LoRA on the whole fused map
    whose B is zero outside the slices' rows, so the file holds r·n·(in + fused out) per layer.
    """
    keys = resolve_targets(shape, targets)
    slices = [k for k in keys if shape.is_slice(k)]
    n = lora_param_count(shape, r, [k for k in keys if k not in slices])
    n += shape.layers * r * len(slices) * sum(shape.projections["qkv"]) if slices else 0
    return n * DTYPE_BYTES[dtype]
