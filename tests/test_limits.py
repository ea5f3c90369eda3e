"""Resource limits of `assistant serve`, attacked by real clients on 127.0.0.1: upload size, audio per turn, sessions
per API key, concurrent requests, slow-loris clients (headers or body trickled) and idle WebSocket sessions.

One server with small limits (2 s deadlines, 2 requests, 2 sessions per key) so each attack ends in seconds."""

from __future__ import annotations

import asyncio
import json
import socket
import subprocess
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest

from assistant.audio.decode import probe
from tests.conftest import require_offline_models, require_tool, speak
from tests.test_server import events_until, start_server, ws_url

pytestmark = [pytest.mark.real_model, pytest.mark.reliability]
openai = pytest.importorskip("openai")
websockets = pytest.importorskip("websockets")

ALPHA, BETA = "alpha-key-0001", "beta-key-0002"
DEADLINE_S = 2.0


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    require_offline_models("smollm2-135m", "whisper-base")
    conversations = tmp_path_factory.mktemp("conversations")
    process, base = start_server(
        "--set", f"server.conversation_dir={conversations}",
        "--set", f"server.api_keys=[{ALPHA}, {BETA}]", "--set", "server.max_sessions_per_key=2",
        "--set", "server.max_requests=2", "--set", f"server.request_timeout_s={DEADLINE_S}",
        "--set", f"server.idle_timeout_s={DEADLINE_S}", "--set", "server.max_upload_mb=0.05",
        "--set", "server.max_turn_audio_s=2", "--set", "server.max_upload_audio_s=60",
    )  # fmt: skip
    yield base
    process.terminate()
    process.wait(timeout=30)


def host_of(base: str) -> str:
    """The Host header a client of ``base`` sends (the server refuses any other: DNS rebinding)."""
    return base.removeprefix("http://")


def port_of(base: str) -> int:
    return int(base.rsplit(":", 1)[1])


def open_slow_request(base: str, head: bytes, body_part: bytes = b"") -> socket.socket:
    """A client that sends part of a request and then nothing more."""
    connection = socket.create_connection(("127.0.0.1", port_of(base)), timeout=DEADLINE_S + 10)
    connection.sendall(head + body_part)
    return connection


def slow_body(base: str) -> socket.socket:
    head = (f"POST /v1/chat/completions HTTP/1.1\r\nHost: {host_of(base)}\r\nAuthorization: Bearer {ALPHA}\r\n"
            "Content-Type: application/json\r\nContent-Length: 1000\r\n\r\n").encode()  # fmt: skip
    return open_slow_request(base, head, b'{"messages": [')


def answer_of(connection: socket.socket) -> bytes:
    """Everything the server sends until it closes the connection."""
    received = b""
    with connection:
        while chunk := connection.recv(65536):
            received += chunk
    return received


def health(base: str) -> int:
    try:
        with urllib.request.urlopen(f"{base}/health", timeout=10) as response:
            return int(response.status)
    except urllib.error.HTTPError as exc:
        return int(exc.code)


def test_slow_loris_clients_get_408_and_everyone_else_is_served(server: str) -> None:
    started = time.monotonic()
    silent = open_slow_request(server, b"")  # connects and sends nothing
    trickled_headers = open_slow_request(server, f"GET /health HTTP/1.1\r\nHost: {host_of(server)}\r\n".encode())
    trickled_body = slow_body(server)
    time.sleep(0.3)
    assert health(server) == 200  # served while three slow clients hold connections
    for connection in (silent, trickled_headers, trickled_body):
        answer = answer_of(connection)
        assert answer.startswith(b"HTTP/1.1 408") and b"server.request_timeout_s" in answer, answer[:200]
    assert time.monotonic() - started < DEADLINE_S + 3
    # a kept-alive connection gets the same deadline for its next request
    keep_alive = open_slow_request(server, f"GET /health HTTP/1.1\r\nHost: {host_of(server)}\r\n\r\n".encode())
    time.sleep(0.5)  # the whole first response has arrived
    keep_alive.sendall(b"GET /health HTTP/1.1\r\n")
    answers = answer_of(keep_alive)
    assert answers.startswith(b"HTTP/1.1 200") and b"HTTP/1.1 408" in answers


