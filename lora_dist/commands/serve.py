"""Serve one base and many adapters over an OpenAI-compatible HTTP API (chat, streaming).

    lora-dist serve --adapter sql=runs/sql --adapter chat=runs/chat     # http://127.0.0.1:8000
    curl localhost:8000/v1/completions -H 'Content-Type: application/json' \\
        -d '{"model": "sql", "prompt": "SELECT", "max_tokens": 16}'

The `model` field of a request picks the adapter (or the base, by its name in GET /v1/models).
Routes: GET /v1/models, POST /v1/completions, /v1/chat/completions (stream: true for server-sent
events), /v1/load_lora_adapter and /v1/unload_lora_adapter (only for adapters under a
--lora_root), GET /health. It binds to 127.0.0.1 unless --host says otherwise; with an API key
(--api_key or the LORA_DIST_API_KEY environment variable) every request must send
`Authorization: Bearer KEY`. One device runs the model: for a 175B base use an engine built for
it, such as vLLM, which loads the same PEFT adapter files.
"""

from __future__ import annotations

import ipaddress
import os
import sys
from dataclasses import dataclass
from typing import Literal

from lora_dist.commands.options import Options, option
from lora_dist.errors import ConfigError
from lora_dist.serving.http import bind, uvicorn_server
from lora_dist.serving.runtime import adapter_specs, build, check_startup, resolve_base
from lora_dist.serving.server import ServerSettings, create_app
from lora_dist.settings import existing_dir

API_KEY_ENV = "LORA_DIST_API_KEY"


@dataclass
class ServeOptions(Options):
    model: str | None = option(None, aliases=("--base",))
    """a built-in model (smollm2-135m-instruct, tiny) or a base model directory; default:
    smollm2-135m-instruct"""
    adapter: list[str] = option([], metavar="NAME=DIR")
    """serve the adapter in DIR as model NAME (repeatable)"""
    host: str = "127.0.0.1"
    """address to listen on; anything but loopback exposes the server to the network"""
    port: int = option(8000, minimum=0, below=65536)
    """TCP port (0: any free port, printed at start)"""
    served_model_name: str | None = None
    """the base model's name in the API; default: the built-in name or the directory's name"""
    api_key: str | None = None
    """require `Authorization: Bearer KEY`; default: $LORA_DIST_API_KEY, else no key"""
    lora_root: list[str] = option([], metavar="DIR")
    """a directory under which /v1/load_lora_adapter may load adapters (repeatable); without
    one, adapters load only at start"""
    max_adapters: int = option(32, minimum=1)
    """most adapters loaded at once"""
    max_batch_size: int = option(16, minimum=1)
    """most requests decoded together"""
    max_model_len: int = option(2048, minimum=1)
    """most tokens of prompt plus completion"""
    max_tokens_limit: int = option(1024, minimum=1)
    """largest max_tokens a request may ask for"""
    max_waiting: int = option(256, minimum=1)
    """requests queued beyond the batch before new ones get 503"""
    max_body_bytes: int = option(1 << 20, minimum=1)
    """largest request body (413 above)"""
    dtype: Literal["fp32", "bf16", "fp16"] = "fp32"
    """dtype of the base and the adapters in memory"""
    device: str = "cpu"
    """torch device to run on (cpu, cuda, cuda:1, ...)"""
    log_level: Literal["critical", "error", "warning", "info", "debug"] = "info"
    """uvicorn's log level"""

    def validate(self) -> None:
        check_startup(self.model, self.adapter)
        for root in self.lora_root:
            existing_dir("--lora_root", root)


OPTIONS = ServeOptions


def _is_loopback(host: str) -> bool:
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return host == "localhost"


def run(opts: ServeOptions) -> int:
    api_key = opts.api_key or os.environ.get(API_KEY_ENV) or None
    settings = ServerSettings(api_key, opts.max_body_bytes, opts.max_tokens_limit)
    base_dir, base_name = resolve_base(opts.model)
    service = build(
        base_dir,
        adapter_specs(opts.adapter),
        base_name=opts.served_model_name or base_name,
        lora_roots=opts.lora_root or None,
        max_adapters=opts.max_adapters,
        max_batch_size=opts.max_batch_size,
        max_model_len=opts.max_model_len,
        max_waiting=opts.max_waiting,
        dtype=opts.dtype,
        device=opts.device,
    )
    try:
        sock = bind(opts.host, opts.port)
    except OSError as exc:
        raise ConfigError(f"cannot listen on {opts.host}:{opts.port}: {exc.strerror}") from exc
    host, port = sock.getsockname()[:2]
    if not _is_loopback(host) and api_key is None:
        print(f"lora-dist serve: warning: listening on {host} with no API key", file=sys.stderr)
    names = [service.registry.base_name] + [a.name for a in service.registry.adapters()]
    print(f"lora-dist serve: http://{host}:{port}/v1 serves {', '.join(names)}", flush=True)
    app = create_app(service.worker, service.registry, service.tokenizer, settings)
    service.worker.start()
    try:
        uvicorn_server(app, opts.log_level).run(sockets=[sock])
    except KeyboardInterrupt:  # uvicorn shut down gracefully, then re-raised Ctrl-C
        pass
    finally:
        service.worker.stop()
        sock.close()
    return 0
