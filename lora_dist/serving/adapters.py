"""Adapter names to MultiLoraModel slots: adapters load and unload while requests run.

A request takes a reference to its adapter's slot when it is accepted and gives it back when it
ends. Unloading removes the name at once (new requests for it get 404) and frees the slot when
the last request that uses it has ended, so no running request ever loses its adapter. Changes
to the model (`install`, `collect`) happen on the engine's thread, between forward passes.

Adapters loaded at runtime must lie under one of the allowed roots; every file read is checked
to resolve inside the adapter directory, so a symlink cannot point the server elsewhere.
"""

from __future__ import annotations

import re
import threading
import time
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

from lora_dist.adapter import CONFIG_NAME, META_NAME, WEIGHTS_NAME
from lora_dist.errors import AdapterError
from lora_dist.multi_lora import BASE_SLOT, AdapterFactors, MultiLoraModel
from lora_dist.serving.errors import RequestError, unknown_model

_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._:/-]{0,127}")


@dataclass(frozen=True)
class AdapterInfo:
    """A loaded adapter, as /v1/models describes it."""

    name: str
    rank: int
    alpha: float
    targets: int
    """Number of adapted modules."""
    created: int


def checked_adapter_dir(path: str | Path, roots: list[Path] | None) -> Path:
    """`path` resolved, refused unless it lies under a root (when roots are given) and none of
    the adapter files it holds is a link that leaves it."""
    try:
        resolved = Path(path).resolve()
    except (OSError, ValueError) as exc:
        message = f"lora_path {path!r} is not a usable path: {exc}"
        raise RequestError(message, param="lora_path") from exc
    if roots is not None and not any(resolved.is_relative_to(root) for root in roots):
        raise RequestError(
            f"{path} is not under an allowed adapter root", status=403, param="lora_path"
        )
    if not resolved.is_dir():
        raise RequestError(f"{path} is not an adapter directory", param="lora_path")
    for name in (CONFIG_NAME, WEIGHTS_NAME, META_NAME):
        target = resolved / name
        if target.exists() and not target.resolve().is_relative_to(resolved):
            raise RequestError(
                f"{path}/{name} links outside the adapter directory", status=403, param="lora_path"
            )
    return resolved


class AdapterRegistry:
    """The names a MultiLoraModel serves: the base, and its adapters with reference counts."""

    def __init__(
        self, model: MultiLoraModel, base_name: str, roots: list[str | Path] | None = None
    ) -> None:
        self.model = model
        self.base_name = base_name
        self.roots = None if roots is None else [Path(r).resolve() for r in roots]
        self.created = int(time.time())
        self._lock = threading.Lock()
        self._slots: dict[str, int] = {}
        self._info: dict[str, AdapterInfo] = {}
        self._refs: Counter[int] = Counter()
        self._retired: set[int] = set()

    def adapters(self) -> list[AdapterInfo]:
        """The loaded adapters, in load order."""
        with self._lock:
            return list(self._info.values())

    def check_known(self, name: str) -> None:
        """404 unless `name` is the base or a loaded adapter."""
        with self._lock:
            if name != self.base_name and name not in self._slots:
                raise unknown_model(name, [self.base_name, *self._slots])

    def acquire(self, name: str) -> int:
        """The slot of model `name` (the base is 0), held until `release`; 404 if unknown."""
        if name == self.base_name:
            return BASE_SLOT
        with self._lock:
            slot = self._slots.get(name)
            if slot is None:
                raise unknown_model(name, [self.base_name, *self._slots])
            self._refs[slot] += 1
            return slot

    def release(self, slot: int) -> None:
        """Give back a slot taken by `acquire` (any thread)."""
        if slot == BASE_SLOT:
            return
        with self._lock:
            self._refs[slot] -= 1

    def read(self, name: str, path: str | Path, runtime: bool = True) -> AdapterFactors:
        """Read and check an adapter for loading as `name` (any thread); the model is unchanged.

        `runtime` loads (from a request) must lie under the registry's roots.
        """
        if not isinstance(name, str) or not _NAME.fullmatch(name):
            raise RequestError(
                "lora_name must be 1-128 letters, digits or ._:/- and start with a letter or digit",
                param="lora_name",
            )
        if runtime and self.roots is None:
            raise RequestError(
                "loading adapters at runtime is off; start the server with --lora_root DIR",
                status=403,
            )
        self._check_free(name)
        directory = checked_adapter_dir(path, self.roots if runtime else None)
        try:
            return self.model.read(directory)
        except AdapterError as exc:
            raise RequestError(str(exc), param="lora_path") from exc

    def _check_free(self, name: str) -> None:
        with self._lock:
            if name == self.base_name or name in self._slots:
                raise RequestError(
                    f"the model name {name!r} is taken; unload it first", param="lora_name"
                )

    def install(self, name: str, factors: AdapterFactors) -> AdapterInfo:
        """Put a read adapter into the model under `name` (engine thread)."""
        self._check_free(name)
        self.collect()
        try:
            slot = self.model.add(factors)
        except AdapterError as exc:
            raise RequestError(str(exc), param="lora_name") from exc
        info = AdapterInfo(
            name=name,
            rank=factors.config.r,
            alpha=factors.config.alpha,
            targets=len(factors.factors),
            created=int(time.time()),
        )
        with self._lock:
            self._slots[name] = slot
            self._info[name] = info
        return info

    def unload(self, name: str) -> None:
        """Stop serving `name`; its slot is freed once no request uses it (engine thread)."""
        with self._lock:
            if name == self.base_name:
                raise RequestError("the base model cannot be unloaded", param="lora_name")
            slot = self._slots.pop(name, None)
            if slot is None:
                raise unknown_model(name, [self.base_name, *self._slots])
            del self._info[name]
            self._retired.add(slot)
        self.collect()

    def collect(self) -> None:
        """Remove retired adapters that no request uses any more (engine thread)."""
        with self._lock:
            free = [slot for slot in self._retired if self._refs[slot] <= 0]
            for slot in free:
                self._retired.discard(slot)
                del self._refs[slot]
        for slot in free:
            self.model.remove(slot)