def test_requests_over_the_concurrency_limit_are_busy_until_slots_free(server: str) -> None:
    holders = [slow_body(server), slow_body(server)]  # inside the app, waiting for bodies that never come
    time.sleep(0.5)
    request = urllib.request.Request(f"{server}/health")
    with pytest.raises(urllib.error.HTTPError) as refused:
        urllib.request.urlopen(request, timeout=10)
    assert refused.value.code == 503 and b"server.max_requests" in refused.value.read()
    for holder in holders:
        answer_of(holder)  # cut off at the deadline, which frees their slots
    assert health(server) == 200


def test_upload_over_the_size_limit_is_refused(server: str, tmp_path: Path) -> None:
    big = speak("This recording is longer than the upload limit allows.", tmp_path / "big.wav")
    assert big.stat().st_size > 0.05 * 1024 * 1024
    api = openai.OpenAI(base_url=f"{server}/v1", api_key=ALPHA, max_retries=0, timeout=60)
    with pytest.raises(openai.APIStatusError) as refused, big.open("rb") as f:
        api.audio.transcriptions.create(model="whisper-1", file=f)
    assert refused.value.status_code == 413 and "server.max_upload_mb" in str(refused.value.body)
    assert health(server) == 200


def test_upload_holding_too_much_audio_is_refused_before_decoding(server: str, tmp_path: Path) -> None:
    """A few kilobytes can hold hours (silence compresses to nothing): the declared duration is checked first."""
    packed = tmp_path / "packed.flac"
    subprocess.run([require_tool("ffmpeg"), "-loglevel", "error", "-f", "lavfi", "-i", "anullsrc=r=16000:cl=mono",
                    "-t", "150", "-c:a", "flac", str(packed)], check=True)  # fmt: skip
    assert packed.stat().st_size < 0.05 * 1024 * 1024
    api = openai.OpenAI(base_url=f"{server}/v1", api_key=ALPHA, max_retries=0, timeout=60)
    started = time.monotonic()
    with pytest.raises(openai.APIStatusError) as refused, packed.open("rb") as f:
        api.audio.transcriptions.create(model="whisper-1", file=f)
    assert refused.value.status_code == 413 and "server.max_upload_audio_s" in str(refused.value.body)
    assert time.monotonic() - started < 10, "refused at once, not after decoding it"
    assert health(server) == 200


def connect(server: str, key: str) -> object:
    return websockets.connect(ws_url(server), additional_headers={"Authorization": f"Bearer {key}"})


def test_sessions_per_key_turn_audio_and_idle_sessions(server: str) -> None:
    from websockets.exceptions import ConnectionClosed

    async def attack() -> None:
        async with connect(server, ALPHA) as first, connect(server, ALPHA) as second:
            for ws in (first, second):
                assert json.loads(await ws.recv())["type"] == "session.created"
            async with connect(server, ALPHA) as third:  # over the key's limit
                refused = json.loads(await third.recv())
                assert refused["error"]["code"] == "limit" and "max_sessions_per_key" in refused["error"]["message"]
                with pytest.raises(ConnectionClosed) as closed:
                    await third.recv()
                assert closed.value.rcvd is not None and closed.value.rcvd.code == 1013
            async with connect(server, BETA) as other:  # another key is not affected
                assert json.loads(await other.recv())["type"] == "session.created"
            # audio per turn (client-committed turns): 3 s of audio against a 2 s limit
            await first.send(
                json.dumps(
                    {
                        "type": "session.update",
                        "session": {
                            "audio": {"input": {"turn_detection": None, "format": {"type": "audio/pcm", "rate": 16000}}}
                        },
                    }
                )
            )
            await events_until(first, "session.updated")
            await first.send(b"\x00\x01" * 16000 * 3)
            error = json.loads(await first.recv())
            assert error["error"]["code"] == "limit" and "server.max_turn_audio_s" in error["error"]["message"]
            # idle: no message for the idle timeout closes the session with a reason
            idle = json.loads(await asyncio.wait_for(second.recv(), timeout=DEADLINE_S + 5))
            assert idle["error"]["code"] == "limit" and "idle_timeout_s" in idle["error"]["message"]
            with pytest.raises(ConnectionClosed):
                await second.recv()
        async with connect(server, ALPHA) as again:  # the key's sessions were given back
            assert json.loads(await again.recv())["type"] == "session.created"

    asyncio.run(attack())


