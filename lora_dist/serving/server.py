"""The OpenAI-compatible HTTP API over one base model and its adapters (FastAPI on uvicorn).

Routes, as vLLM's multi-LoRA server has them: GET /v1/models, POST /v1/completions and
/v1/chat/completions (the adapter is chosen by `model`; `stream: true` answers with server-sent
events), POST /v1/load_lora_adapter and /v1/unload_lora_adapter, and GET /health.

Every error is OpenAI's body {"error": {"message", "type", "param", "code"}} with its HTTP
status: 400 for a malformed or unsupported request, 401 for a missing or wrong API key, 403 for
an adapter path outside the allowed roots, 404 for an unknown model, 413 for a body over the
limit, 503 when the queue is full. The API key is compared in constant time (on SHA-256 digests,
so not even its length leaks). Adapter files are safetensors only: nothing is ever unpickled.
"""

from __future__ import annotations

import asyncio
import hashlib
import hmac
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Any

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, StreamingResponse
from starlette.exceptions import HTTPException

from lora_dist.serving import protocol as p
from lora_dist.serving.adapters import AdapterRegistry
from lora_dist.serving.engine import Request as EngineRequest
from lora_dist.serving.engine import Update
from lora_dist.serving.errors import RequestError
from lora_dist.serving.sampling import SamplingParams
from lora_dist.serving.text import encode_chat, encode_prompt
from lora_dist.serving.worker import EngineWorker


@dataclass
class ServerSettings:
    """Limits and access of the HTTP API."""

    api_key: str | None = None
    """Clients must send `Authorization: Bearer <api_key>`; None lets everyone in."""
    max_body_bytes: int = 1 << 20
    """Largest request body accepted (413 above)."""
    max_tokens_limit: int = 1024
    """Largest max_tokens a request may ask for; also the chat default, context permitting."""


def _error_response(error: RequestError) -> JSONResponse:
    return JSONResponse(error.body(), status_code=error.status)


