"""The engine on a background thread, and the bridge from its updates to asyncio.

The thread loops: run the calls queued for it (adapter loads and unloads), free retired
adapters, then one engine step, or sleep until something arrives. Asyncio code submits a request
and iterates its updates; leaving the iteration early (a client that went away) aborts it.
"""

from __future__ import annotations

import asyncio
import queue
import sys
import threading
import traceback
from collections.abc import AsyncIterator, Callable
from concurrent.futures import Future
from typing import Any

from lora_dist.serving.adapters import AdapterRegistry
from lora_dist.serving.engine import Engine, Request, Update


class EngineWorker:
    """Runs `engine.step` on a daemon thread; see the module docstring."""

    def __init__(self, engine: Engine, registry: AdapterRegistry | None = None) -> None:
        self.engine = engine
        self.registry = registry
        self._calls: queue.SimpleQueue[tuple[Callable[[], Any], Future]] = queue.SimpleQueue()
        self._wake = threading.Event()
        self._stopping = False
        self._thread = threading.Thread(target=self._loop, name="lora-dist-engine", daemon=True)

    def start(self) -> EngineWorker:
        self._thread.start()
        return self

    def stop(self, timeout: float = 10.0) -> None:
        """Stop the loop after the current step and wait for the thread."""
        self._stopping = True
        self._wake.set()
        if self._thread.is_alive():
            self._thread.join(timeout)

    def call(self, fn: Callable[[], Any]) -> Future:
        """Run `fn` on the engine thread between two steps; its result comes in the future."""
        future: Future = Future()
        self._calls.put((fn, future))
        self._wake.set()
        return future

    def submit(self, request: Request) -> None:
        """Queue a request (RequestError if it cannot run or the queue is full)."""
        self.engine.submit(request)
        self._wake.set()

    def abort(self, request_id: str) -> None:
        self.engine.abort(request_id)
        self._wake.set()

    def _run_calls(self) -> None:
        while True:
            try:
                fn, future = self._calls.get_nowait()
            except queue.Empty:
                return
            if future.set_running_or_notify_cancel():
                try:
                    future.set_result(fn())
                except BaseException as exc:  # handed to the caller, who raises it
                    future.set_exception(exc)

    def _loop(self) -> None:
        while not self._stopping:
            self._run_calls()
            if self.registry is not None:
                self.registry.collect()
            if self.engine.has_work():
                try:
                    self.engine.step()
                except Exception:  # the engine has failed the requests of that step
                    traceback.print_exc(file=sys.stderr)
                continue
            self._wake.wait(timeout=1.0)
            self._wake.clear()
        self._run_calls()

    def open(self, requests: list[Request]) -> AsyncIterator[Update]:
        """Queue `requests` now (errors raise here) and return an iterator over their updates.

        The iterator ends when every request has ended; leaving it early aborts the rest. Each
        request holds its adapter slot (AdapterRegistry.acquire), which the engine gives back
        when it ends; a request that could not be queued gives its slot back here.
        """
        loop = asyncio.get_running_loop()
        inbox: asyncio.Queue[Update] = asyncio.Queue()

        def deliver(update: Update) -> None:
            try:
                loop.call_soon_threadsafe(inbox.put_nowait, update)
            except RuntimeError:  # the event loop is closed: nobody is listening any more
                pass

        queued = 0
        try:
            for request in requests:
                request.on_update = deliver
                self.submit(request)
                queued += 1
        except BaseException:
            for request in requests[:queued]:
                self.abort(request.request_id)
            if self.registry is not None:
                for request in requests[queued:]:
                    self.registry.release(request.slot)
            raise
        return self._drain(inbox, {r.request_id for r in requests})

    async def _drain(
        self, inbox: asyncio.Queue[Update], open_ids: set[str]
    ) -> AsyncIterator[Update]:
        try:
            while open_ids:
                update = await inbox.get()
                if update.finish_reason is not None:
                    open_ids.discard(update.request_id)
                yield update
        finally:
            for request_id in open_ids:
                self.abort(request_id)
