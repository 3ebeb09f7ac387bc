"""The spectrum, similarity and amplification reports on adapters and bases on disk, against
explicit float64 ΔW and W: PEFT's own adapters (Conv1D, rank/alpha patterns, rsLoRA), a
hand-built fused-slice adapter, and a base split over several safetensors shards."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from lora_dist.analysis.base_weights import SafetensorsWeights
from lora_dist.analysis.reports import amplification_report, similarity_report, spectrum_report
from lora_dist.analysis.updates import LowRankUpdate, analysis_targets, read_updates, row_slices
from lora_dist.errors import AdapterError, ModelError
from tests.analysis.cases import (
    assert_row_matches,
    dense_spectrum,
    dense_table7,
    write_adapter,
    write_base,
)
from tests.tiny_models import tiny_gpt2, tiny_llama

TOL = 1e-6
SEED = 3


def randn(*shape: int, g: torch.Generator) -> torch.Tensor:
    return torch.randn(*shape, generator=g)


def peft_adapter(tmp: Path, family: str):
    """A PEFT-made adapter with random non-zero factors, the base it was made on, and PEFT's
    own ΔW (out x in) and W (out x in) per module as the dense reference."""
    from peft import LoraConfig, get_peft_model

    if family == "gpt2":  # Conv1D: W stored in x out, fan_in_fan_out; rank and alpha patterns
        model = tiny_gpt2()
        cfg = LoraConfig(
            r=4,
            lora_alpha=8,
            target_modules=["c_attn", "c_proj"],
            fan_in_fan_out=True,
            rank_pattern={"h.1.attn.c_attn": 6},
            alpha_pattern={"mlp.c_proj": 3.0},
        )
    else:  # nn.Linear, rsLoRA scale alpha/sqrt(r)
        model = tiny_llama()
        cfg = LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], use_rslora=True)
    base = tmp / f"{family}-base"
    model.save_pretrained(base)
    peft_model = get_peft_model(model, cfg)
    g = torch.Generator().manual_seed(11)
    with torch.no_grad():
        for name, p in sorted(peft_model.named_parameters()):
            if "lora_" in name:
                p.copy_(randn(*p.shape, g=g) * 0.3)
    peft_model.save_pretrained(tmp / f"{family}-adapter")
    reference = {}
    for name, module in peft_model.base_model.model.named_modules():
        if hasattr(module, "get_delta_weight") and hasattr(module, "lora_A"):
            # float64 from PEFT's own factors and scale; PEFT's float32 ΔW fixes the layout.
            a, b = module.lora_A["default"].weight.double(), module.lora_B["default"].weight
            delta = module.scaling["default"] * b.detach().double() @ a.detach()
            w = module.base_layer.weight.detach().double()
            peft_delta = module.get_delta_weight("default").detach().double()
            if cfg.fan_in_fan_out:
                peft_delta, w = peft_delta.T, w.T
            torch.testing.assert_close(peft_delta, delta, atol=1e-5, rtol=1e-5)
            reference[name] = (delta, w, module.r["default"])
    return tmp / f"{family}-adapter", base, reference


@pytest.mark.parametrize("family", ["gpt2", "llama"])
def test_peft_adapters_equal_dense_reference(tmp_path: Path, family: str) -> None:
    adapter_dir, base_dir, reference = peft_adapter(tmp_path, family)
    adapter = read_updates(adapter_dir)
    targets = analysis_targets(adapter.updates)
    assert {t.name for t in targets} == set(reference)
    if family == "gpt2":
        assert {t.name: t.rank for t in targets}["transformer.h.1.attn.c_attn"] == 6
    spectrum = spectrum_report(adapter, targets)
    for row in spectrum["targets"]:
        delta, _, rank = reference[row["name"]]
        want = dense_spectrum(delta, rank)
        torch.testing.assert_close(
            torch.tensor(row["singular_values"], dtype=torch.float64), want, atol=TOL, rtol=0
        )
        assert row["frobenius_norm"] == pytest.approx(float(delta.norm()), abs=TOL)
    amp = amplification_report(adapter, targets, SafetensorsWeights(base_dir), seed=SEED)
    for row in amp["targets"]:
        delta, w, rank = reference[row["name"]]
        assert row["base_transposed"] == (family == "gpt2")
        assert row["w_top_converged"]
        assert_row_matches(row, dense_table7(w, delta, rank, SEED, row["name"]))


def fused_slice_case(tmp: Path, gen_seed: int = 0):
    """GPT-2 with LoRA on only the q and v slices of its fused c_attn, exported as PEFT LoRA:
    A' = [A_q; A_v] (2r x in); B' zero but for B_q in the q rows of its first r columns and B_v
    in the v rows of its last r columns; alpha_pattern keeps alpha'/(2r) = alpha/r. attn.c_proj
    carries an ordinary r=4 update."""
    model = tiny_gpt2()
    hidden, r, alpha = 32, 4, 8.0
    base = tmp / "gpt2-base"
    model.save_pretrained(base)
    g = torch.Generator().manual_seed(gen_seed)
    parts = {"q": slice(0, hidden), "v": slice(2 * hidden, 3 * hidden)}
    factors, slices = {}, {}
    for layer in range(2):
        a_q, a_v = randn(r, hidden, g=g), randn(r, hidden, g=g)
        b_q, b_v = randn(hidden, r, g=g), randn(hidden, r, g=g)
        b = torch.zeros(3 * hidden, 2 * r)
        b[parts["q"], :r], b[parts["v"], r:] = b_q, b_v
        module = f"transformer.h.{layer}.attn.c_attn"
        factors[module] = (torch.cat([a_q, a_v]), b)
        slices[module] = {"q": (a_q, b_q), "v": (a_v, b_v)}
        factors[f"transformer.h.{layer}.attn.c_proj"] = (
            randn(r, hidden, g=g),
            randn(hidden, r, g=g),
        )
    adapter = write_adapter(
        tmp / "fused-adapter",
        factors,
        r=r,
        lora_alpha=alpha,
        fan_in_fan_out=True,
        rank_pattern={"c_attn": 2 * r},
        alpha_pattern={"c_attn": 2 * alpha},
    )
    stored = {k: v.detach() for k, v in model.state_dict().items()}
    return adapter, base, factors, slices, parts, stored, alpha / r


def test_fused_slice_adapter_per_slice_and_whole(tmp_path: Path) -> None:
    adapter_dir, base_dir, factors, slices, parts, stored, scale = fused_slice_case(tmp_path)
    adapter = read_updates(adapter_dir)
    targets = analysis_targets(adapter.updates)
    by_name = {t.name: t for t in targets}
    module = "transformer.h.0.attn.c_attn"
    assert f"{module}[0:32]" in by_name and f"{module}[64:96]" in by_name
    assert [t.kind for t in targets if t.module == module] == ["c_attn", "c_attn[0]", "c_attn[1]"]
    assert not row_slices(by_name["transformer.h.0.attn.c_proj"])  # a dense B is one block

    # Dense references: ΔW and W of the whole fused map, and of the q and v rows alone.
    reference = {}
    for name in (f"transformer.h.{i}.attn.c_attn" for i in range(2)):
        a, b = factors[name]
        w = stored[f"{name}.weight"].double().T  # Conv1D stores in x out
        reference[name] = (scale * b.double() @ a.double(), w, 8)
        for index, part in enumerate(("q", "v")):
            a_s, b_s = slices[name][part]
            rows = parts[part]
            sliced = f"{name}[{rows.start}:{rows.stop}]"
            reference[sliced] = (scale * b_s.double() @ a_s.double(), w[rows], 4)
            assert by_name[sliced].slice_index == index
    for name in (f"transformer.h.{i}.attn.c_proj" for i in range(2)):
        a, b = factors[name]
        w = stored[f"{name}.weight"].double().T
        reference[name] = (scale * b.double() @ a.double(), w, 4)
    assert set(reference) == set(by_name)

    for row in spectrum_report(adapter, targets)["targets"]:
        delta, _, rank = reference[row["name"]]
        assert row["rank"] == rank
        torch.testing.assert_close(
            torch.tensor(row["singular_values"], dtype=torch.float64),
            dense_spectrum(delta, rank),
            atol=TOL,
            rtol=0,
        )
    amp = amplification_report(adapter, targets, SafetensorsWeights(base_dir), seed=SEED)
    for row in amp["targets"]:
        delta, w, rank = reference[row["name"]]
        assert_row_matches(row, dense_table7(w, delta, rank, SEED, row["name"]))


def test_fused_slice_adapter_means_the_same_to_peft(tmp_path: Path) -> None:
    """The hand-built export is what PEFT computes: its ΔW's q and v rows are s·B_q·A_q and
    s·B_v·A_v, its k rows zero. (So the slices above are the right references.)"""
    from peft import PeftModel

    adapter_dir, _, _, slices, parts, _, scale = fused_slice_case(tmp_path)
    model = PeftModel.from_pretrained(tiny_gpt2(), str(adapter_dir))
    layer = model.base_model.model.transformer.h[0].attn.c_attn
    delta = layer.get_delta_weight("default").detach().double().T  # out x in
    for part in ("q", "v"):
        a_s, b_s = slices["transformer.h.0.attn.c_attn"][part]
        want = scale * b_s.double() @ a_s.double()
        torch.testing.assert_close(delta[parts[part]], want, atol=1e-5, rtol=1e-5)
    assert delta[32:64].abs().max() == 0


def test_similarity_matches_per_slice(tmp_path: Path) -> None:
    first = read_updates(fused_slice_case(tmp_path / "one", gen_seed=0)[0])
    second = read_updates(fused_slice_case(tmp_path / "two", gen_seed=1)[0])
    report = similarity_report(
        first, analysis_targets(first.updates), second, analysis_targets(second.updates)
    )
    rows = {row["name"]: row for row in report["targets"]}
    assert len(rows) == 8 and not report["only_in_1"] and not report["only_in_2"]
    sliced = rows["transformer.h.1.attn.c_attn[64:96]"]
    a1 = next(t for t in analysis_targets(first.updates) if t.name == sliced["name"]).a
    a2 = next(t for t in analysis_targets(second.updates) if t.name == sliced["name"]).a
    v1 = torch.linalg.svd(a1, full_matrices=False).Vh
    v2 = torch.linalg.svd(a2, full_matrices=False).Vh
    for i, j in ((1, 1), (2, 3), (4, 4)):
        want = float(torch.linalg.matrix_norm(v1[:i] @ v2[:j].T) ** 2 / min(i, j))
        assert sliced["phi"][i - 1][j - 1] == pytest.approx(want, abs=TOL)
    # factor B: the left-singular vectors of B instead, directions in the output space.
    t1, t2 = analysis_targets(first.updates), analysis_targets(second.updates)
    by_b = {r["name"]: r for r in similarity_report(first, t1, second, t2, factor="B")["targets"]}
    b1 = next(t for t in t1 if t.name == sliced["name"]).b
    b2 = next(t for t in t2 if t.name == sliced["name"]).b
    u1, u2 = torch.linalg.svd(b1).U, torch.linalg.svd(b2).U
    want = float(torch.linalg.matrix_norm(u1[:, :2].T @ u2[:, :3]) ** 2 / 2)
    assert by_b[sliced["name"]]["phi"][1][2] == pytest.approx(want, abs=TOL)
    assert by_b[sliced["name"]]["dim"] == 32
    # An adapter against itself: every φ is 1, whole modules and slices alike.
    targets = analysis_targets(first.updates)
    for row in similarity_report(first, targets, first, targets)["targets"]:
        n = row["rank_1"]
        torch.testing.assert_close(
            torch.tensor(row["phi"], dtype=torch.float64), torch.ones(n, n).double()
        )


def test_interleaved_rows_are_found_as_slices() -> None:
    """BLOOM/GPT-NeoX order the fused rows (heads, 3, head_dim): q and v rows interleave."""
    heads, head_dim, hidden, r = 4, 2, 8, 2
    out = heads * 3 * head_dim
    q_rows = torch.tensor([h * 3 * head_dim + d for h in range(heads) for d in range(head_dim)])
    v_rows = q_rows + 2 * head_dim
    g = torch.Generator().manual_seed(0)
    a = randn(2 * r, hidden, g=g).double()
    b = torch.zeros(out, 2 * r, dtype=torch.float64)
    b[q_rows, :r] = randn(len(q_rows), r, g=g).double()
    b[v_rows, r:] = randn(len(v_rows), r, g=g).double()
    whole = LowRankUpdate("h.0.self_attention.query_key_value", a, b, 0.5, out, False)
    found = row_slices(whole)
    assert [s.rows.tolist() for s in found] == [q_rows.tolist(), v_rows.tolist()]
    assert len({s.name for s in found}) == 2
    delta = 0.5 * b @ a
    for s in found:
        torch.testing.assert_close(s.scale * s.b @ s.a, delta[s.rows], atol=1e-12, rtol=0)
    zero = LowRankUpdate("m", a, torch.zeros_like(b), 1.0, out, False)
    assert row_slices(zero) == []


def test_sharded_base_gives_the_same_answer_as_one_file(tmp_path: Path) -> None:
    model = tiny_llama()
    tensors = {k: v.detach().to(torch.bfloat16) for k, v in model.state_dict().items()}
    one = write_base(tmp_path / "one", tensors)
    sharded = write_base(tmp_path / "sharded", tensors, shards=3)
    g = torch.Generator().manual_seed(5)
    factors = {
        f"model.layers.{i}.self_attn.{p}": (randn(4, 32, g=g), randn(w_out, 4, g=g))
        for i in range(2)
        for p, w_out in (("q_proj", 32), ("v_proj", 16))
    }
    adapter = read_updates(write_adapter(tmp_path / "adapter", factors))
    targets = analysis_targets(adapter.updates)
    base_sharded = SafetensorsWeights(sharded)
    assert len(base_sharded.files) == 3
    files_read = {base_sharded.locations[base_sharded.tensor_name(t.module)].file for t in targets}
    assert len(files_read) > 1  # the adapted weights really are spread over shards
    from_shards = amplification_report(adapter, targets, base_sharded, seed=SEED)
    from_one = amplification_report(adapter, targets, SafetensorsWeights(one), seed=SEED)
    assert from_shards["targets"] == from_one["targets"]
    for row in from_shards["targets"]:
        a, b = factors[row["module"]]
        w = tensors[f"{row['module']}.weight"].double()
        delta = 2.0 * b.double() @ a.double()  # alpha 8 / r 4
        assert_row_matches(row, dense_table7(w, delta, 4, SEED, row["name"]))


def test_random_projection_matches_its_expectation(tmp_path: Path) -> None:
    """E||UᵀWV||_F² = (k/m)(k/n)||W||_F² for random U, V: the mean over 300 seeds, within 5 SE."""
    g = torch.Generator().manual_seed(8)
    w = randn(24, 16, g=g)
    base = SafetensorsWeights(write_base(tmp_path / "base", {"m.weight": w}))
    adapter = read_updates(
        write_adapter(tmp_path / "a", {"m": (randn(3, 16, g=g), randn(24, 3, g=g))}, r=3)
    )
    squares = torch.tensor(
        [
            amplification_report(adapter, adapter.updates, base, seed=s, max_iters=1)["targets"][0][
                "projection"
            ]["random"]
            ** 2
            for s in range(300)
        ],
        dtype=torch.float64,
    )
    expected = (3 / 24) * (3 / 16) * float(w.double().norm()) ** 2
    assert abs(float(squares.mean()) - expected) < 5 * float(squares.std()) / 300**0.5


def test_bad_inputs_say_what_to_change(tmp_path: Path) -> None:
    g = torch.Generator().manual_seed(0)
    factors = {"model.layers.0.self_attn.q_proj": (randn(4, 32, g=g), randn(32, 4, g=g))}
    wrong_rank = write_adapter(tmp_path / "wrong", factors, r=8)
    with pytest.raises(AdapterError, match="rank 8"):
        read_updates(wrong_rank)
    with pytest.raises(AdapterError, match="DoRA"):
        read_updates(write_adapter(tmp_path / "dora", factors, use_dora=True))
    with pytest.raises(AdapterError, match="adapter_config.json"):
        read_updates(tmp_path / "nothing")
    other = write_base(
        tmp_path / "other", {"model.layers.0.mlp.up_proj.weight": torch.zeros(8, 32)}
    )
    adapter = read_updates(write_adapter(tmp_path / "ok", factors))
    with pytest.raises(ModelError, match="trained on"):
        amplification_report(adapter, adapter.updates, SafetensorsWeights(other))
    with pytest.raises(ModelError, match="safetensors"):
        SafetensorsWeights(tmp_path / "ok")