class Guard:
    """ASGI middleware: the API key, and the body size limit (also for chunked bodies)."""

    def __init__(self, app: Any, settings: ServerSettings) -> None:
        self.app = app
        self.max_body = settings.max_body_bytes
        key = settings.api_key
        self.key_digest = hashlib.sha256(key.encode()).digest() if key else None

    def _authorized(self, headers: dict[bytes, bytes]) -> bool:
        given = headers.get(b"authorization", b"")
        token = given[7:] if given[:7].lower() == b"bearer " else b""
        digest = hashlib.sha256(token.strip()).digest()
        return hmac.compare_digest(digest, self.key_digest or b"")

    async def __call__(self, scope: dict, receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        headers = dict(scope["headers"])
        error = None
        if self.key_digest is not None and scope["path"] != "/health":
            if not self._authorized(headers):
                error = RequestError(
                    "Incorrect or missing API key: send Authorization: Bearer <key>",
                    status=401,
                    code="invalid_api_key",
                )
        length = headers.get(b"content-length", b"0")
        if error is None and not length.isdigit():
            error = RequestError("the Content-Length header is not a number")
        elif error is None and int(length) > self.max_body:
            error = self._too_large()
        if error is not None:
            return await _error_response(error)(scope, receive, send)
        seen = 0

        async def limited_receive() -> dict:
            nonlocal seen
            message = await receive()
            seen += len(message.get("body", b""))
            if seen > self.max_body:
                raise self._too_large()
            return message

        await self.app(scope, limited_receive, send)

    def _too_large(self) -> RequestError:
        return RequestError(
            f"the request body is larger than {self.max_body} bytes", status=413, code="too_large"
        )


def create_app(
    worker: EngineWorker,
    registry: AdapterRegistry,
    tokenizer: Any,
    settings: ServerSettings | None = None,
) -> FastAPI:
    """The FastAPI application serving `registry`'s models through `worker`'s engine."""
    settings = settings or ServerSettings()
    engine = worker.engine
    app = FastAPI(title="lora-dist", docs_url=None, redoc_url=None, openapi_url=None)
    app.add_middleware(Guard, settings=settings)

    @app.exception_handler(RequestError)
    async def _request_error(_: Request, exc: RequestError) -> JSONResponse:
        return _error_response(exc)

    @app.exception_handler(HTTPException)
    async def _http_error(_: Request, exc: HTTPException) -> JSONResponse:
        return _error_response(RequestError(str(exc.detail), status=exc.status_code))

    @app.exception_handler(Exception)
    async def _server_error(_: Request, exc: Exception) -> JSONResponse:
        return _error_response(RequestError(f"internal error: {type(exc).__name__}", status=500))

    def max_tokens_for(requested: int | None, prompt_lengths: list[int]) -> int:
        if requested is not None and requested > settings.max_tokens_limit:
            raise RequestError(
                f"max_tokens is {requested}; this server allows up to {settings.max_tokens_limit}",
                param="max_tokens",
            )
        if requested is not None:
            return requested
        room = engine.max_model_len - max(prompt_lengths)
        return max(1, min(settings.max_tokens_limit, room))

    def requests_for(model: str, prompts: list[list[int]], params: SamplingParams) -> list:
        for ids in prompts:
            engine.check(ids, params)
        taken: list[EngineRequest] = []
        for ids in prompts:
            taken.append(EngineRequest(ids, params, registry.acquire(model)))
        return taken

    async def collect(updates: AsyncIterator[Update], reqs: list) -> tuple[list, list, int, int]:
        texts: list[list[str]] = [[] for _ in reqs]
        finish: list[str] = ["stop"] * len(reqs)
        prompt_tokens = completion_tokens = 0
        async for update, index in _indexed(updates, reqs):
            texts[index].append(update.text)
            if update.finish_reason is not None:
                if update.finish_reason == "error":
                    raise RequestError(update.error or "generation failed", status=500)
                finish[index] = update.finish_reason
                prompt_tokens += update.prompt_tokens
                completion_tokens += update.completion_tokens
        return ["".join(t) for t in texts], finish, prompt_tokens, completion_tokens

    @app.get("/health")
    async def health() -> dict:
        return {"status": "ok"}

    @app.get("/v1/models")
    async def models() -> dict:
        base = registry.base_name
        data = [
            {
                "id": base,
                "object": "model",
                "created": registry.created,
                "owned_by": "lora-dist",
                "root": base,
                "parent": None,
                "max_model_len": engine.max_model_len,
            }
        ]
        for info in registry.adapters():
            card = {"id": info.name, "object": "model", "created": info.created}
            card.update(owned_by="lora-dist", root=info.name, parent=base, lora_rank=info.rank)
            data.append(card)
        return {"object": "list", "data": data}

    @app.post("/v1/completions")
    async def completions(request: Request) -> Any:
        body = p.parse_body(await request.body(), p.CompletionRequest)
        registry.check_known(body.model)
        body.refuse_unsupported()
        prompts = [encode_prompt(tokenizer, text) for text in body.prompts]
        requested = 16 if body.max_tokens is None else body.max_tokens
        params = body.sampling(max_tokens_for(requested, [len(x) for x in prompts]))
        reqs = requests_for(body.model, prompts, params)
        id_ = p.new_id("cmpl")
        updates = worker.open(reqs)
        if body.stream:
            return _sse(_completion_events(id_, body, updates, reqs))
        texts, finish, n_prompt, n_completion = await collect(updates, reqs)
        choices = [
            p.completion_choice(i, t, f) for i, (t, f) in enumerate(zip(texts, finish, strict=True))
        ]
        return p.completion_body(id_, body.model, choices, p.usage(n_prompt, n_completion))

    async def _completion_events(
        id_: str, body: p.CompletionRequest, updates: AsyncIterator[Update], reqs: list
    ) -> AsyncIterator[bytes]:
        n_prompt = n_completion = 0
        async for update, index in _indexed(updates, reqs):
            if update.finish_reason == "error":
                yield p.sse(RequestError(update.error or "failed", status=500).body())
                break
            finish = update.finish_reason
            if update.text or finish:
                choice = p.completion_choice(index, update.text, finish)
                yield p.sse(p.completion_body(id_, body.model, [choice], None, chunk=True))
            if finish:
                n_prompt += update.prompt_tokens
                n_completion += update.completion_tokens
        else:
            if body.include_usage:
                usage = p.usage(n_prompt, n_completion)
                yield p.sse(p.completion_body(id_, body.model, [], usage, chunk=True))
        yield p.sse("[DONE]")

    @app.post("/v1/chat/completions")
    async def chat(request: Request) -> Any:
        body = p.parse_body(await request.body(), p.ChatRequest)
        registry.check_known(body.model)
        body.refuse_unsupported()
        messages = [m.as_template_input() for m in body.messages]
        prompt = encode_chat(tokenizer, messages)
        params = body.sampling(max_tokens_for(body.requested_max_tokens, [len(prompt)]))
        reqs = requests_for(body.model, [prompt], params)
        id_ = p.new_id("chatcmpl")
        updates = worker.open(reqs)
        if body.stream:
            return _sse(_chat_events(id_, body, updates))
        texts, finish, n_prompt, n_completion = await collect(updates, reqs)
        return p.chat_body(id_, body.model, texts[0], finish[0], p.usage(n_prompt, n_completion))

    async def _chat_events(
        id_: str, body: p.ChatRequest, updates: AsyncIterator[Update]
    ) -> AsyncIterator[bytes]:
        yield p.sse(p.chat_chunk(id_, body.model, {"role": "assistant", "content": ""}, None))
        async for update in updates:
            if update.finish_reason == "error":
                yield p.sse(RequestError(update.error or "failed", status=500).body())
                break
            if update.text:
                yield p.sse(p.chat_chunk(id_, body.model, {"content": update.text}, None))
            if update.finish_reason:
                yield p.sse(p.chat_chunk(id_, body.model, {}, update.finish_reason))
                if body.include_usage:
                    usage = p.usage(update.prompt_tokens, update.completion_tokens)
                    yield p.sse(p.chat_chunk(id_, body.model, None, None, usage))
        yield p.sse("[DONE]")

    @app.post("/v1/load_lora_adapter")
    async def load_adapter(request: Request) -> dict:
        body = p.parse_body(await request.body(), p.LoadAdapterRequest)
        factors = await asyncio.to_thread(registry.read, body.lora_name, body.lora_path)
        future = worker.call(lambda: registry.install(body.lora_name, factors))
        info = await asyncio.wrap_future(future)
        return {
            "object": "model",
            "id": info.name,
            "parent": registry.base_name,
            "lora_rank": info.rank,
            "lora_alpha": info.alpha,
            "adapted_modules": info.targets,
        }

    @app.post("/v1/unload_lora_adapter")
    async def unload_adapter(request: Request) -> dict:
        body = p.parse_body(await request.body(), p.UnloadAdapterRequest)
        await asyncio.wrap_future(worker.call(lambda: registry.unload(body.lora_name)))
        return {"object": "model", "id": body.lora_name, "deleted": True}

    return app


async def _indexed(
    updates: AsyncIterator[Update], reqs: list[EngineRequest]
) -> AsyncIterator[tuple[Update, int]]:
    """Each update with the index of its request (the choice index)."""
    index_of = {r.request_id: i for i, r in enumerate(reqs)}
    async for update in updates:
        yield update, index_of[update.request_id]


def _sse(events: AsyncIterator[bytes]) -> StreamingResponse:
    headers = {"Cache-Control": "no-cache", "X-Accel-Buffering": "no"}
    return StreamingResponse(events, media_type="text/event-stream", headers=headers)
