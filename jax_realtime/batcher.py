"""One scheduler for every session: pending windows -> the engine's buckets -> results back.

The batcher is the asyncio-facing side of the engine.  Sessions (and REST requests) ``await
submit(owner, request)``; a single loop takes the oldest pending request, fills a batch with other
pending requests that use the same encoder window (oldest first), runs ``engine.decode`` on one
worker thread (device work never runs on the event loop) and resolves each request's future.

* Fair: the oldest request of the most urgent priority is always in the next batch, and a
  streaming session has at most one request pending, so no session can starve another.  Realtime
  steps (priority 0) go before long-form work (REST, priority 1): a file waits, a live stream must not.
* Batched: a request waits at most ``gather_s`` for others to join its batch (streaming sessions
  submit on a shared clock tick, so a few milliseconds gather them all).
* Bounded: at most ``max_pending`` requests wait; beyond that ``submit`` raises :class:`Busy`.
* Cancellable: ``cancel(owner)`` drops that owner's waiting requests at once; a result for a
  request already on the device is discarded when it arrives.
"""

from __future__ import annotations

import asyncio
import collections
import concurrent.futures
import dataclasses
import logging
import time
from typing import Callable

from .engine import DecodeRequest, DecodeResult, Engine

log = logging.getLogger(__name__)


class Busy(RuntimeError):
    """The batcher's queue is full."""


class EngineError(RuntimeError):
    """The engine failed on a batch; the message is the original error's."""


@dataclasses.dataclass
class _Pending:
    owner: str
    request: DecodeRequest
    window_s: float
    future: asyncio.Future
    enqueued: float
    priority: int = 0


@dataclasses.dataclass
class BatchStats:
    """Counters for operators (read by the metrics endpoint)."""

    batches: int = 0
    requests: int = 0
    padded_rows: int = 0  # rows of the compiled batches that carried no request
    busy_seconds: float = 0.0
    last_step_seconds: float = 0.0
    cancelled: int = 0
    step_seconds: collections.deque = dataclasses.field(default_factory=lambda: collections.deque(maxlen=1000))


class Batcher:
    def __init__(self, engine: Engine, max_pending: int = 1024, gather_s: float = 0.0,
                 on_batch: Callable[[int, int, float], None] | None = None):
        """``on_batch(requests, rows, seconds)`` is called after every engine step (the service's
        metrics): requests decoded, rows of the compiled batch bucket, the step's wall time."""
        self.engine = engine
        self.max_pending = max_pending
        self.gather_s = gather_s
        self.on_batch = on_batch
        self.stats = BatchStats()
        self._pending: list[_Pending] = []
        self._wake = asyncio.Event()
        self._executor = concurrent.futures.ThreadPoolExecutor(max_workers=1, thread_name_prefix="engine")
        self._closed = False

    @property
    def queue_depth(self) -> int:
        return len(self._pending)

    async def submit(self, owner: str, request: DecodeRequest, priority: int = 0) -> DecodeResult:
        """Decode ``request`` in the next batch that has room for it (lower ``priority`` first)."""
        if self._closed:
            raise RuntimeError("the batcher is stopped")
        if len(self._pending) >= self.max_pending:
            raise Busy(f"{len(self._pending)} requests are waiting")
        window = self.engine.window_for(request)  # validates before queueing
        future = asyncio.get_running_loop().create_future()
        self._pending.append(_Pending(owner, request, window, future, time.monotonic(), priority))
        self._wake.set()
        return await future

    async def align(self, requests: list) -> list:
        """``Engine.align(requests)`` (word timestamps of given text, a realtime session's committed
        words) on the engine's thread, between two batches: not batched with other sessions'."""
        if self._closed:
            raise RuntimeError("the batcher is stopped")
        loop = asyncio.get_running_loop()
        try:
            return await loop.run_in_executor(self._executor, self.engine.align, requests)
        except Exception as exc:
            log.exception("engine failed on an alignment of %d", len(requests))
            raise EngineError(str(exc) or type(exc).__name__) from exc

    def cancel(self, owner: str) -> int:
        """Drop ``owner``'s waiting requests (a disconnect); returns how many."""
        mine = [p for p in self._pending if p.owner == owner]
        self._pending = [p for p in self._pending if p.owner != owner]
        for p in mine:
            p.future.cancel()
        self.stats.cancelled += len(mine)
        return len(mine)

    async def _gather(self) -> None:
        """Give requests submitted together a moment to join one batch: wait until the largest
        bucket is full or the oldest request has waited ``gather_s``."""
        limit = self.engine.batch_buckets[-1]
        while self._pending and len(self._pending) < limit and not self._closed:
            remaining = min(p.enqueued for p in self._pending) + self.gather_s - time.monotonic()
            if remaining <= 0:
                return
            self._wake.clear()
            try:
                async with asyncio.timeout(remaining):
                    await self._wake.wait()
            except TimeoutError:
                return

    def _take_batch(self) -> list[_Pending]:
        self._pending = [p for p in self._pending if not p.future.cancelled()]
        if not self._pending:
            return []
        first = min(self._pending, key=lambda p: (p.priority, p.enqueued))  # it sets the window
        limit = self.engine.batch_buckets[-1]
        same = sorted((p for p in self._pending if p.window_s == first.window_s), key=lambda p: (p.priority, p.enqueued))
        batch = same[:limit]
        taken = set(map(id, batch))
        self._pending = [p for p in self._pending if id(p) not in taken]
        return batch

    async def run(self) -> None:
        """The scheduling loop; run it as one background task for the life of the service."""
        loop = asyncio.get_running_loop()
        while not self._closed:
            await self._gather()
            batch = self._take_batch()
            if not batch:
                self._wake.clear()
                await self._wake.wait()
                continue
            started = time.perf_counter()
            try:
                results = await loop.run_in_executor(self._executor, self.engine.decode, [p.request for p in batch])
            except Exception as exc:  # any engine failure fails this batch's requests, never the loop
                log.exception("engine failed on a batch of %d", len(batch))
                for p in batch:
                    if not p.future.done():
                        p.future.set_exception(EngineError(str(exc) or type(exc).__name__))
                continue
            finally:
                elapsed = time.perf_counter() - started
                self._record(len(batch), elapsed)
            for p, result in zip(batch, results):
                if not p.future.done():
                    p.future.set_result(result)

    def _record(self, size: int, elapsed: float) -> None:
        s = self.stats
        s.batches += 1
        s.requests += size
        bucket = next((b for b in self.engine.batch_buckets if b >= size), size)
        s.padded_rows += bucket - size
        s.busy_seconds += elapsed
        s.last_step_seconds = elapsed
        s.step_seconds.append(elapsed)
        if self.on_batch is not None:
            try:
                self.on_batch(size, bucket, elapsed)
            except Exception:  # an observer must never stop the scheduling loop
                log.exception("on_batch hook failed")

    async def close(self) -> None:
        """Stop the loop; waiting requests fail with ``CancelledError``."""
        self._closed = True
        for p in self._pending:
            p.future.cancel()
        self._pending = []
        self._wake.set()
        self._executor.shutdown(wait=False, cancel_futures=True)