def test_one_key_cannot_open_another_keys_conversation(server: str) -> None:
    async def attack() -> None:
        async with connect(server, ALPHA) as ws:
            conversation_id = json.loads(await ws.recv())["session"]["conversation_id"]
            await ws.send(json.dumps({"type": "conversation.item.create", "item": {"role": "user", "content": "Hi"}}))
            await ws.send(json.dumps({"type": "response.create"}))
            await events_until(ws, "response.done")
        async with websockets.connect(f"{ws_url(server)}?conversation={conversation_id}",
                                      additional_headers={"Authorization": f"Bearer {BETA}"}) as other:  # fmt: skip
            assert json.loads(await other.recv())["session"]["history_messages"] == 1  # a new one: system only
        async with websockets.connect(f"{ws_url(server)}?conversation={conversation_id}",
                                      additional_headers={"Authorization": f"Bearer {ALPHA}"}) as owner:  # fmt: skip
            assert json.loads(await owner.recv())["session"]["history_messages"] == 3  # its own, resumed

    asyncio.run(attack())


def test_metrics_need_the_api_key_when_one_is_set(server: str) -> None:
    with pytest.raises(urllib.error.HTTPError) as refused:
        urllib.request.urlopen(f"{server}/metrics", timeout=10)
    assert refused.value.code == 401
    request = urllib.request.Request(f"{server}/metrics", headers={"Authorization": f"Bearer {ALPHA}"})
    with urllib.request.urlopen(request, timeout=10) as response:
        assert b"assistant_errors_total" in response.read()


REQUESTS_PER_MINUTE = 4
AUDIO_MINUTES_PER_HOUR = 0.2  # 12 s of audio per key per hour


@pytest.fixture(scope="module")
def rated_server() -> Iterator[str]:
    """A second server with rate limits per key (three keys, so each attack has a fresh allowance)."""
    require_offline_models("smollm2-135m", "whisper-base")
    process, base = start_server(
        "--set", f"server.api_keys=[{ALPHA}, {BETA}, gamma-key-0003, delta-key-0004]",
        "--set", f"server.rate_limit_requests_per_minute={REQUESTS_PER_MINUTE}",
        "--set", f"server.rate_limit_audio_minutes_per_hour={AUDIO_MINUTES_PER_HOUR}",
    )  # fmt: skip
    yield base
    process.terminate()
    process.wait(timeout=30)


def test_a_key_over_its_requests_per_minute_gets_429_with_retry_after(rated_server: str) -> None:
    api = openai.OpenAI(base_url=f"{rated_server}/v1", api_key=ALPHA, max_retries=0, timeout=30)
    for _ in range(REQUESTS_PER_MINUTE):
        api.models.list()
    with pytest.raises(openai.RateLimitError) as refused:  # the SDK's own class for 429
        api.models.list()
    headers = refused.value.response.headers
    assert 50 <= int(headers["retry-after"]) <= 60 and 50_000 <= int(headers["retry-after-ms"]) <= 60_000
    assert refused.value.code == "rate_limit_exceeded"
    assert "server.rate_limit_requests_per_minute" in refused.value.message
    other = openai.OpenAI(base_url=f"{rated_server}/v1", api_key=BETA, max_retries=0, timeout=30)
    assert other.models.list().data  # another key has its own allowance

    async def realtime_connect() -> None:  # a WebSocket connection counts as a request too
        from websockets.exceptions import ConnectionClosed

        async with connect(rated_server, ALPHA) as ws:
            error = json.loads(await ws.recv())
            assert error["type"] == "error" and error["error"]["code"] == "rate_limit_exceeded"
            with pytest.raises(ConnectionClosed) as closed:
                await ws.recv()
            assert closed.value.rcvd is not None and closed.value.rcvd.code == 1013

    asyncio.run(realtime_connect())


