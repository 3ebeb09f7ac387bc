"""Adapters that lora-dist's slice LoRA exports (q and v of a fused QKV, as PEFT LoRA) read back
as their q and v slices, with every quantity equal to float64 math on the layer's own factors."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from lora_dist.adapter import lora_state_dict, save_adapter
from lora_dist.analysis.base_weights import SafetensorsWeights
from lora_dist.analysis.reports import amplification_report, spectrum_report
from lora_dist.analysis.updates import analysis_targets, read_updates
from lora_dist.inject import inject_lora
from lora_dist.lora import LoraConfig
from tests.analysis.cases import assert_row_matches, dense_spectrum, dense_table7
from tests.tiny_models import FUSED_KINDS, randomize_lora_b, tiny_fused

R, ALPHA, SEED = 2, 6.0, 4


@pytest.mark.parametrize("kind", FUSED_KINDS)
def test_exported_slices_are_found_named_and_exact(kind: str, tmp_path: Path) -> None:
    model = tiny_fused(kind)
    model.save_pretrained(tmp_path / "base")  # the bare base, before LoRA wraps its modules
    report = inject_lora(model, LoraConfig(r=R, alpha=ALPHA, targets="attn"))
    randomize_lora_b(model)
    fan_in_fan_out = any(layer.fan_in_fan_out for layer in report.layers.values())
    config = LoraConfig(r=R, alpha=ALPHA, targets="attn")
    state = lora_state_dict(model)
    save_adapter(
        tmp_path / "adapter",
        state,
        config,
        report.target_modules,
        model.config,
        "t",
        fan_in_fan_out,
    )
    adapter = read_updates(tmp_path / "adapter")
    targets = analysis_targets(adapter.updates)
    spectra = {row["name"]: row for row in spectrum_report(adapter, targets)["targets"]}
    amp = amplification_report(adapter, targets, SafetensorsWeights(tmp_path / "base"), SEED)
    amplification = {row["name"]: row for row in amp["targets"]}

    for path, layer in report.layers.items():
        # Dense float64 references from the layer's own stacked factors and its layout.
        w = layer.base_layer.weight.detach().double()
        w = w.T if layer.fan_in_fan_out else w  # out x in
        a_parts = layer.lora_A.detach().double().split(R)
        sizes = [len(layer.layout.rows[part]) for part in layer.slices]
        b_parts = layer.lora_B.detach().double().split(sizes)
        delta = torch.zeros_like(w)
        for part, a_s, b_s in zip(layer.slices, a_parts, b_parts, strict=True):
            delta[layer.layout.rows_of(part)] = layer.scaling * b_s @ a_s
        found = [t for t in targets if t.module == path and t.rows is not None]
        assert [t.slice_name for t in found] == list(layer.slices) == ["q", "v"]
        assert [t.kind for t in found] == [f"{path.rsplit('.', 1)[-1]}[{p}]" for p in "qv"]
        for t in [next(u for u in targets if u.name == path), *found]:
            rows = torch.arange(w.shape[0]) if t.rows is None else t.rows
            if t.rows is not None:
                assert t.rows.tolist() == sorted(layer.layout.rows[t.slice_name])
            want = dense_spectrum(delta[rows], t.rank)
            got = torch.tensor(spectra[t.name]["singular_values"], dtype=torch.float64)
            torch.testing.assert_close(got, want, atol=1e-6, rtol=0)
            reference = dense_table7(w[rows], delta[rows], t.rank, SEED, t.name)
            assert_row_matches(amplification[t.name], reference)
