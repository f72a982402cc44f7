"""The engine behind asyncio: one thread per model steps the (synchronous) Engine; requests come in
through a command inbox and their outputs go back to per-request asyncio queues.

    runner = EngineRunner(engine, name="small", max_waiting=256, metrics=metrics)
    runner.start()
    async for out in runner.generate(prompt_ids, SamplingParams(max_tokens=32)):   # ValueError: bad request
        ...                    # leaving the loop early (client gone) aborts the request, freeing its blocks

The runner is the only holder of its Engine. What the server may know about the model it exposes as
plain values fixed at construction (`tokenizer`, `context`, `vocab_size`, `n_params`), plus `check`,
the engine's own validation of a request (it reads only the engine's fixed configuration).

Two threads, and what each touches:
- the event loop posts ("add", …) and ("abort", …) to the inbox and awaits a future the engine thread
  resolves, so validation errors (prompt over the context, …) come back as ValueError before any output;
  `QueueFull` when `max_waiting` requests already wait. It never reads the engine's queues: the load it
  sees is `stats()`, a frozen snapshot.
- the engine thread drains the inbox, steps the engine, puts outputs on the requests' queues with
  `call_soon_threadsafe`, and publishes a new `EngineStats` snapshot after the commands and after each step.
"""

from __future__ import annotations

import asyncio
import itertools
import threading
import time
from collections import deque
from collections.abc import AsyncIterator
from collections.abc import Sequence as Seq
from dataclasses import dataclass, replace

from gptstack.infer.engine import Engine, ImageInput, RequestOutput
from gptstack.infer.sampling import SamplingParams


class QueueFull(Exception):
    """The model's waiting queue is full (HTTP 503)."""


@dataclass(frozen=True)
class EngineStats:
    """The engine's load as the engine thread last published it (what /metrics shows)."""

    running: int = 0  # sequences in the running batch
    waiting: int = 0  # requests waiting to be scheduled (stats(): also those not yet handed to the engine)
    kv_usage: float = 0.0  # fraction of KV blocks held by sequences
    prefix_hit_rate: float = 0.0  # prompt tokens served from the prefix cache / prompt tokens queried
    preemptions: int = 0  # since start


@dataclass
class _Pending:
    loop: asyncio.AbstractEventLoop
    queue: asyncio.Queue
    arrival: float
    first: float | None = None
    last: float | None = None
    n_out: int = 0


