"""The model worker: order, the bounded queue, streaming bridges, and batching of queued jobs."""

from __future__ import annotations

import asyncio
import threading

import pytest

from assistant.errors import BusyError
from assistant.worker import ModelWorker


def test_full_queue_is_busy_not_unbounded() -> None:
    worker = ModelWorker(max_pending=2)
    gate = threading.Event()
    worker.submit(gate.wait)  # occupies the worker
    accepted, refused = 0, 0
    for _ in range(5):
        try:
            worker.submit(lambda: None)
            accepted += 1
        except BusyError as exc:
            refused += 1
            assert "busy" in str(exc)
    gate.set()
    assert refused >= 2 and accepted <= 3


def test_queued_jobs_of_one_key_run_as_one_batch_in_order() -> None:
    worker = ModelWorker(max_pending=16)
    calls: list[list[int]] = []
    gate = threading.Event()

    def double(items: list[int]) -> list[int]:
        calls.append(items)
        return [2 * item for item in items]

    async def scenario() -> list[object]:
        worker.submit(gate.wait)  # hold the worker so the jobs below queue up together
        jobs = [worker.batch("asr", n, double, limit=3) for n in range(5)]
        other = asyncio.wrap_future(worker.submit(lambda: "other"))
        tasks = [asyncio.ensure_future(job) for job in [*jobs, other]]
        await asyncio.sleep(0.05)
        gate.set()
        return await asyncio.gather(*tasks)

    results = asyncio.run(scenario())
    assert results == [0, 2, 4, 6, 8, "other"]
    assert calls == [[0, 1, 2], [3, 4]]


def test_a_failing_batch_fails_each_of_its_jobs() -> None:
    worker = ModelWorker(max_pending=4)

    def broken(items: list[int]) -> list[int]:
        raise RuntimeError("out of memory")

    with pytest.raises(RuntimeError, match="out of memory"):
        asyncio.run(worker.batch("asr", 1, broken, limit=4))


def test_stream_bridges_items_and_cancels_when_left_early() -> None:
    worker = ModelWorker(max_pending=4)
    cancel = threading.Event()
    produced: list[int] = []

    def numbers():
        for n in range(1000):
            if cancel.is_set():
                return
            produced.append(n)
            yield str(n)
            threading.Event().wait(0.001)

    async def take_three() -> list[str]:
        got = []
        async for item in worker.stream(numbers, cancel):
            got.append(item)
            if len(got) == 3:
                break
        return got

    assert asyncio.run(take_three()) == ["0", "1", "2"]
    assert cancel.is_set()
    assert asyncio.run(worker.run(lambda: "free")) == "free"  # the worker is not stuck on the abandoned stream
    assert len(produced) < 1000


def test_interactive_jobs_go_before_bulk_ones():
    """A long upload's units queue as bulk: a chat request or voice turn that arrives runs after the unit in progress,
    before the upload's next unit."""
    worker = ModelWorker(max_pending=8)
    order: list[str] = []
    gate, running = threading.Event(), threading.Event()
    first = worker.submit(lambda: (running.set(), gate.wait(5), order.append("bulk 1")), bulk=True)
    assert running.wait(5)
    bulk = [worker.submit(lambda n=n: order.append(f"bulk {n}"), bulk=True) for n in (2, 3)]
    interactive = worker.submit(lambda: order.append("chat"))
    gate.set()
    for future in (first, *bulk, interactive):
        future.result(timeout=5)
    assert order == ["bulk 1", "chat", "bulk 2", "bulk 3"]
    worker.close()


def test_bulk_and_batched_jobs_share_the_worker_without_losing_any():
    worker = ModelWorker(max_pending=64)
    results = [worker.submit(lambda n=n: n, bulk=n % 2 == 0) for n in range(40)]
    assert [future.result(timeout=5) for future in results] == list(range(40))
    worker.close()


def test_stop_fails_queued_jobs_refuses_new_ones_and_lets_the_running_one_finish() -> None:
    from assistant.errors import ShutdownError

    worker = ModelWorker(max_pending=8)
    gate, started = threading.Event(), threading.Event()

    def running() -> str:
        started.set()
        gate.wait(5)
        return "finished"

    first = worker.submit(running)
    assert started.wait(5)
    queued = [worker.submit(lambda: "never"), worker.submit(lambda: "never", bulk=True)]
    error = ShutdownError("stopping")
    worker.stop(error)
    for future in queued:
        with pytest.raises(ShutdownError):
            future.result(timeout=5)
    with pytest.raises(ShutdownError):
        worker.submit(lambda: None)
    gate.set()
    assert first.result(timeout=5) == "finished"

    async def stream_after_stop() -> None:
        with pytest.raises(ShutdownError):
            async for _ in worker.stream(lambda: iter(["x"]), threading.Event()):
                pass

    asyncio.run(stream_after_stop())


def test_a_stream_refused_in_the_queue_ends_with_the_error_instead_of_hanging() -> None:
    from assistant.errors import ShutdownError

    worker = ModelWorker(max_pending=8)
    gate = threading.Event()
    worker.submit(lambda: gate.wait(5))

    async def consume() -> None:
        stream = worker.stream(lambda: iter(["never"]), threading.Event())
        pending = asyncio.ensure_future(stream.__anext__())
        await asyncio.sleep(0.1)  # queued behind the gate
        worker.stop(ShutdownError("stopping"))
        with pytest.raises(ShutdownError):
            await asyncio.wait_for(pending, 5)

    asyncio.run(consume())
    gate.set()


def test_a_stream_is_refused_busy_when_asked_for_before_any_item_is_awaited() -> None:
    """The server queues a streamed reply before it sends a byte: a full queue is a plain 503, not an SSE event."""
    worker = ModelWorker(max_pending=1)
    gate, started = threading.Event(), threading.Event()
    worker.submit(lambda: (started.set(), gate.wait(5)))  # running
    assert started.wait(5)
    worker.submit(lambda: None)  # the one queued job

    async def ask() -> None:
        with pytest.raises(BusyError):
            worker.stream(lambda: iter(["x"]), threading.Event())

    asyncio.run(ask())
    gate.set()
