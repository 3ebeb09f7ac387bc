"""Which projections LoRA adapts: the target presets, one table for the trainer and the planner.

A decoder layer's linear maps are named here by role: q, k, v, o for attention (qkv where one
fused map holds all three), and gate, up, down (gate_up where fused) or fc_in, fc_out for the
MLP. A preset lists roles; `PROJECTION_NAMES` says what each role's module is called in each
architecture. Fused-QKV architectures (GPT-2, GPT-NeoX, Falcon, BLOOM, Phi-3) have no separate
q, k and v maps: their roles become slices of the fused one, 'c_attn[q,v]', each slice with its
own rank-r update (lora_dist.lora_fused), as the LoRA paper adapted W_q and W_v of GPT-3.
"""

from __future__ import annotations

from collections.abc import Iterable

from lora_dist.errors import ConfigError

TARGET_PRESETS: dict[str, tuple[str, ...]] = {
    "attn": ("q", "v"),  # the paper's choice (Hu et al. 2021, Sec. 7.1)
    "attn-all": ("q", "k", "v", "o"),
    "all": ("q", "k", "v", "o", "gate", "up", "gate_up", "down", "fc_in", "fc_out"),
}
"""Preset name -> roles, in the order their modules are listed."""

PRESET_NAMES = (*TARGET_PRESETS, "all-linear")
"""What `--lora_targets` accepts besides module names and 're:<regex>'."""

_LLAMA = {"q": "q_proj", "k": "k_proj", "v": "v_proj", "o": "o_proj"}
_LLAMA |= {"gate": "gate_proj", "up": "up_proj", "down": "down_proj"}
_FUSED = {
    "qkv": "query_key_value",
    "o": "dense",
    "fc_in": "dense_h_to_4h",
    "fc_out": "dense_4h_to_h",
}
_OPT = {
    "q": "q_proj",
    "k": "k_proj",
    "v": "v_proj",
    "o": "out_proj",
    "fc_in": "fc1",
    "fc_out": "fc2",
}
PROJECTION_NAMES: dict[str, dict[str, str]] = {
    "llama": _LLAMA,
    "mistral": _LLAMA,
    "qwen2": _LLAMA,
    "gpt2": {"qkv": "c_attn", "o": "attn.c_proj", "fc_in": "mlp.c_fc", "fc_out": "mlp.c_proj"},
    "gpt_neox": _FUSED,
    "falcon": _FUSED,
    "bloom": _FUSED,
    "phi3": {"qkv": "qkv_proj", "o": "o_proj", "gate_up": "gate_up_proj", "down": "down_proj"},
    "opt": _OPT,
    "gptj": _OPT | {"fc_in": "fc_in", "fc_out": "fc_out"},
}
"""model_type -> role -> module-name suffix, for every architecture with presets."""


def preset_roles(preset: str, available: Iterable[str]) -> tuple[str, ...]:
    """The roles of `preset` that a model with projections `available` has.

    q, k and v stay roles on a fused-QKV model ("qkv" in `available`): slices of the fused map.
    "all" names both MLP namings; only the ones the model has are kept.
    """
    have = set(available)
    if "qkv" in have:
        have |= {"q", "k", "v"}
    return tuple(role for role in TARGET_PRESETS[preset] if role in have)


def preset_modules(preset: str, model_type: str | None) -> list[str]:
    """Module-name suffixes that `preset` adapts in an architecture, e.g. attn -> q_proj, v_proj."""
    if model_type not in PROJECTION_NAMES:
        raise ConfigError(
            f"no target preset for model_type {model_type!r} (presets exist for "
            f"{sorted(PROJECTION_NAMES)}); pass module-name suffixes such as 'q_proj,v_proj', "
            "a 're:<regex>', or 'all-linear'"
        )
    names = PROJECTION_NAMES[model_type]
    roles = preset_roles(preset, names)
    slices = tuple(r for r in roles if r in ("q", "k", "v") and "qkv" in names)
    modules = []
    for role in roles:
        if role not in slices:
            modules.append(names[role])
        elif role == slices[0]:  # one slice target for all of the fused map's slices
            modules.append(f"{names['qkv']}[{','.join(slices)}]")
    return modules