class EngineRunner:
    def __init__(self, engine: Engine, name: str, max_waiting: int, metrics=None):
        self.engine, self.name, self.metrics, self.max_waiting = engine, name, metrics, max_waiting
        self.tokenizer = engine.tokenizer
        self.context = engine.capacity  # tokens one request spans (prompt + output): the context, or a smaller pool
        self.vocab_size = engine.vocab_size  # prompt token ids lie in [0, vocab_size)
        self.vision_config = engine.vision_config  # the vision tower's config (None: the model takes no images)
        self.n_params = sum(p.numel() for p in engine.model.parameters())
        self.inbox: deque = deque()  # event loop → engine thread
        self.wake = threading.Event()
        self.pending: dict[str, _Pending] = {}
        self.ids = itertools.count()
        self.thread = threading.Thread(target=self._loop, name=f"engine-{name}", daemon=True)
        self.stopping = False
        self.error: BaseException | None = None
        self._submitting = 0  # adds posted and not yet answered (owned by the event loop)
        self._stats = EngineStats()
        self._publish()

    # ---- asyncio side ----------------------------------------------------------------------------

    def start(self) -> EngineRunner:
        self.thread.start()
        return self

    def stop(self) -> None:
        self.stopping = True
        self.wake.set()
        self.thread.join(timeout=10)

    def stats(self) -> EngineStats:
        """The last published snapshot; `waiting` also counts requests still on their way in."""
        snapshot = self._stats
        return replace(snapshot, waiting=snapshot.waiting + self._submitting)

    @property
    def num_waiting(self) -> int:
        return self.stats().waiting

    @property
    def num_running(self) -> int:
        return self._stats.running

    def room(self) -> int:
        """How many more requests may wait now (submit raises QueueFull past it)."""
        return self.max_waiting - self.num_waiting

    def check(self, prompt: list[int], params: SamplingParams, images: Seq[ImageInput] = ()) -> None:
        """ValueError (ContextLengthExceeded for the context) if the engine would refuse the request."""
        self.engine.check_request(prompt, params, images)

    async def submit(self, prompt: list[int], params: SamplingParams, images: Seq[ImageInput] = ()) -> Stream:
        """Queue a request (with its ImageInputs); returns once the engine accepted it (ValueError if it
        refuses, QueueFull when `max_waiting` requests already wait). Iterate the Stream for the outputs."""
        if self.error is not None:
            raise RuntimeError(f"the engine of {self.name} stopped: {self.error}")
        if self.num_waiting >= self.max_waiting:
            raise QueueFull(f"{self.name}: {self.num_waiting} requests are waiting (limit {self.max_waiting})")
        loop = asyncio.get_running_loop()
        rid = f"{self.name}-{next(self.ids)}"
        added = loop.create_future()
        self.pending[rid] = _Pending(loop, asyncio.Queue(), time.perf_counter())
        queue = self.pending[rid].queue
        self._submitting += 1
        self._post(("add", rid, prompt, params, images, added))
        try:
            await added
        except asyncio.CancelledError:
            self._post(("abort", rid))
            raise
        finally:
            self._submitting -= 1
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
                self._publish()
                now = time.perf_counter()
                for out in outputs:
                    self._deliver(out, now)
        except BaseException as e:  # a bug in a step: fail every request instead of hanging them
            self.error = e
            for p in list(self.pending.values()):
                p.loop.call_soon_threadsafe(p.queue.put_nowait, e)
            raise

    def _commands(self) -> None:
        """Apply the inbox, then publish the new load before answering the adds: an accepted request
        is always in `stats().waiting`, as published or as an add in flight."""
        if not self.inbox:
            return
        answers = []
        while self.inbox:
            command = self.inbox.popleft()
            if command[0] == "add":
                answers.append(self._add(*command[1:]))
            else:
                self._abort(command[1])
        self._publish()
        for loop, fut, error in answers:
            loop.call_soon_threadsafe(_resolve, fut, error)

    def _add(self, rid: str, prompt: list[int], params: SamplingParams, images, fut: asyncio.Future):
        pending = self.pending[rid]
        try:
            self.engine.add_request(prompt, params, request_id=rid, images=images)
        except ValueError as e:
            self.pending.pop(rid, None)
            return pending.loop, fut, e
        return pending.loop, fut, None

    def _abort(self, rid: str) -> None:
        if self.engine.abort(rid) and self.metrics is not None:
            self.metrics.finished(self.name, "abort")
        self.pending.pop(rid, None)

    def _publish(self) -> None:
        e = self.engine
        self._stats = EngineStats(
            len(e.running), len(e.waiting), e.kv_usage, e.prefix_hit_rate, e.stats["preemptions"]
        )  # one reference assignment: readers see the old snapshot or the new one, never a mix

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


async def merge(streams: list[Stream]) -> AsyncIterator[tuple[int, RequestOutput]]:
    """Outputs of several streams as they come, tagged with their index; closing it aborts the rest."""
    queue: asyncio.Queue = asyncio.Queue()

    async def pump(i: int, s: Stream):
        try:
            async for out in s:
                await queue.put((i, out))
        except Exception as e:
            await queue.put((i, e))

    tasks = [asyncio.create_task(pump(i, s)) for i, s in enumerate(streams)]
    left = len(streams)
    try:
        while left:
            i, out = await queue.get()
            if isinstance(out, Exception):
                raise out
            left -= out.finished
            yield i, out
    finally:
        for t in tasks:
            t.cancel()
        for s in streams:
            s.close()


def _resolve(fut: asyncio.Future, error: BaseException | None) -> None:
    if fut.done():
        return
    if error is None:
        fut.set_result(None)
    else:
        fut.set_exception(error)
