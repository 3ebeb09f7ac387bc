"""Iteration-level (continuous) batching of generation requests over many adapters on one base.

Every `step` is one token boundary. Requests that are waiting join, as many as the batch has room
for: they are prefilled together (left-padded, each row with its own adapter) and their KV cache
is stacked under the running batch's. The running rows decode one token in one forward pass, in
which every row uses its own adapter (lora_dist.multi_lora). A row leaves the batch as soon as it
ends (EOS, a stop string, max_tokens, or the context limit) and its place is free for the next
request at the next step: no request waits for a whole batch to finish, as Orca describes.

The engine is single-threaded: `step` runs on one thread; `submit` and `abort` may be called
from any thread. Updates are delivered through each request's `on_update`, on the step thread.
"""

from __future__ import annotations

import copy
import sys
import threading
import traceback
import uuid
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch

from lora_dist.generate import cache_argument, output_cache
from lora_dist.multi_lora import BASE_SLOT, MultiLoraModel
from lora_dist.serving.errors import RequestError
from lora_dist.serving.kv import Batch, left_padded
from lora_dist.serving.sampling import SamplingParams, pick_tokens
from lora_dist.serving.text import TextStream, eos_token_ids


@dataclass
class Update:
    """New text of one request, and how it finished once it has."""

    request_id: str
    text: str = ""
    """Text generated since the previous update."""
    finish_reason: str | None = None
    """None while running; then 'stop', 'length', 'abort' or 'error'."""
    prompt_tokens: int = 0
    completion_tokens: int = 0
    error: str | None = None
    token_ids: list[int] | None = None
    """Every generated token id, in the final update only."""


@dataclass
class Request:
    """A prompt to continue with the adapter in `slot`."""

    prompt_ids: list[int]
    params: SamplingParams
    slot: int = BASE_SLOT
    """The adapter's slot in the MultiLoraModel; 0 is the bare base."""
    request_id: str = field(default_factory=lambda: uuid.uuid4().hex)
    on_update: Callable[[Update], None] | None = None
    """Called on the engine's thread with every update."""


@dataclass
class Result:
    """A finished request: all its text and token ids."""

    request_id: str
    text: str
    finish_reason: str
    prompt_tokens: int
    completion_tokens: int
    token_ids: list[int]
    error: str | None = None


class _Row:
    """A running request and what it has generated."""

    def __init__(self, request: Request, tokenizer: Any) -> None:
        self.request = request
        self.generator = request.params.generator()
        self.stream = TextStream(tokenizer, request.params.stop)
        self.tokens: list[int] = []


