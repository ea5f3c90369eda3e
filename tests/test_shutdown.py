"""Graceful stop of a real `assistant serve` process: SIGTERM while a 20-minute file is transcribed, a chat reply
streams over HTTP and a Realtime session's reply is generated and saved; a second signal exits at once.

Clients are the official openai SDK and websockets; the saved conversation is read back with Conversation.load."""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import json
import signal
import socket
import time
from pathlib import Path
from typing import Any

import pytest

from assistant.conversation import Conversation
from tests.conftest import meeting_speech, require_offline_models
from tests.conftest import served_chat_model as served
from tests.test_server import events_until, start_server, ws_url

pytestmark = [pytest.mark.real_model, pytest.mark.slow, pytest.mark.reliability]
openai = pytest.importorskip("openai")
websockets = pytest.importorskip("websockets")

EXIT_WITHIN_S = 10.0  # the bound, whatever is running


def test_sigterm_mid_work_tells_every_client_keeps_the_saved_conversation_whole_and_exits_in_time(
    tmp_path: Path,
) -> None:
    require_offline_models("smollm2-135m", "whisper-base")
    long_file, _ = meeting_speech(20, tmp_path)
    folder = tmp_path / "conversations"
    # replies of exactly 400 tokens (several seconds here): each is still running when the signal comes
    tokens = ("--set", "llm.sampling.min_new_tokens=400", "--set", "llm.sampling.max_new_tokens=400")
    process, base = start_server("--set", f"server.conversation_dir={folder}", *tokens)
    api = openai.OpenAI(base_url=f"{base}/v1", api_key="x", max_retries=0, timeout=300)
    outcome: dict[str, Any] = {}

    def upload() -> None:
        with long_file.open("rb") as audio:
            api.audio.transcriptions.create(model="whisper-1", file=audio)

    def chat_stream() -> None:
        stream = api.chat.completions.create(
            model=served(api), stream=True, messages=[{"role": "user", "content": "Hi"}]
        )
        outcome["chunks"] = sum(1 for _ in stream)

    async def realtime_then_signal(pool: concurrent.futures.ThreadPoolExecutor) -> dict[str, Any]:
        async with websockets.connect(ws_url(base)) as ws:
            created = json.loads(await ws.recv())
            conversation_id = created["session"]["conversation_id"]
            for text in ("Say hello.", "Tell a long story about a dragon."):
                await ws.send(
                    json.dumps({"type": "conversation.item.create", "item": {"role": "user", "content": text}})
                )
                await ws.send(json.dumps({"type": "response.create"}))
                if text.startswith("Say"):
                    await events_until(ws, "response.done", timeout=120)  # the first exchange is saved whole
            await events_until(ws, "response.output_text.delta", timeout=120)
            outcome["upload"] = pool.submit(upload)
            outcome["stream"] = pool.submit(chat_stream)
            await asyncio.sleep(4)  # the upload's units and the stream wait their turn behind the reply
            assert not outcome["upload"].done() and not outcome["stream"].done()
            signalled = time.monotonic()
            process.send_signal(signal.SIGTERM)
            events: list[dict[str, Any]] = []
            with pytest.raises(websockets.exceptions.ConnectionClosed) as closed:
                async with asyncio.timeout(EXIT_WITHIN_S):
                    while True:
                        events.append(json.loads(await ws.recv()))
            return {"id": conversation_id, "events": events, "close": closed.value.rcvd, "signalled": signalled}

    try:
        with concurrent.futures.ThreadPoolExecutor(2) as pool:
            session = asyncio.run(realtime_then_signal(pool))
            code = process.wait(timeout=EXIT_WITHIN_S)
            stopped_s = time.monotonic() - session["signalled"]
            with pytest.raises(openai.APIStatusError) as refused:
                outcome["upload"].result(timeout=5)
            with pytest.raises(openai.APIError) as cut:
                outcome["stream"].result(timeout=5)
    finally:
        if process.poll() is None:
            process.kill()
    log = process.stdout.read() if process.stdout else ""
    assert stopped_s < EXIT_WITHIN_S and code == 0, (stopped_s, code, log)
    assert "SIGTERM: stopping" in log and "Traceback" not in log, log
    # the Realtime client: its reply ends as cancelled, then an error event, then close 1001 with a reason
    kinds = [e["type"] for e in session["events"]]
    done = next(e for e in session["events"] if e["type"] == "response.done")
    assert done["response"]["status"] == "cancelled", done
    error = next(e for e in session["events"] if e["type"] == "error")
    assert error["error"]["code"] == "shutting-down" and kinds.index("error") > kinds.index("response.done")
    assert session["close"] is not None and session["close"].code == 1001
    assert session["close"].reason == "server shutting down"
    # the upload: 503 in OpenAI's error shape; the stream: an error event the SDK raises, no [DONE]
    assert refused.value.status_code == 503 and refused.value.body["code"] == "shutting-down"
    assert "shutting down" in str(cut.value)
    # the saved conversation: whole, with the first exchange and the cut reply marked as cut
    saved = Conversation.load(folder / f"{session['id']}.json")
    roles = [turn.role for turn in saved.turns]
    assert roles[:2] == ["user", "assistant"] and saved.turns[0].content == "Say hello."
    if len(roles) == 4:  # the cut reply was saved before the goodbye
        assert saved.turns[3].cut
    print(f"\nSIGTERM to exit: {stopped_s:.2f} s; saved turns {roles}")


