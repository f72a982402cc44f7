"""The engine behind asyncio: one thread per model steps the (synchronous) Engine; requests come in
through a command inbox and their outputs go back to per-request asyncio queues.

    runner = EngineRunner(engine, name="small", metrics=metrics)
    runner.start()
    async for out in runner.generate(prompt_ids, SamplingParams(max_tokens=32)):   # ValueError: bad request
        ...                    # leaving the loop early (client gone) aborts the request, freeing its blocks

The event loop never waits for a model step: `generate` posts ("add", …) to the inbox and awaits a
future the engine thread resolves, so validation errors (prompt over the context, …) come back as
ValueError before any output; `QueueFull` when `max_waiting` requests already wait.
"""

from __future__ import annotations

import asyncio
import itertools
import threading
import time
from collections import deque
from collections.abc import AsyncIterator
from dataclasses import dataclass, field

from gptstack.infer.engine import Engine, RequestOutput
from gptstack.infer.sampling import SamplingParams


class QueueFull(Exception):
    """The model's waiting queue is full (HTTP 503)."""


@dataclass
class _Pending:
    loop: asyncio.AbstractEventLoop
    queue: asyncio.Queue
    arrival: float
    first: float | None = None
    last: float | None = None
    n_out: int = 0
    extra: dict = field(default_factory=dict)


class EngineRunner:
    def __init__(self, engine: Engine, name: str, metrics=None, max_waiting: int = 256):
        self.engine, self.name, self.metrics, self.max_waiting = engine, name, metrics, max_waiting
        self.inbox: deque = deque()
        self.wake = threading.Event()
        self.pending: dict[str, _Pending] = {}
        self.ids = itertools.count()
        self.thread = threading.Thread(target=self._loop, name=f"engine-{name}", daemon=True)
        self.stopping = False
        self.error: BaseException | None = None

    # ---- asyncio side ----------------------------------------------------------------------------

    def start(self) -> EngineRunner:
        self.thread.start()
        return self

    def stop(self) -> None:
        self.stopping = True
        self.wake.set()
        self.thread.join(timeout=10)

    @property
    def num_waiting(self) -> int:
        return len(self.engine.waiting) + sum(1 for c in list(self.inbox) if c[0] == "add")

    @property
    def num_running(self) -> int:
        return len(self.engine.running)

    async def submit(self, prompt: list[int], params: SamplingParams) -> Stream:
        """Queue a request; returns once the engine accepted it (ValueError if it refuses, QueueFull
        when `max_waiting` requests already wait). Iterate the Stream for the outputs."""
        if self.error is not None:
            raise RuntimeError(f"the engine of {self.name} stopped: {self.error}")
        if self.num_waiting >= self.max_waiting:
            raise QueueFull(f"{self.name}: {self.num_waiting} requests are waiting (limit {self.max_waiting})")
        loop = asyncio.get_running_loop()
        rid = f"{self.name}-{next(self.ids)}"
        added = loop.create_future()
        self.pending[rid] = _Pending(loop, asyncio.Queue(), time.perf_counter())
        queue = self.pending[rid].queue
        self._post(("add", rid, prompt, params, added))
        try:
            await added
        except asyncio.CancelledError:
            self._post(("abort", rid))
            raise
        return Stream(self, rid, queue)

    async def generate(self, prompt: list[int], params: SamplingParams) -> AsyncIterator[RequestOutput]:
        """submit + iterate: the outputs of one request; the last has `finished` set."""
        stream = await self.submit(prompt, params)
        try:
            async for out in stream:
                yield out
        finally:
            stream.close()

    def _post(self, command: tuple) -> None:
        self.inbox.append(command)
        self.wake.set()

    # ---- engine thread -----------------------------------------------------------------------------

    def _loop(self) -> None:
        try:
            while not self.stopping:
                self._commands()
                if not self.engine.has_unfinished():
                    self.wake.wait(timeout=0.5)
                    self.wake.clear()
                    continue
                outputs = self.engine.step()
                now = time.perf_counter()
                for out in outputs:
                    self._deliver(out, now)
                self._observe()
        except BaseException as e:  # a bug in a step: fail every request instead of hanging them
            self.error = e
            for p in list(self.pending.values()):
                p.loop.call_soon_threadsafe(p.queue.put_nowait, e)
            raise

    def _commands(self) -> None:
        while self.inbox:
            command = self.inbox.popleft()
            if command[0] == "add":
                _, rid, prompt, params, fut = command
                pending = self.pending[rid]
                try:
                    self.engine.add_request(prompt, params, request_id=rid)
                except ValueError as e:
                    self.pending.pop(rid, None)
                    pending.loop.call_soon_threadsafe(_resolve, fut, e)
                else:
                    pending.loop.call_soon_threadsafe(_resolve, fut, None)
            else:
                rid = command[1]
                if self.engine.abort(rid) and self.metrics is not None:
                    self.metrics.finished(self.name, "abort")
                self.pending.pop(rid, None)

    def _deliver(self, out: RequestOutput, now: float) -> None:
        p = self.pending.get(out.request_id)
        if p is None:
            return
        if self.metrics is not None and out.token_ids:
            if p.first is None:
                self.metrics.ttft(self.name, now - p.arrival)
            else:
                self.metrics.itl(self.name, (now - p.last) / len(out.token_ids))
            self.metrics.tokens(self.name, out.num_prompt_tokens if p.first is None else 0, len(out.token_ids))
        if out.token_ids:
            p.first = p.first or now
            p.last = now
            p.n_out += len(out.token_ids)
        if out.finished:
            self.pending.pop(out.request_id, None)
            if self.metrics is not None:
                if p.n_out > 1:
                    self.metrics.tpot(self.name, (p.last - p.first) / (p.n_out - 1))
                self.metrics.finished(self.name, out.finish_reason)
        p.loop.call_soon_threadsafe(p.queue.put_nowait, out)

    def _observe(self) -> None:
        if self.metrics is not None:
            self.metrics.engine_state(self)


class Stream:
    """The outputs of one accepted request. `close()` (also on garbage collection of an unfinished
    stream) aborts it in the engine, which frees its KV blocks."""

    def __init__(self, runner: EngineRunner, request_id: str, queue: asyncio.Queue):
        self.runner, self.request_id, self.queue, self.finished = runner, request_id, queue, False

    def __aiter__(self) -> Stream:
        return self

    async def __anext__(self) -> RequestOutput:
        if self.finished:
            raise StopAsyncIteration
        out = await self.queue.get()
        if isinstance(out, BaseException):
            self.finished = True
            raise RuntimeError(f"the engine of {self.runner.name} failed: {out}") from out
        self.finished = out.finished
        return out

    def close(self) -> None:
        if not self.finished:
            self.finished = True
            self.runner._post(("abort", self.request_id))

    def __del__(self):
        if not self.finished:
            self.runner._post(("abort", self.request_id))


def _resolve(fut: asyncio.Future, error: BaseException | None) -> None:
    if fut.done():
        return
    if error is None:
        fut.set_result(None)
    else:
        fut.set_exception(error)