def test_a_key_over_its_audio_minutes_per_hour_gets_429_and_a_file_over_the_whole_allowance_413(
    rated_server: str, tmp_path: Path
) -> None:
    five_s = tmp_path / "five.wav"
    subprocess.run([require_tool("ffmpeg"), "-loglevel", "error", "-f", "lavfi", "-i", "sine=f=300:r=16000",
                    "-t", "5", str(five_s)], check=True)  # fmt: skip
    api = openai.OpenAI(base_url=f"{rated_server}/v1", api_key=BETA, max_retries=0, timeout=60)
    for _ in range(2):  # 10 of the 12 s
        with five_s.open("rb") as audio:
            api.audio.transcriptions.create(model="whisper-1", file=audio)
    with pytest.raises(openai.RateLimitError) as refused, five_s.open("rb") as audio:
        api.audio.transcriptions.create(model="whisper-1", file=audio)
    assert 3500 <= int(refused.value.response.headers["retry-after"]) <= 3600
    assert "server.rate_limit_audio_minutes_per_hour" in refused.value.message
    long_file = tmp_path / "twenty.wav"
    subprocess.run([require_tool("ffmpeg"), "-loglevel", "error", "-f", "lavfi", "-i", "sine=f=300:r=16000",
                    "-t", "20", str(long_file)], check=True)  # fmt: skip
    fresh = openai.OpenAI(base_url=f"{rated_server}/v1", api_key="gamma-key-0003", max_retries=0, timeout=60)
    with pytest.raises(openai.APIStatusError) as too_long, long_file.open("rb") as audio:
        fresh.audio.transcriptions.create(model="whisper-1", file=audio)
    assert too_long.value.status_code == 413 and "send it in parts" in too_long.value.message


def test_realtime_audio_over_the_allowance_is_dropped_with_one_error(rated_server: str) -> None:
    async def stream_audio() -> None:
        async with connect(rated_server, "gamma-key-0003") as ws:
            assert json.loads(await ws.recv())["type"] == "session.created"
            pcm_16k = {"audio": {"input": {"format": {"type": "audio/pcm", "rate": 16000}, "turn_detection": None}}}
            await ws.send(json.dumps({"type": "session.update", "session": pcm_16k}))
            await events_until(ws, "session.updated")
            for _ in range(150):  # 15 s of audio in 100 ms pieces, against 12 s per hour
                await ws.send(b"\x00\x00" * 1600)
            await ws.send(json.dumps({"type": "input_audio_buffer.clear"}))
            seen = await events_until(ws, "input_audio_buffer.cleared")
            errors = [e["error"] for e in seen if e["type"] == "error"]
            assert len(errors) == 1 and errors[0]["code"] == "rate_limit_exceeded", errors
            assert "input audio is dropped for 3600 s" in errors[0]["message"]

    asyncio.run(stream_audio())


def test_a_file_that_declares_no_duration_is_held_to_what_the_allowance_has_left(
    rated_server: str, tmp_path: Path
) -> None:
    """Matroska written live declares no duration: it cannot be counted before decoding, so it is held while
    decoding to the allowance left (the trial found such files went through with none left)."""
    ffmpeg = require_tool("ffmpeg")

    def undeclared(seconds: int) -> Path:
        target = tmp_path / f"piped{seconds}.mka"
        with target.open("wb") as out:
            subprocess.run([ffmpeg, "-loglevel", "error", "-f", "lavfi", "-i", "sine=f=300:r=16000", "-t",
                            str(seconds), "-c:a", "libopus", "-live", "1", "-f", "matroska", "pipe:1"],
                           stdout=out, check=True)  # fmt: skip
        assert probe(target).declared_s == 0.0
        return target

    api = openai.OpenAI(base_url=f"{rated_server}/v1", api_key="delta-key-0004", max_retries=0, timeout=60)
    with pytest.raises(openai.RateLimitError) as refused, undeclared(20).open("rb") as audio:
        api.audio.transcriptions.create(model="whisper-1", file=audio)  # 20 s against 12 s left
    assert "more than the 12.0 s left" in refused.value.message
    with undeclared(8).open("rb") as audio:
        api.audio.transcriptions.create(model="whisper-1", file=audio)  # fits, and is counted once decoded
    with pytest.raises(openai.RateLimitError), undeclared(8).open("rb") as audio:
        api.audio.transcriptions.create(model="whisper-1", file=audio)  # 4 s left now
    metrics = urllib.request.Request(f"{rated_server}/metrics", headers={"Authorization": f"Bearer {ALPHA}"})
    with urllib.request.urlopen(metrics, timeout=10) as response:
        text = response.read().decode()
    assert 'assistant_errors_total{code="rate_limit_exceeded"}' in text  # WebSocket refusals are counted too