def test_new_connections_are_refused_at_once_and_a_second_signal_exits_without_waiting(tmp_path: Path) -> None:
    require_offline_models("smollm2-135m", "whisper-base")
    # a long grace (30 s for uvicorn's part): a client trickling its request body keeps the stop waiting
    process, base = start_server("--set", "server.shutdown_timeout_s=60", "--set", "server.request_timeout_s=120")
    port = int(base.rsplit(":", 1)[1])
    try:
        slow = socket.create_connection(("127.0.0.1", port), timeout=10)
        slow.sendall(f"POST /v1/chat/completions HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\n".encode()
                     + b"Content-Type: application/json\r\nContent-Length: 1000\r\n\r\n{")  # fmt: skip
        time.sleep(0.5)
        process.send_signal(signal.SIGTERM)
        time.sleep(1.0)
        assert process.poll() is None, "the first signal waits for the request in progress"
        with pytest.raises(OSError):  # the listening socket is closed: nothing new gets in
            socket.create_connection(("127.0.0.1", port), timeout=2).close()
        signalled = time.monotonic()
        process.send_signal(signal.SIGINT)
        code = process.wait(timeout=5)
        assert time.monotonic() - signalled < 2.0
        assert code == 128 + signal.SIGINT
        slow.close()
    finally:
        if process.poll() is None:
            process.kill()
    log = process.stdout.read() if process.stdout else ""
    assert "SIGINT, a second signal: exiting now" in log, log


def test_what_outlives_the_stop_is_answered_503_and_sessions_still_authenticating_are_told(tmp_path: Path) -> None:
    """A request whose body is still arriving when the stop's time is up gets 503 `shutting-down` (not a bare 500
    and a traceback); a WebSocket client still to send its key gets the error event and close 1001; a client that
    left before authenticating leaves no traceback."""
    require_offline_models("smollm2-135m", "whisper-base")
    key = "a-key-of-sixteen-chars"
    process, base = start_server("--set", "server.shutdown_timeout_s=2", "--set", f"server.api_key={key}")
    port = int(base.rsplit(":", 1)[1])
    try:
        trickled = socket.create_connection(("127.0.0.1", port), timeout=20)
        trickled.sendall(f"POST /v1/audio/transcriptions HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\n"
                         f"Authorization: Bearer {key}\r\nContent-Type: multipart/form-data; boundary=b\r\n"
                         "Content-Length: 100000\r\n\r\n--b\r\n".encode())  # fmt: skip

        async def sessions() -> tuple[list[dict[str, Any]], Any]:
            async with websockets.connect(ws_url(base)):  # leaves without a key
                pass
            async with websockets.connect(ws_url(base)) as waiting:  # yet to send its auth event
                await asyncio.sleep(0.5)
                process.send_signal(signal.SIGTERM)
                events: list[dict[str, Any]] = []
                with pytest.raises(websockets.exceptions.ConnectionClosed) as closed:
                    async with asyncio.timeout(EXIT_WITHIN_S):
                        while True:
                            events.append(json.loads(await waiting.recv()))
                return events, closed.value.rcvd

        events, close = asyncio.run(sessions())
        answer = b""
        with contextlib.suppress(OSError):
            while part := trickled.recv(65536):
                answer += part
        code = process.wait(timeout=EXIT_WITHIN_S)
    finally:
        if process.poll() is None:
            process.kill()
    log = process.stdout.read() if process.stdout else ""
    assert [e["error"]["code"] for e in events] == ["shutting-down"] and close is not None and close.code == 1001
    assert answer.startswith(b"HTTP/1.1 503") and b"shutting-down" in answer, answer[:300]
    assert code == 0 and "Traceback" not in log and "ERROR" not in log, log
