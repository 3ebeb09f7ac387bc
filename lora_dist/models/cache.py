"""A self-checking cache of built model directories: built once, verified on every use.

A built model lives in `<cache>/<name>-<key>/`, where the key hashes everything the build depends
on (its inputs and the library versions that write it). A build runs under a file lock in a
temporary directory with calls that always write (never `save_pretrained`, which writes nothing
on a distributed rank other than 0), is loaded back and checked, gets a manifest of SHA-256
checksums, and only then is renamed into place. Every later use verifies the manifest; a
directory that fails is moved aside and rebuilt, with a warning that says why, and is never used.
"""

from __future__ import annotations

import fcntl
import os
import shutil
import sys
import tempfile
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from lora_dist.manifest import verify_manifest, write_manifest


@dataclass(frozen=True)
class Recipe:
    """How to build one named model directory."""

    name: str
    """Directory name prefix in the cache, e.g. 'smollm2-135m-instruct'."""
    key: Callable[[], str]
    """Hash of the build's inputs; a new key means a new directory."""
    build: Callable[[Path], None]
    """Write the model into an empty directory."""
    check: Callable[[Path], None]
    """Raise unless the directory holds a complete, loadable model."""
    about: str = ""
    """What is being built, for the one line printed when a build starts."""


def cache_root(cache_dir: str | Path | None = None) -> Path:
    """`cache_dir`, else $LORA_DIST_CACHE, else ~/.cache/lora_dist."""
    if cache_dir is not None:
        return Path(cache_dir)
    env = os.environ.get("LORA_DIST_CACHE")
    return Path(env) if env else Path.home() / ".cache" / "lora_dist"


_verified: set[Path] = set()  # directories this process has already checked


def problems_with(directory: Path) -> list[str]:
    """Why a cached directory cannot be used; an empty list means intact."""
    if not directory.is_dir():
        return [f"{directory} does not exist"]
    return verify_manifest(directory)


def ensure_built(recipe: Recipe, cache_dir: str | Path | None = None) -> Path:
    """The recipe's directory, built on first use and verified on every use.

    Safe for many processes at once (every rank of a job, several jobs sharing a cache): one
    builds under the lock while the others wait, and each caller gets a verified directory.
    """
    root = cache_root(cache_dir)
    root.mkdir(parents=True, exist_ok=True)
    final = root / f"{recipe.name}-{recipe.key()}"
    if final in _verified or not problems_with(final):
        _verified.add(final)
        return final
    with open(root / f".{final.name}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        problems = problems_with(final)
        if not problems:  # another process built it while we waited
            _verified.add(final)
            return final
        if final.exists():
            warnings.warn(
                f"cached model {final} is damaged ({'; '.join(problems[:3])}); rebuilding it",
                stacklevel=2,
            )
            aside = root / f".{final.name}.damaged-{os.getpid()}"
            os.rename(final, aside)
            shutil.rmtree(aside, ignore_errors=True)
        _build(recipe, root, final)
    _verified.add(final)
    return final


def _build(recipe: Recipe, root: Path, final: Path) -> None:
    print(
        f"lora-dist: building {recipe.about or recipe.name} in {final} (once)",
        file=sys.stderr,
        flush=True,
    )
    tmp = Path(tempfile.mkdtemp(prefix=f".{final.name}-", dir=root))
    try:
        recipe.build(tmp)
        recipe.check(tmp)
        write_manifest(tmp, {"recipe": recipe.name, "key": final.name})
        os.chmod(tmp, 0o755)  # mkdtemp makes it 0700; a shared cache must be readable
        os.rename(tmp, final)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
