"""`lora-dist analyze spectrum|similarity|amplification` end to end: files, figures, errors."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from lora_dist.cli import main
from tests.analysis.cases import dense_spectrum, write_adapter
from tests.tiny_models import tiny_llama

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


@pytest.fixture(scope="module")
def case(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """A tiny LLaMA base (2 layers) and q,v adapters at r=4 and r=8 on it."""
    tmp = tmp_path_factory.mktemp("analyze")
    tiny_llama().save_pretrained(tmp / "base")
    paths = {"base": tmp / "base"}
    g = torch.Generator().manual_seed(0)
    for r in (4, 8):
        factors = {
            f"model.layers.{i}.self_attn.{p}": (
                torch.randn(r, 32, generator=g),
                torch.randn(out, r, generator=g),
            )
            for i in range(2)
            for p, out in (("q_proj", 32), ("v_proj", 16))
        }
        paths[f"r{r}"] = write_adapter(
            tmp / f"r{r}" / "adapter",
            factors,
            r=r,
            lora_alpha=16,
            base_model_name_or_path=str(tmp / "base") if r == 8 else "org/hub-model",
        )
        paths[f"factors{r}"] = factors
    return paths


def is_png(path: Path) -> bool:
    return path.is_file() and path.read_bytes()[:8] == PNG_MAGIC and path.stat().st_size > 2000


def test_spectrum_writes_json_and_figures(case: dict, tmp_path: Path, capsys) -> None:
    # A run directory works as well as the adapter directory inside it.
    assert main(["analyze", "spectrum", str(case["r4"].parent), "--output_dir", str(tmp_path)]) == 0
    report = json.loads((tmp_path / "spectrum.json").read_text())
    assert is_png(tmp_path / "delta_norm_by_layer.png") and is_png(tmp_path / "spectrum.png")
    for row in report["targets"]:
        a, b = case["factors4"][row["name"]]
        want = dense_spectrum(4.0 * b.double() @ a.double(), 4)  # alpha 16 / r 4
        got = torch.tensor(row["singular_values"], dtype=torch.float64)
        torch.testing.assert_close(got, want, atol=1e-6, rtol=0)
    assert "model.layers.1.self_attn.v_proj" in capsys.readouterr().out  # the printed table


def test_similarity_and_amplification(case: dict, tmp_path: Path, capsys) -> None:
    args = ["analyze", "similarity", str(case["r4"]), str(case["r8"]), "--output_dir"]
    assert main([*args, str(tmp_path), "--layers", "0", "--layers", "1"]) == 0
    report = json.loads((tmp_path / "similarity.json").read_text())
    assert len(report["targets"]) == 4
    assert all(len(row["phi"]) == 4 and len(row["phi"][0]) == 8 for row in report["targets"])
    for name in ("similarity_by_layer", "similarity_layer0", "similarity_layer1"):
        assert is_png(tmp_path / f"{name}.png"), name

    out = tmp_path / "amp"
    cmd = ["analyze", "amplification", str(case["r8"])]  # the base the adapter names
    assert main([*cmd, "--output_dir", str(out), "--modules", "q_proj", "--top", "2"]) == 0
    report = json.loads((out / "amplification.json").read_text())
    assert [row["name"] for row in report["targets"]] == [
        "model.layers.0.self_attn.q_proj",
        "model.layers.1.self_attn.q_proj",
    ]
    assert all(row["k"] == 2 and row["amplification"] > 0 for row in report["targets"])
    assert is_png(out / "amplification_by_layer.png")
    capsys.readouterr()

    # --json prints the report as the whole of stdout; without it, a table.
    argv = ["analyze", "spectrum", str(case["r8"]), "--modules", "layers\\.0\\."]
    assert main([*argv, "--json"]) == 0
    printed = json.loads(capsys.readouterr().out)
    assert {row["layer"] for row in printed["targets"]} == {0}
    assert main(argv) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[0].split()[:2] == ["target", "rank"] and len(lines) == 3


def test_mistakes_are_one_line_exit_2(case: dict, tmp_path: Path, capsys) -> None:
    cases = [
        ["analyze", "spectrum", str(tmp_path / "missing")],
        ["analyze", "similarity", str(case["r4"]), str(case["r8"]), "--layers", "7",
         "--output_dir", str(tmp_path)],
        ["analyze", "amplification", str(case["r4"]), "--base", str(tmp_path)],
        ["analyze", "amplification", str(case["r4"])],  # names a hub id as its base
        ["analyze", "amplification", str(case["r4"]), "--model", str(case["base"]), "--top", "0"],
        ["analyze", "spectrum", str(case["r4"]), "--modules", "no_such_module"],
    ]  # fmt: skip
    for argv in cases:
        assert main(argv) == 2, argv
        err = capsys.readouterr().err.strip()
        assert err.startswith("lora-dist analyze ") and "\n" not in err, err