class Engine:
    """Continuous batching over a MultiLoraModel; see the module docstring."""

    def __init__(
        self,
        model: MultiLoraModel,
        tokenizer: Any,
        max_batch_size: int = 16,
        max_model_len: int | None = None,
        max_prefill_tokens: int = 4096,
        max_waiting: int = 1024,
        on_finish: Callable[[Request, Update], None] | None = None,
    ) -> None:
        if max_batch_size < 1:
            raise ValueError(f"max_batch_size must be >= 1, got {max_batch_size}")
        self.model = model
        # Its own copy: a server encodes prompts with the original on another thread.
        self.tokenizer = copy.deepcopy(tokenizer)
        self.max_batch_size = max_batch_size
        limit = getattr(model.config, "max_position_embeddings", None) or 2048
        self.max_model_len = min(max_model_len or limit, limit)
        self.max_prefill_tokens = max_prefill_tokens
        self.max_waiting = max_waiting
        self.on_finish = on_finish
        self.eos_ids = eos_token_ids(tokenizer, getattr(model.model, "generation_config", None))
        pad = getattr(tokenizer, "pad_token_id", None)
        self.pad_id = int(pad) if pad is not None else min(self.eos_ids, default=0)
        self._cache_arg = cache_argument(model.model)
        self._lock = threading.Lock()
        self._waiting: deque[Request] = deque()
        self._aborted: set[str] = set()
        self._running: list[_Row] = []
        self._batch: Batch | None = None

    def check(self, prompt_ids: list[int], params: SamplingParams) -> None:
        """Raise RequestError if this prompt and max_tokens cannot run on this engine."""
        if not prompt_ids:
            raise RequestError("the prompt is empty", param="prompt")
        total = len(prompt_ids) + params.max_tokens
        if total > self.max_model_len:
            raise RequestError(
                f"This model's maximum context length is {self.max_model_len} tokens. However, "
                f"you requested {total} tokens ({len(prompt_ids)} in the prompt, "
                f"{params.max_tokens} in the completion). Shorten the prompt or max_tokens.",
                code="context_length_exceeded",
                param="max_tokens",
            )

    def submit(self, request: Request) -> None:
        """Queue a request (any thread); it joins the batch at a coming step."""
        self.check(request.prompt_ids, request.params)
        with self._lock:
            if len(self._waiting) >= self.max_waiting:
                raise RequestError(
                    f"the server is busy ({len(self._waiting)} requests waiting); retry later",
                    status=503,
                    code="server_busy",
                )
            self._waiting.append(request)

    def abort(self, request_id: str) -> None:
        """Stop a request (any thread); it ends with finish_reason 'abort' at the next step."""
        with self._lock:
            self._aborted.add(request_id)

    def has_work(self) -> bool:
        with self._lock:
            return bool(self._waiting or self._running or self._aborted)

    @property
    def running(self) -> int:
        """Rows in the running batch."""
        return len(self._running)

    def _finish(self, request: Request, update: Update) -> None:
        if request.on_update is not None:
            request.on_update(update)
        if self.on_finish is not None:
            self.on_finish(request, update)

    def _take(self) -> list[Request]:
        """Drop aborted requests; pop the waiting requests that join at this step."""
        with self._lock:
            aborted, self._aborted = self._aborted, set()
            joining: list[Request] = []
            budget = self.max_prefill_tokens
            kept: deque[Request] = deque()
            for request in self._waiting:
                if request.request_id in aborted:
                    self._finish(request, Update(request.request_id, finish_reason="abort"))
                elif (
                    len(self._running) + len(joining) < self.max_batch_size
                    and (not joining or len(request.prompt_ids) <= budget)
                    and not kept
                ):
                    joining.append(request)
                    budget -= len(request.prompt_ids)
                else:
                    kept.append(request)
            self._waiting = kept
        if aborted and self._running:
            gone = [i for i, row in enumerate(self._running) if row.request.request_id in aborted]
            for i in gone:
                row = self._running[i]
                self._finish(row.request, self._update(row, "", "abort"))
            self._keep([i for i in range(len(self._running)) if i not in set(gone)])
        return joining

    def _keep(self, rows: list[int]) -> None:
        self._running = [self._running[i] for i in rows]
        if not self._running:
            self._batch = None
        elif self._batch is not None and len(rows) < self._batch.rows:
            self._batch.keep(rows)

    def _prefill(self, joining: list[Request]) -> tuple[Batch, torch.Tensor]:
        device = self.model.device
        prompts = [r.prompt_ids for r in joining]
        ids, mask, positions = left_padded(prompts, self.pad_id, device)
        slots = torch.tensor([r.slot for r in joining], dtype=torch.long, device=device)
        out = self.model(
            slots,
            input_ids=ids,
            attention_mask=mask,
            position_ids=positions,
            use_cache=True,
            logits_to_keep=1,
        )
        batch = Batch(output_cache(out), mask, positions[:, -1] + 1, slots)
        return batch, out.logits[:, -1]

    @staticmethod
    def _update(row: _Row, text: str, finish: str | None, error: str | None = None) -> Update:
        return Update(
            row.request.request_id,
            text,
            finish,
            len(row.request.prompt_ids),
            len(row.tokens),
            error,
            list(row.tokens) if finish is not None else None,
        )

    @torch.no_grad()
    def step(self) -> None:
        """One token boundary: admit, decode one token for every row, retire finished rows."""
        joining = self._take()
        if not joining and not self._running:
            return
        try:
            logits = []
            if self._batch is not None:
                last = [row.tokens[-1] for row in self._running]
                tokens = torch.tensor(last, dtype=torch.long, device=self.model.device)
                inputs = self._batch.step_inputs(tokens, self._cache_arg)
                out = self.model(self._batch.slots, **inputs)
                logits.append(out.logits[:, -1])
            if joining:
                fresh, fresh_logits = self._prefill(joining)
                if self._batch is None:
                    self._batch = fresh
                else:
                    self._batch.extend(fresh)
                logits.append(fresh_logits)
                self._running += [_Row(r, self.tokenizer) for r in joining]
            rows = self._running
            picked = pick_tokens(
                torch.cat(logits).float(),
                [row.request.params for row in rows],
                [row.generator for row in rows],
            )
        except Exception as exc:
            self._fail_all(joining, exc)
            raise
        kept = []
        for i, (row, token) in enumerate(zip(rows, picked, strict=True)):
            finish = self._advance(row, token)
            if finish is None:
                kept.append(i)
        if len(kept) < len(rows):
            self._keep(kept)

    def _advance(self, row: _Row, token: int) -> str | None:
        """Append a token to a row, send its text; returns the finish reason once it ends."""
        params = row.request.params
        if token in self.eos_ids and not params.ignore_eos:
            finish, text = "stop", row.stream.finish()
        else:
            row.tokens.append(token)
            text = row.stream.push(token)
            context = len(row.request.prompt_ids) + len(row.tokens)
            if row.stream.stopped:
                finish = "stop"
            elif len(row.tokens) >= params.max_tokens or context >= self.max_model_len:
                finish = "length"
                text += row.stream.finish()
            else:
                finish = None
        if finish is not None:
            self._finish(row.request, self._update(row, text, finish))
        elif text and row.request.on_update is not None:
            row.request.on_update(self._update(row, text, None))
        return finish

    def _fail_all(self, joining: list[Request], exc: Exception) -> None:
        """End every running and joining request with an error; the batch starts empty."""
        message = f"generation failed: {type(exc).__name__}: {exc}"
        traceback.print_exc(file=sys.stderr)
        seen = {row.request.request_id for row in self._running}
        for row in self._running:
            self._finish(row.request, self._update(row, "", "error", message))
        for request in joining:
            if request.request_id not in seen:
                update = Update(
                    request.request_id, "", "error", len(request.prompt_ids), 0, message
                )
                self._finish(request, update)
        self._running, self._batch = [], None

    def run(self, requests: list[Request]) -> list[Result]:
        """Offline: run `requests` to the end with continuous batching; results in their order.

        A request's own `on_update` still sees every update.
        """
        results: dict[str, Result] = {}
        texts: dict[str, list[str]] = {r.request_id: [] for r in requests}

        def collect(update: Update) -> None:
            texts[update.request_id].append(update.text)
            if update.finish_reason is not None:
                results[update.request_id] = Result(
                    update.request_id,
                    "".join(texts[update.request_id]),
                    update.finish_reason,
                    update.prompt_tokens,
                    update.completion_tokens,
                    update.token_ids or [],
                    update.error,
                )

        for request in requests:
            also = request.on_update
            request.on_update = collect if also is None else lambda u, f=also: (collect(u), f(u))
            self.submit(request)
        while self.has_work():
            self.step()
        return [results[r.request_id] for r in requests]
