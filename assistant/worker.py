"""One worker thread for all model work, with bounded queues.

Models are loaded once and are not thread-safe (a KV cache, a CUDA stream), so every transcription and every reply
runs on this one thread, in arrival order, interactive work first: a job submitted as ``bulk`` (a long upload's
transcription, a unit of a few windows at a time) runs only when no interactive job (a voice turn, a chat
completion) waits, so an interactive request waits at most for the one bulk unit already running. Jobs submitted
with ``batch`` and the same key that wait in the queue together are run as one call (several sessions' utterances
transcribed in one batch where the backend batches). The queues are bounded: when ``max_pending`` jobs wait, a new
one is refused with a ``busy`` error at once instead of queueing without end. Async code (the server) awaits
results and streams through ``asyncio`` bridges; a cancelled stream stops within a token and frees the worker.
"""

from __future__ import annotations

import asyncio
import contextlib
import queue
import threading
import time
from collections.abc import AsyncIterator, Callable, Hashable, Iterator
from concurrent.futures import Future
from dataclasses import dataclass
from typing import Any, TypeVar

from assistant.errors import BusyError

T = TypeVar("T")
_DONE = object()


@dataclass
class _Batchable:
    """One item of work that may run together with other queued items of the same key."""

    key: Hashable
    item: Any
    run_many: Callable[[list[Any]], list[Any]]
    limit: int


class _Job(Future):  # type: ignore[type-arg]
    """A job's future, which knows when it was queued."""

    def __init__(self) -> None:
        super().__init__()
        self.queued_at = time.monotonic()


