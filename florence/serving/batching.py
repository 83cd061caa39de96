"""An asyncio micro-batcher: requests that arrive together go through the model as one batch."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable, Sequence
from concurrent.futures import Executor
from dataclasses import dataclass
from typing import Generic, TypeVar

_logger = logging.getLogger(__name__)

Item = TypeVar("Item")
Result = TypeVar("Result")


@dataclass
class BatchStats:
    """Counts of the batches a MicroBatcher ran: batches, items in them, and the largest batch size."""

    batches: int = 0
    items: int = 0
    largest: int = 0


class MicroBatcher(Generic[Item, Result]):
    """Collect items submitted within ``max_wait_ms`` of the first into batches of up to ``max_batch_size``.

    ``function`` maps a list of items to a list of results of the same length, and runs in
    ``executor`` (a single-thread executor shared by the batchers of one model keeps model
    calls one at a time). If ``function`` raises, every request of that batch gets the error.
    Call ``start`` inside a running event loop before ``submit`` and ``stop`` at shutdown.
    """

    def __init__(
        self,
        name: str,
        function: Callable[[list[Item]], Sequence[Result]],
        executor: Executor | None = None,
        max_batch_size: int = 32,
        max_wait_ms: float = 5.0,
    ) -> None:
        if max_batch_size < 1:
            raise ValueError(f"max_batch_size must be at least 1, got {max_batch_size}")
        self.name = name
        self.function = function
        self.executor = executor
        self.max_batch_size = max_batch_size
        self.max_wait = max_wait_ms / 1000
        self.stats = BatchStats()
        self._queue: asyncio.Queue[tuple[Item, asyncio.Future]] | None = None
        self._worker: asyncio.Task | None = None

    @property
    def running(self) -> bool:
        return self._worker is not None and not self._worker.done()

    async def start(self) -> None:
        self._queue = asyncio.Queue()
        self._worker = asyncio.create_task(self._run(), name=f"batcher-{self.name}")

    async def stop(self) -> None:
        if self._worker is None:
            return
        self._worker.cancel()
        try:
            await self._worker
        except asyncio.CancelledError:
            pass
        self._worker = None

    def reset_stats(self) -> None:
        self.stats = BatchStats()

    async def submit(self, item: Item) -> Result:
        if not self.running or self._queue is None:
            raise RuntimeError(f"batcher {self.name} is not running; call start() first")
        future = asyncio.get_running_loop().create_future()
        await self._queue.put((item, future))
        return await future

    async def _collect(self) -> list[tuple[Item, asyncio.Future]]:
        """Wait for one item, then take more until the batch is full or ``max_wait`` has passed."""
        assert self._queue is not None
        batch = [await self._queue.get()]
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self.max_wait
        while len(batch) < self.max_batch_size:
            if not self._queue.empty():
                batch.append(self._queue.get_nowait())
                continue
            remaining = deadline - loop.time()
            if remaining <= 0:
                break
            try:
                batch.append(await asyncio.wait_for(self._queue.get(), remaining))
            except TimeoutError:
                break
        return batch

    async def _run(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            batch = await self._collect()
            batch = [(item, future) for item, future in batch if not future.cancelled()]
            if not batch:
                continue

            self.stats.batches += 1
            self.stats.items += len(batch)
            self.stats.largest = max(self.stats.largest, len(batch))
            try:
                results = await loop.run_in_executor(self.executor, self.function, [item for item, _ in batch])
                if len(results) != len(batch):
                    raise RuntimeError(f"batcher {self.name}: {len(batch)} items gave {len(results)} results")
            except Exception as error:
                _logger.exception("batcher %s: batch of %d failed", self.name, len(batch))
                for _, future in batch:
                    if not future.done():
                        future.set_exception(error)
                continue

            for (_, future), result in zip(batch, results):
                if not future.done():
                    future.set_result(result)
