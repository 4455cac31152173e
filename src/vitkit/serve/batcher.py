"""Dynamic batching: concurrent requests share one forward pass.

Each request submits one preprocessed image (C, H, W). The batcher waits for the first one,
then gathers more for at most `max_wait_ms` or until `max_batch` are waiting, stacks them and
runs `run(batch)` once in the model thread, off the event loop. While a batch runs, new
requests queue up and form the next one, so under load batches fill without waiting.
Images of different sizes (a processor without a fixed output size) run as separate batches.
A request may carry a deadline (the event loop's clock): one still queued when its batch forms
after that is dropped with `Expired` and never reaches the model; one whose future was
cancelled (its client went away) is dropped too.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import Callable
from concurrent.futures import Executor
from typing import Any

import torch
from torch import Tensor

RunBatch = Callable[[Tensor], list[Any]]
"""(B, C, H, W) -> one result per row."""


class Expired(Exception):
    """A request's deadline passed while it was queued: it was dropped before the model."""


class Batcher:
    """Gather `submit`ted images into batches of at most `max_batch` for `run`."""

    def __init__(
        self,
        run: RunBatch,
        executor: Executor,
        *,
        max_batch: int = 8,
        max_wait_ms: float = 20.0,
        on_batch: Callable[[int, float], None] | None = None,
    ):
        if max_batch < 1:
            raise ValueError(f"max_batch must be at least 1, got {max_batch}")
        if max_wait_ms < 0:
            raise ValueError(f"max_wait_ms must be >= 0, got {max_wait_ms}")
        self.run = run
        self.executor = executor
        self.max_batch = max_batch
        self.max_wait = max_wait_ms / 1000.0
        self.on_batch = on_batch
        self._queue: asyncio.Queue[tuple[Tensor, asyncio.Future, float | None]] | None = None
        self._task: asyncio.Task | None = None

    def start(self) -> None:
        """Start the gathering task on the running event loop."""
        self._queue = asyncio.Queue()
        self._task = asyncio.get_running_loop().create_task(self._loop(), name="vitkit-batcher")

    async def stop(self) -> None:
        """Stop gathering; requests still waiting get a RuntimeError."""
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
            self._task = None
        while self._queue is not None and not self._queue.empty():
            _, future, _ = self._queue.get_nowait()
            if not future.done():
                future.set_exception(RuntimeError("the server is shutting down"))

    async def submit(self, image: Tensor, deadline: float | None = None) -> Any:
        """Queue one (C, H, W) image and wait for its row of the batch's result; past
        `deadline` (`loop.time()`) before its batch runs, raise `Expired` instead. Cancelling
        the caller takes the image out of the next batch."""
        if self._queue is None:
            raise RuntimeError("Batcher.start() was not called")
        future = asyncio.get_running_loop().create_future()
        await self._queue.put((image, future, deadline))
        return await future

    async def _loop(self) -> None:
        assert self._queue is not None
        loop = asyncio.get_running_loop()
        while True:
            items = [await self._queue.get()]
            deadline = loop.time() + self.max_wait
            while len(items) < self.max_batch:
                if not self._queue.empty():
                    items.append(self._queue.get_nowait())
                    continue
                remaining = deadline - loop.time()
                if remaining <= 0:
                    break
                try:
                    items.append(await asyncio.wait_for(self._queue.get(), remaining))
                except TimeoutError:
                    break
            now = loop.time()
            groups: dict[tuple, list[tuple[Tensor, asyncio.Future]]] = {}
            for x, f, deadline in items:
                if f.done():  # cancelled: the client went away
                    continue
                if deadline is not None and now > deadline:
                    f.set_exception(Expired())
                    continue
                groups.setdefault((tuple(x.shape), x.dtype), []).append((x, f))
            for group in groups.values():
                await self._run_group(loop, group)

    async def _run_group(self, loop, group: list[tuple[Tensor, asyncio.Future]]) -> None:
        batch = torch.stack([x for x, _ in group])  # (B, C, H, W)
        try:
            rows = await loop.run_in_executor(self.executor, self._call, batch)
        except Exception as exc:  # the model failed: every request of the batch learns why
            for _, f in group:
                if not f.done():
                    f.set_exception(exc)
            return
        for (_, f), row in zip(group, rows):
            if not f.done():
                f.set_result(row)

    def _call(self, batch: Tensor) -> list[Any]:
        start = time.perf_counter()
        rows = self.run(batch)
        if self.on_batch is not None:
            self.on_batch(len(batch), time.perf_counter() - start)
        return rows
