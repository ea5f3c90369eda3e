"""Graceful stop of ``assistant serve`` on SIGTERM or SIGINT, bounded in time; a second signal exits at once.

On the first signal: the listening sockets close (no new connections); every generation in flight is cancelled
within a token and every queued model job is refused; uploads stop before their next unit; each Realtime session
ends its reply where it is (a cut reply, saved like a barge-in), tells its client with an ``error`` event and
closes with 1001 and a reason; HTTP requests in flight answer 503 (a stream ends with an error event). Then
uvicorn's own shutdown runs. Whatever still runs after ``server.shutdown_timeout_s`` is cancelled, and a watchdog
ends the process HARD_STOP_MARGIN_S later in any case (conversation saves are atomic renames: a file is always one
whole version). systemd and Kubernetes send SIGTERM and wait 90 s / 30 s before SIGKILL; this exits well before.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import signal
import sys
import threading
from collections.abc import Awaitable, Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from types import FrameType
from typing import Any

import uvicorn

from assistant.errors import ShutdownError

HARD_STOP_MARGIN_S = 3.0
SHUTDOWN_MESSAGE = "the server is shutting down; reconnect or retry when it is back"


class Shutdown:
    """What the stop reaches: cancel events of generations in flight and the closers of open sessions.
    Thread-safe: generations register from the event loop, upload threads check ``stopping``."""

    def __init__(self) -> None:
        self._event = threading.Event()
        self._cancels: set[threading.Event] = set()
        self._closers: set[Callable[[], Awaitable[None]]] = set()
        self._lock = threading.Lock()

    @property
    def stopping(self) -> bool:
        return self._event.is_set()

    def check(self) -> None:
        """Raise ShutdownError once the stop has begun (work about to start is refused)."""
        if self._event.is_set():
            raise ShutdownError(SHUTDOWN_MESSAGE)

    @contextlib.contextmanager
    def cancellable(self, cancel: threading.Event | None = None) -> Iterator[threading.Event]:
        """A cancel event for one generation (``cancel``, or a new one), set by the stop (at once when the stop has
        begun already)."""
        cancel = cancel or threading.Event()
        with self._lock:
            self._cancels.add(cancel)
            if self._event.is_set():
                cancel.set()
        try:
            yield cancel
        finally:
            with self._lock:
                self._cancels.discard(cancel)

    @contextlib.contextmanager
    def closing(self, close: Callable[[], Awaitable[None]]) -> Iterator[None]:
        """Register ``close`` (a session's goodbye) for the stop to await while the session runs."""
        with self._lock:
            self._closers.add(close)
        try:
            yield
        finally:
            with self._lock:
                self._closers.discard(close)

    async def begin(self, timeout_s: float) -> None:
        """Cancel what runs and await the sessions' goodbyes, for at most ``timeout_s``."""
        with self._lock:
            self._event.set()
            for cancel in self._cancels:
                cancel.set()
            closers = list(self._closers)
        if closers:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(asyncio.gather(*(c() for c in closers), return_exceptions=True), timeout_s)


class GracefulServer(uvicorn.Server):
    """uvicorn's server with our stop in front of its own: ``stop(timeout_s)`` runs on the first signal before
    uvicorn closes connections (it would close WebSockets with 1012 and no reason); a second signal, or the
    watchdog, ends the process at once."""

    def __init__(self, config: uvicorn.Config, stop: Callable[[float], Awaitable[None]], timeout_s: float) -> None:
        super().__init__(config)
        self._stop = stop
        self._timeout_s = timeout_s
        self._signals = 0
        self._loop: asyncio.AbstractEventLoop | None = None
        self._stopping: asyncio.Task[None] | None = None

    @property
    def signalled(self) -> bool:
        return self._signals > 0

    async def serve(self, sockets: Any = None) -> None:
        self._loop = asyncio.get_running_loop()
        # asyncio.run would wait at its end for every to_thread call, such as an upload thread waiting on a
        # transcription unit: the stop must not
        self._loop.set_default_executor(_NoWaitExecutor(thread_name_prefix="asyncio"))
        await super().serve(sockets)

    def exit_after_stop(self) -> None:
        """After a stop by signal: end the process now, not after threads still finishing a model call (the
        interpreter would join them); everything a client was promised has been sent or refused by now."""
        if self.signalled:
            with contextlib.suppress(OSError, ValueError):
                sys.stdout.flush()
                sys.stderr.flush()
            os._exit(0)

    def handle_exit(self, sig: int, frame: FrameType | None) -> None:
        self._signals += 1
        name = signal.Signals(sig).name
        if self._signals > 1 or self._loop is None:
            _say(f"{name}, a second signal: exiting now")
            os._exit(128 + sig)
        _say(f"{name}: stopping (cancelling work in flight, telling clients); {name} again exits at once")
        watchdog = threading.Timer(self._timeout_s + HARD_STOP_MARGIN_S, _hard_stop, args=(self._timeout_s,))
        watchdog.daemon = True
        watchdog.start()
        self._loop.call_soon_threadsafe(self._begin)

    def _begin(self) -> None:
        # uvicorn logs the requests it cancels at the end of the stop as an ERROR; they are answered 503 here
        logging.getLogger("uvicorn.error").addFilter(_ExpectedCancels())
        for server in self.servers:  # no new connections from now on
            server.close()
        self._stopping = asyncio.ensure_future(self._stop_then_exit())

    async def _stop_then_exit(self) -> None:
        try:
            await self._stop(self._timeout_s / 2)  # the other half is uvicorn's (timeout_graceful_shutdown)
        finally:
            self.should_exit = True  # uvicorn's shutdown: connections, then tasks, within timeout_graceful_shutdown


class _ExpectedCancels(logging.Filter):
    """Drops uvicorn's "Cancel N running task(s), timeout graceful shutdown exceeded": a planned part of the stop."""

    def filter(self, record: logging.LogRecord) -> bool:
        return not str(record.msg).startswith("Cancel ")


class _NoWaitExecutor(ThreadPoolExecutor):
    """The event loop's default executor, whose shutdown does not wait for calls still running."""

    def shutdown(self, wait: bool = True, *, cancel_futures: bool = False) -> None:
        super().shutdown(wait=False, cancel_futures=True)


def _hard_stop(timeout_s: float) -> None:
    _say(f"work did not stop within server.shutdown_timeout_s ({timeout_s:g} s) + {HARD_STOP_MARGIN_S:g} s: exiting")
    os._exit(1)


def _say(line: str) -> None:
    """One line on stderr, written with os.write: a signal handler may interrupt a print in progress."""
    with contextlib.suppress(OSError):
        os.write(sys.stderr.fileno(), f"assistant serve: {line}\n".encode(errors="replace"))
