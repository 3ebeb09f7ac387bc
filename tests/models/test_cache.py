"""The model cache: one build whichever process does it, verified on every use, rebuilt if bad."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
from safetensors.torch import load_file

from lora_dist.models import resolve_model_dir
from lora_dist.models.cache import cache_root, problems_with
from tests.runs import free_port

REPO = Path(__file__).resolve().parents[2]
BUILD_LINE = "lora-dist: building"


RESOLVE_ALL = """
import sys
from lora_dist.models import resolve_model_dir
for cache in sys.argv[1:]:
    print("DIR", resolve_model_dir("tiny", cache))
"""


def _python(code: str, *args: str) -> subprocess.Popen:
    return subprocess.Popen(
        [sys.executable, "-c", code, *args],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env={**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"},
    )


def _finish(procs: list[subprocess.Popen]) -> list[tuple[str, str]]:
    outs = [p.communicate(timeout=300) for p in procs]
    for p, (_, err) in zip(procs, outs, strict=True):
        assert p.returncode == 0, err[-3000:]
    return outs


@pytest.fixture(scope="module")
def built(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return resolve_model_dir("tiny", tmp_path_factory.mktemp("cache"))


def test_second_use_reuses_the_directory(built: Path) -> None:
    before = (built / "model.safetensors").stat().st_mtime_ns
    ((_, err),) = _finish([_python(RESOLVE_ALL, str(built.parent))])
    assert BUILD_LINE not in err
    assert (built / "model.safetensors").stat().st_mtime_ns == before
    assert problems_with(built) == []


def test_cache_root_precedence(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("LORA_DIST_CACHE", str(tmp_path / "env"))
    assert cache_root(tmp_path / "arg") == tmp_path / "arg"
    assert cache_root() == tmp_path / "env"
    monkeypatch.delenv("LORA_DIST_CACHE")
    assert cache_root() == Path.home() / ".cache" / "lora_dist"


def test_concurrent_callers_get_one_complete_build(tmp_path: Path) -> None:
    """Two processes race on an empty cache: one builds, both get the same complete directory."""
    outs = _finish([_python(RESOLVE_ALL, str(tmp_path)), _python(RESOLVE_ALL, str(tmp_path))])
    dirs = {line for out, _ in outs for line in out.splitlines() if line.startswith("DIR")}
    assert len(dirs) == 1
    assert sum(err.count(BUILD_LINE) for _, err in outs) == 1
    built = [p for p in tmp_path.iterdir() if not p.name.startswith(".")]
    assert len(built) == 1 and problems_with(built[0]) == []
    assert not [p for p in tmp_path.iterdir() if p.is_dir() and p.name.startswith(".")]


# Rank 1 of a real gloo process group builds while rank 0 waits, then rank 0 uses the build.
# transformers' save_pretrained writes no weights and no config.json on a rank other than 0;
# when the cache relied on it, rank 0 then found a directory of tokenizer files only.
RANK_ONE_BUILDS = """
import os, sys, torch, torch.distributed as dist
from transformers import AutoModelForCausalLM, AutoTokenizer
from lora_dist.models import resolve_model_dir
rank = int(os.environ["RANK"])
dist.init_process_group("gloo", rank=rank, world_size=2)
cache = sys.argv[1]
if rank == 1:
    path = resolve_model_dir("tiny", cache)
dist.barrier()
if rank == 0:
    path = resolve_model_dir("tiny", cache)
    model = AutoModelForCausalLM.from_pretrained(path)
    tok = AutoTokenizer.from_pretrained(path)
    ids = tok("SELECT 1", return_tensors="pt")["input_ids"]
    print("LOSS", float(model(input_ids=ids, labels=ids).loss))
dist.barrier()
print("DIR", path)
dist.destroy_process_group()
"""


def test_rank_one_builds_a_complete_model(tmp_path: Path) -> None:
    env = {"MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(free_port()), "WORLD_SIZE": "2"}
    procs = [
        subprocess.Popen(
            [sys.executable, "-c", RANK_ONE_BUILDS, str(tmp_path)],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            env={**os.environ, "PYTHONPATH": str(REPO), **env, "RANK": str(rank)},
        )
        for rank in (0, 1)
    ]
    (out0, err0), (out1, err1) = _finish(procs)
    assert BUILD_LINE in err1 and BUILD_LINE not in err0  # rank 1 was the builder
    loss = float(next(x for x in out0.splitlines() if x.startswith("LOSS")).split()[1])
    assert 0 < loss < 20
    (built,) = [p for p in tmp_path.iterdir() if not p.name.startswith(".")]
    assert {"config.json", "model.safetensors", "tokenizer.json"} <= {
        p.name for p in built.iterdir()
    }
    assert problems_with(built) == []


def _poison_truncate(d: Path) -> None:
    weights = d / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])


def _poison_flip(d: Path) -> None:
    weights = d / "model.safetensors"
    data = bytearray(weights.read_bytes())
    data[-10] ^= 0xFF  # same size, one weight changed
    weights.write_bytes(bytes(data))


def _poison_config(d: Path) -> None:
    (d / "config.json").unlink()


def _poison_tokenizer_only(d: Path) -> None:
    """What the old rank-1 build left: tokenizer files, no config, no weights, no manifest."""
    for name in ("config.json", "model.safetensors", "generation_config.json", "manifest.json"):
        (d / name).unlink(missing_ok=True)


POISONS = (_poison_truncate, _poison_flip, _poison_config, _poison_tokenizer_only)


def test_a_poisoned_cache_is_rebuilt_never_used(tmp_path: Path) -> None:
    caches = [tmp_path / poison.__name__ for poison in POISONS]
    firsts = [resolve_model_dir("tiny", cache) for cache in caches]
    reference = {k: v.clone() for k, v in load_file(str(firsts[0] / "model.safetensors")).items()}
    for poison, first in zip(POISONS, firsts, strict=True):
        poison(first)
        assert problems_with(first), poison.__name__
    ((out, err),) = _finish([_python(RESOLVE_ALL, *map(str, caches))])
    assert [f"DIR {first}" for first in firsts] == out.splitlines()
    assert err.count("is damaged") == err.count(BUILD_LINE) == len(POISONS), err
    for first in firsts:
        assert problems_with(first) == []
        rebuilt = load_file(str(first / "model.safetensors"))
        assert rebuilt.keys() == reference.keys()
        assert all(rebuilt[k].equal(reference[k]) for k in reference)  # same seed, same model
