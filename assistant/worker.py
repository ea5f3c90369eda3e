"""One worker thread for all model work, with a bounded queue.

Models are loaded once and are not thread-safe (a KV cache, a CUDA stream), so every transcription and every reply
runs on this one thread, in arrival order. The queue is bounded: when ``max_pending`` jobs wait, a new one is refused
with a ``busy`` error at once instead of queueing without end. Async code (the server) awaits results and streams
through ``asyncio`` bridges; a cancelled stream stops within a token and frees the worker.
"""

from __future__ import annotations

import asyncio
import queue
import threading
from collections.abc import AsyncIterator, Callable, Iterator
from concurrent.futures import Future
from typing import Any, TypeVar

from assistant.errors import BusyError

T = TypeVar("T")
_DONE = object()


class ModelWorker:
    def __init__(self, max_pending: int) -> None:
        self._jobs: queue.Queue[tuple[Callable[[], Any], Future[Any]] | None] = queue.Queue(maxsize=max_pending)
        self._thread = threading.Thread(target=self._run, name="model-worker", daemon=True)
        self._thread.start()

    def submit(self, job: Callable[[], T]) -> Future[T]:
        future: Future[T] = Future()
        try:
            self._jobs.put_nowait((job, future))
        except queue.Full:
            raise BusyError(
                f"the server is busy ({self._jobs.maxsize} requests are waiting for the model); try again shortly"
            ) from None
        return future

    async def run(self, job: Callable[[], T]) -> T:
        return await asyncio.wrap_future(self.submit(job))

    async def stream(self, make: Callable[[], Iterator[str]], cancel: threading.Event) -> AsyncIterator[str]:
        """Run ``make()`` on the worker and yield its items here as they come; leaving early sets ``cancel``."""
        loop = asyncio.get_running_loop()
        items: asyncio.Queue[object] = asyncio.Queue()

        def produce() -> None:
            try:
                for item in make():
                    loop.call_soon_threadsafe(items.put_nowait, item)
            except BaseException as exc:  # handed to the awaiting side, which raises it there
                loop.call_soon_threadsafe(items.put_nowait, exc)
            finally:
                loop.call_soon_threadsafe(items.put_nowait, _DONE)

        self.submit(produce)
        try:
            while (item := await items.get()) is not _DONE:
                if isinstance(item, BaseException):
                    raise item
                yield item  # type: ignore[misc]
        finally:
            cancel.set()  # a client that went away stops the generation; the worker is free again

    def close(self) -> None:
        self._jobs.put(None)

    def _run(self) -> None:
        while (entry := self._jobs.get()) is not None:
            job, future = entry
            if not future.set_running_or_notify_cancel():
                continue
            try:
                future.set_result(job())
            except BaseException as exc:
                future.set_exception(exc)
