"""Putting a service together: the base from safetensors, its adapters, the engine, uvicorn.

`build` loads a base directory (safetensors only, so nothing is unpickled) and the startup
adapters, and wires registry, engine, worker and FastAPI app. `serving` runs the app with uvicorn
on a socket it binds itself (port 0 picks a free port) in a background thread, for tests and
benchmarks; the `serve` command runs it in the foreground.
"""

from __future__ import annotations

import socket
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

import torch

from lora_dist.errors import ModelError
from lora_dist.multi_lora import MultiLoraModel
from lora_dist.serving.adapters import AdapterRegistry
from lora_dist.serving.engine import Engine
from lora_dist.serving.worker import EngineWorker

if TYPE_CHECKING:  # the HTTP stack is optional: `generate` runs without it
    from lora_dist.serving.server import ServerSettings

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
Dtype = Literal["fp32", "bf16", "fp16"]


def load_base(base_dir: str | Path, dtype: Dtype = "fp32", device: str = "cpu") -> tuple:
    """(model in eval mode, tokenizer) of a Hugging Face directory with safetensors weights."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    path = Path(base_dir)
    if not (path / "config.json").is_file():
        raise ModelError(f"{path} has no config.json: pass a Hugging Face model directory")
    if not any(path.glob("*.safetensors")):
        raise ModelError(
            f"{path} holds no .safetensors weights; lora-dist never unpickles. Convert the "
            "checkpoint to safetensors in a trusted environment."
        )
    model = AutoModelForCausalLM.from_pretrained(path, dtype=DTYPES[dtype], use_safetensors=True)
    tokenizer = AutoTokenizer.from_pretrained(path)
    return model.to(device).eval().requires_grad_(False), tokenizer


@dataclass
class Service:
    """A base, its adapters and the engine that serves them."""

    registry: AdapterRegistry
    engine: Engine
    worker: EngineWorker
    tokenizer: Any
    app: Any = None


def build(
    base_dir: str | Path,
    adapters: dict[str, str | Path] | None = None,
    *,
    base_name: str | None = None,
    settings: ServerSettings | None = None,
    lora_roots: list[str | Path] | None = None,
    max_adapters: int = 32,
    max_batch_size: int = 16,
    max_model_len: int | None = 2048,
    max_waiting: int = 1024,
    dtype: Dtype = "fp32",
    device: str = "cpu",
    with_app: bool = True,
) -> Service:
    """Load the base and `adapters` ({name: directory}) and wire the service; not started."""
    model, tokenizer = load_base(base_dir, dtype, device)
    mixed = MultiLoraModel(model, max_adapters=max_adapters)
    registry = AdapterRegistry(mixed, base_name or Path(base_dir).resolve().name, lora_roots)
    for name, path in (adapters or {}).items():
        registry.install(name, registry.read(name, path, runtime=False))
    engine = Engine(
        mixed,
        tokenizer,
        max_batch_size=max_batch_size,
        max_model_len=max_model_len,
        max_waiting=max_waiting,
        on_finish=lambda request, _: registry.release(request.slot),
    )
    worker = EngineWorker(engine, registry)
    service = Service(registry, engine, worker, tokenizer)
    if with_app:
        from lora_dist.serving.server import create_app

        service.app = create_app(worker, registry, tokenizer, settings)
    return service


def bind(host: str, port: int) -> socket.socket:
    """A listening TCP socket (port 0: any free port)."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind((host, port))
    sock.listen(128)
    return sock


def uvicorn_server(app: Any, log_level: str = "warning") -> Any:
    """A uvicorn server for `app` with bounded concurrency and keep-alive."""
    import uvicorn

    config = uvicorn.Config(
        app,
        log_level=log_level,
        limit_concurrency=512,
        timeout_keep_alive=5,
        timeout_graceful_shutdown=5,
    )
    return uvicorn.Server(config)


@contextmanager
def serving(service: Service, host: str = "127.0.0.1", port: int = 0) -> Iterator[str]:
    """Run the service's worker and HTTP server in background threads; yields the base URL."""
    sock = bind(host, port)
    server = uvicorn_server(service.app)
    service.worker.start()
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    deadline = time.monotonic() + 30
    while not server.started:
        if not thread.is_alive() or time.monotonic() > deadline:
            raise RuntimeError("the HTTP server did not start")
        time.sleep(0.01)
    try:
        bound_host, bound_port = sock.getsockname()[:2]
        yield f"http://{bound_host}:{bound_port}"
    finally:
        server.should_exit = True
        thread.join(10)
        service.worker.stop()
        sock.close()


def adapter_specs(specs: list[str]) -> dict[str, str]:
    """`--adapter NAME=DIR` flags as {name: directory}; a malformed or repeated one is refused."""
    from lora_dist.errors import ConfigError

    adapters: dict[str, str] = {}
    for spec in specs:
        name, sep, path = spec.partition("=")
        if not sep or not name or not path:
            raise ConfigError(f"--adapter {spec!r}: write NAME=DIR, e.g. --adapter sql=runs/sql")
        if name in adapters:
            raise ConfigError(f"--adapter {name} is given twice; each name serves one adapter")
        adapters[name] = path
    return adapters


def resolve_base(spec: str | None) -> tuple[Path, str]:
    """(directory, name in the API) of `--base`: a built-in model's name, or a directory's."""
    from lora_dist.models import BUILTIN, DEFAULT_MODEL, resolve_model_dir

    name = spec or DEFAULT_MODEL
    directory = resolve_model_dir(name)
    return directory, name if name in BUILTIN else directory.resolve().name
