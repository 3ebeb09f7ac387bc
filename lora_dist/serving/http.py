"""Running the HTTP API with uvicorn: on a socket bound here, in the foreground or a thread.

`bind` listens before the server starts, so port 0 can pick a free port and the address can be
printed; `serving` runs a built service (lora_dist.serving.runtime) with its app in background
threads and yields its URL, for tests and benchmarks.
"""

from __future__ import annotations

import socket
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import uvicorn

from lora_dist.serving.runtime import Service
from lora_dist.serving.server import ServerSettings, create_app


def bind(host: str, port: int) -> socket.socket:
    """A listening TCP socket (port 0: any free port)."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind((host, port))
    sock.listen(128)
    return sock


def uvicorn_server(app: Any, log_level: str = "warning") -> uvicorn.Server:
    """A uvicorn server for `app` with bounded concurrency and keep-alive."""
    config = uvicorn.Config(
        app,
        log_level=log_level,
        limit_concurrency=512,
        timeout_keep_alive=5,
        timeout_graceful_shutdown=5,
    )
    return uvicorn.Server(config)


@contextmanager
def serving(
    service: Service,
    settings: ServerSettings | None = None,
    host: str = "127.0.0.1",
    port: int = 0,
) -> Iterator[str]:
    """Run the service's worker and HTTP server in background threads; yields the base URL."""
    app = create_app(service.worker, service.registry, service.tokenizer, settings)
    sock = bind(host, port)
    server = uvicorn_server(app)
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