class ModelWorker:
    def __init__(self, max_pending: int, *, name: str = "model-worker") -> None:
        self._jobs: queue.Queue[tuple[Callable[[], Any] | _Batchable, Future[Any]] | None] = queue.Queue(
            maxsize=max_pending
        )
        self._bulk: queue.Queue[tuple[Callable[[], Any], Future[Any]]] = queue.Queue(maxsize=max_pending)
        self._ready = threading.Semaphore(0)  # one release per job put in either queue (or close)
        self.on_wait: Callable[[float], None] | None = None  # told how long each job waited (metrics)
        self._held: list[tuple[Callable[[], Any] | _Batchable, Future[Any]]] = []  # taken while gathering a batch
        self._busy = threading.Event()  # set while a job runs
        self._stopped: Exception | None = None  # set by stop(): every job from then on fails with it
        self._thread = threading.Thread(target=self._run, name=name, daemon=True)
        self._thread.start()

    async def batch(self, key: Hashable, item: Any, run_many: Callable[[list[Any]], list[Any]], *, limit: int) -> Any:
        """Run ``run_many([item, ...])`` for this item, together with up to ``limit`` queued items of ``key``."""
        return await asyncio.wrap_future(self._enqueue(_Batchable(key, item, run_many, limit)))

    def submit(self, job: Callable[[], T], *, bulk: bool = False) -> Future[T]:
        """Queue ``job``; ``bulk`` jobs run only when no interactive job waits."""
        return self._enqueue(job, bulk=bulk)

    def _enqueue(self, job: Callable[[], Any] | _Batchable, *, bulk: bool = False) -> Future[Any]:
        if self._stopped is not None:
            raise self._stopped
        future: Future[Any] = _Job()
        try:
            if bulk:
                assert not isinstance(job, _Batchable), "batched jobs are interactive"
                self._bulk.put_nowait((job, future))
            else:
                self._jobs.put_nowait((job, future))
        except queue.Full:
            raise BusyError(
                f"the server is busy ({self._jobs.maxsize} requests are waiting for the model); try again shortly"
            ) from None
        self._ready.release()
        return future

    async def run(self, job: Callable[[], T]) -> T:
        return await asyncio.wrap_future(self.submit(job))

    def stream(self, make: Callable[[], Iterator[T]], cancel: threading.Event) -> AsyncIterator[T]:
        """Queue ``make()`` on the worker now (BusyError at once when the queue is full, before any byte of a
        response) and return an async iterator of its items as they come; leaving it early sets ``cancel``."""
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

        def not_run(future: Future[Any]) -> None:  # refused by stop() before produce() ran
            if not future.cancelled() and future.exception() is not None:
                loop.call_soon_threadsafe(items.put_nowait, future.exception())
                loop.call_soon_threadsafe(items.put_nowait, _DONE)

        self.submit(produce).add_done_callback(not_run)
        return _drain(items, cancel)

    @property
    def pending(self) -> int:
        """Jobs waiting (not the one running)."""
        return self._jobs.qsize() + self._bulk.qsize() + len(self._held)

    @property
    def idle(self) -> bool:
        """No job running and none waiting: work that must never delay others (partial transcripts) may start."""
        return not self._busy.is_set() and self._jobs.empty() and self._bulk.empty() and not self._held

    def stop(self, error: Exception) -> None:
        """Refuse new jobs with ``error`` and fail the queued ones with it (the server is stopping). The job running
        finishes: a generation stops at its cancel event, a transcription unit at its end."""
        self._stopped = error
        closed = False
        for jobs in (self._jobs, self._bulk):
            while True:
                try:
                    entry = jobs.get_nowait()
                except queue.Empty:
                    break
                if entry is None:
                    closed = True
                elif entry[1].set_running_or_notify_cancel():
                    entry[1].set_exception(error)
        if closed:  # close() was called: the thread still ends
            self._jobs.put_nowait(None)

    def close(self) -> None:
        self._jobs.put(None)
        self._ready.release()

    def join(self, timeout_s: float) -> bool:
        """After ``close``: wait (at most ``timeout_s``) for the thread to end, the job running and those queued
        done; whether it ended. A model must not be freed under a job still running on it: llama.cpp's context
        freed during a decode (Ctrl-C in a spoken reply, then the model closed) crashed the process."""
        self._thread.join(timeout_s)
        return not self._thread.is_alive()

    def _run(self) -> None:
        while (entry := self._next()) is not None:
            job, future = entry
            self._busy.set()
            try:
                self._run_one(job, future)
            finally:
                self._busy.clear()

    def _run_one(self, job: Callable[[], Any] | _Batchable, future: Future[Any]) -> None:
        if self._stopped is not None:  # held back while a batch was gathered, or queued as stop() drained
            if future.set_running_or_notify_cancel():
                future.set_exception(self._stopped)
            return
        if isinstance(job, _Batchable):
            self._run_batch(job, future)
            return
        if not future.set_running_or_notify_cancel():
            return
        self._waited(future)
        try:
            future.set_result(job())
        except BaseException as exc:
            future.set_exception(exc)

    def _waited(self, future: Future[Any]) -> None:
        """Tell ``on_wait`` how long a job that starts now waited (every future here is a ``_Job``)."""
        if self.on_wait is not None:
            self.on_wait(time.monotonic() - future.queued_at)  # type: ignore[attr-defined]

    def _next(self) -> tuple[Callable[[], Any] | _Batchable, Future[Any]] | None:
        """The next job: one held back while gathering a batch, else an interactive one, else a bulk one."""
        if self._held:
            return self._held.pop(0)
        while True:
            self._ready.acquire()  # a permit per queued job; a spare one (see _run_batch) just loops
            for jobs in (self._jobs, self._bulk):
                with contextlib.suppress(queue.Empty):
                    return jobs.get_nowait()  # type: ignore[return-value]

    def _run_batch(self, first: _Batchable, future: Future[Any]) -> None:
        """Gather the queued jobs of the same key (others keep their order) and run them as one call."""
        members = [(first, future)]
        while len(members) < first.limit:
            try:
                entry = self._jobs.get_nowait()
            except queue.Empty:
                break
            self._ready.acquire(blocking=False)  # its permit (if not released yet, _next absorbs it later)
            if entry is not None and isinstance(entry[0], _Batchable) and entry[0].key == first.key:
                members.append((entry[0], entry[1]))  # type: ignore[arg-type]
            else:
                self._held.append(entry)  # type: ignore[arg-type]
        live = [(job, f) for job, f in members if f.set_running_or_notify_cancel()]
        for _, started in live:
            self._waited(started)
        if not live:
            return
        try:
            results = first.run_many([job.item for job, _ in live])
        except BaseException as exc:
            for _, f in live:
                f.set_exception(exc)
            return
        for (_, f), result in zip(live, results, strict=True):
            f.set_result(result)


async def _drain(items: asyncio.Queue[object], cancel: threading.Event) -> AsyncIterator[str]:
    try:
        while (item := await items.get()) is not _DONE:
            if isinstance(item, BaseException):
                raise item
            yield item  # type: ignore[misc]
    finally:
        cancel.set()  # a client that went away stops the generation; the worker is free again
