"""`assistant serve` as clients meet it: a real server process on 127.0.0.1, the official openai client, and
WebSocket sessions with the websockets library. Offline models: Whisper base and SmolLM2."""

from __future__ import annotations

import asyncio
import base64
import concurrent.futures
import json
import os
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.conftest import require_offline_models, speak
from tests.conftest import served_chat_model as served

pytestmark = pytest.mark.real_model
openai = pytest.importorskip("openai")
websockets = pytest.importorskip("websockets")

API_KEY = "test-key-123"
ANSWERED = ("completed", "incomplete")  # a reply that stopped at max_output_tokens is "incomplete", as in the API
SERVER_ARGS = ["--model", "smollm2-135m", "--set", "asr.language=en", "--set", "llm.sampling.max_new_tokens=24",
               "--set", "llm.system=Answer briefly.", "--set", "server.output_modalities=[text]"]  # fmt: skip


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


def start_server(*extra: str, env: dict[str, str] | None = None) -> tuple[subprocess.Popen, str]:
    port = free_port()
    command = [sys.executable, "-m", "assistant", "serve", "--port", str(port), *SERVER_ARGS, *extra]
    process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env)
    base = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise AssertionError(f"server exited: {process.stdout.read() if process.stdout else ''}")
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=0.5):
                return process, base
        except OSError:
            time.sleep(0.3)
    process.kill()
    raise AssertionError("server did not start in 120 s")


@pytest.fixture(scope="module")
def server() -> Iterator[str]:
    require_offline_models("smollm2-135m", "whisper-base")
    process, base = start_server("--set", "server.max_pending=2")
    yield base
    process.terminate()
    process.wait(timeout=30)


@pytest.fixture(scope="module")
def question(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return speak("What is the capital of France?", tmp_path_factory.mktemp("q") / "q.wav", words_per_minute=120)


def client(base: str, key: str = "none") -> Any:
    return openai.OpenAI(base_url=f"{base}/v1", api_key=key, max_retries=0, timeout=120)


def test_models_and_health(server: str) -> None:
    ids = [model.id for model in client(server).models.list().data]
    assert ids == ["smollm2-135m", "whisper-base"]
    import urllib.request

    with urllib.request.urlopen(f"{server}/health", timeout=10) as response:
        assert json.loads(response.read())["status"] == "ok"


def test_chat_completions_streamed_and_whole_agree(server: str) -> None:
    api = client(server)
    messages = [{"role": "system", "content": "You are a helpful assistant."},
                {"role": "user", "content": "What is the capital of France? Answer in one word."}]  # fmt: skip
    whole = api.chat.completions.create(model="smollm2-135m", messages=messages, temperature=0, max_tokens=16)
    text = whole.choices[0].message.content
    assert "Paris" in text and whole.usage.completion_tokens > 0
    stream = api.chat.completions.create(model="smollm2-135m", messages=messages, temperature=0, max_tokens=16,
                                         stream=True, stream_options={"include_usage": True})  # fmt: skip
    chunks = list(stream)
    streamed = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert streamed == text and chunks[-1].usage.completion_tokens == whole.usage.completion_tokens


def test_sampling_parameters_are_honoured(server: str) -> None:
    api = client(server)
    messages = [{"role": "user", "content": "Write a long story about a dragon."}]
    short = api.chat.completions.create(model=served(api), messages=messages, max_tokens=3, temperature=0)
    assert short.usage.completion_tokens == 3 and short.choices[0].finish_reason == "length"
    seeded = [api.chat.completions.create(model=served(api), messages=messages, max_tokens=12, temperature=1.0,
                                          seed=7)
              .choices[0].message.content for _ in range(2)]  # fmt: skip
    assert seeded[0] == seeded[1]
    stopped = api.chat.completions.create(
        model=served(api), messages=messages, max_tokens=24, temperature=0, stop=["dragon"]
    )
    assert "dragon" not in stopped.choices[0].message.content


@pytest.mark.parametrize("response_format", ["json", "text", "srt", "vtt", "verbose_json"])
def test_transcriptions_in_every_format(server: str, question: Path, response_format: str) -> None:
    with question.open("rb") as audio:
        result = client(server).audio.transcriptions.create(model="whisper-1", file=audio,
                                                            response_format=response_format)  # fmt: skip
    text = result if isinstance(result, str) else result.text
    assert "capital" in text.lower()
    if response_format == "srt":
        assert "00:00:00,000 --> " in text
    if response_format == "vtt":
        assert text.startswith("WEBVTT")
    if response_format == "verbose_json":
        assert result.language == "english" and result.segments and result.duration > 1  # named as OpenAI names it


def test_word_timestamps_as_the_openai_sdk_asks_for_them(server: str, question: Path) -> None:
    api = client(server)
    with question.open("rb") as audio:
        result = api.audio.transcriptions.create(model="whisper-1", file=audio, response_format="verbose_json",
                                                 timestamp_granularities=["word"])  # fmt: skip
    assert result.words and not result.segments, "only what was asked for"
    assert " ".join(w.word for w in result.words).lower().count("capital") == 1
    starts = [w.start for w in result.words]
    assert starts == sorted(starts) and all(w.start <= w.end <= result.duration + 0.05 for w in result.words)
    with question.open("rb") as audio:
        both = api.audio.transcriptions.create(model="whisper-1", file=audio, response_format="verbose_json",
                                               timestamp_granularities=["word", "segment"])  # fmt: skip
    assert both.words and both.segments
    with pytest.raises(openai.BadRequestError, match="verbose_json"), question.open("rb") as audio:
        api.audio.transcriptions.create(model="whisper-1", file=audio, response_format="json",
                                        timestamp_granularities=["word"])  # fmt: skip


def test_bad_requests_get_4xx_with_a_code(server: str, tmp_path: Path) -> None:
    api = client(server)
    with pytest.raises(openai.BadRequestError, match="messages\\[0\\]"):
        api.chat.completions.create(model=served(api), messages=[{"role": "robot", "content": "x"}])
    with pytest.raises(openai.BadRequestError, match="top_p"):
        api.chat.completions.create(model=served(api), messages=[{"role": "user", "content": "x"}], top_p=5)
    fake = tmp_path / "song.mp3"
    fake.write_bytes(b"this is not audio")
    with (
        pytest.raises(openai.BadRequestError, match="audio-decode.*song.mp3|cannot read 'song.mp3'"),
        fake.open("rb") as f,
    ):
        api.audio.transcriptions.create(model="whisper-1", file=f)
    with pytest.raises(openai.BadRequestError, match="response_format"), fake.open("rb") as f:
        api.audio.transcriptions.create(model="whisper-1", file=f, response_format="docx")  # type: ignore[arg-type]


def test_overload_is_a_busy_error_not_a_crash(server: str) -> None:
    api = client(server)

    def ask(_: int) -> str:
        try:
            api.chat.completions.create(model=served(api),
                                        messages=[{"role": "user", "content": "Tell me a story."}],
                                        max_tokens=20, temperature=0)  # fmt: skip
            return "ok"
        except openai.APIStatusError as exc:
            return f"{exc.status_code} {exc.body}"

    with concurrent.futures.ThreadPoolExecutor(8) as pool:
        outcomes = list(pool.map(ask, range(8)))
    assert "ok" in outcomes
    busy = [o for o in outcomes if o != "ok"]
    assert busy and all(o.startswith("503") and "busy" in o for o in busy)


# --- WebSocket session -----------------------------------------------------------------------------------------------


async def events_until(ws: Any, kind: str, timeout: float = 60) -> list[dict[str, Any]]:
    seen = []
    async with asyncio.timeout(timeout):
        while True:
            event = json.loads(await ws.recv())
            seen.append(event)
            if event["type"] == kind:
                return seen


def ws_url(base: str) -> str:
    return base.replace("http://", "ws://") + "/v1/realtime"


def test_websocket_text_and_spoken_turns(server: str, question: Path) -> None:
    pcm = subprocess.run(["ffmpeg", "-loglevel", "error", "-i", str(question), "-af", "apad=pad_dur=1.5", "-ar",
                          "16000", "-ac", "1", "-f", "s16le", "-"], capture_output=True, check=True).stdout  # fmt: skip

    async def session() -> None:
        async with websockets.connect(ws_url(server)) as ws:
            assert json.loads(await ws.recv())["type"] == "session.created"
            await ws.send(
                json.dumps(
                    {
                        "type": "session.update",
                        "session": {
                            "sampling": {"temperature": 0},
                            "audio": {"input": {"format": {"type": "audio/pcm", "rate": 16000}}},
                        },
                    }
                )
            )
            await events_until(ws, "session.updated")
            await ws.send(
                json.dumps(
                    {
                        "type": "conversation.item.create",
                        "item": {
                            "type": "message",
                            "role": "user",
                            "content": [{"type": "input_text", "text": "Say hello."}],
                        },
                    }
                )
            )
            await ws.send(json.dumps({"type": "response.create"}))
            seen = await events_until(ws, "response.done")
            assert any(e["type"] == "response.output_text.delta" for e in seen)
            assert seen[-1]["response"]["status"] in ANSWERED
            half = len(pcm) // 2 // 2 * 2
            await ws.send(pcm[:half])  # binary PCM16 ...
            await ws.send(json.dumps({"type": "input_audio_buffer.append",
                                      "audio": base64.b64encode(pcm[half:]).decode()}))  # ... and base64  # fmt: skip
            seen = await events_until(ws, "response.done")
            kinds = [e["type"] for e in seen]
            assert kinds.index("input_audio_buffer.speech_started") < kinds.index(
                "conversation.item.input_audio_transcription.completed") < kinds.index("response.done")  # fmt: skip
            transcript = next(e for e in seen if e["type"].endswith("transcription.completed"))["transcript"]
            assert "capital" in transcript.lower()

    asyncio.run(session())


def test_websocket_bad_messages_get_error_events_and_the_session_goes_on(server: str) -> None:
    async def session() -> None:
        async with websockets.connect(ws_url(server), max_size=None) as ws:
            await ws.recv()
            for bad, code in [("{not json", "config"), (json.dumps({"type": "dance"}), "config"),
                              (json.dumps({"type": "input_audio_buffer.append", "audio": "%%%"}), "config"),
                              (b"\x01\x02\x03", "config"), (b"\x00" * (2 << 20), "limit"),
                              (json.dumps({"type": "response.create"}), "conversation"),
                              (json.dumps({"type": "session.update", "session": {"language": 5}}), "config"),
                              (json.dumps({"type": "session.update", "session": {"language": "xx"}}),
                               "config")]:  # fmt: skip
                await ws.send(bad)
                event = json.loads(await ws.recv())
                assert event["type"] == "error" and event["error"]["code"] == code, (bad[:20], event)
            await ws.send(json.dumps({"type": "conversation.item.create", "item": {"role": "user", "content": "Hi"}}))
            await ws.send(json.dumps({"type": "response.create"}))
            assert (await events_until(ws, "response.done"))[-1]["response"]["status"] in ANSWERED

    asyncio.run(session())


def test_cancel_and_a_client_leaving_mid_reply_free_the_worker(server: str) -> None:
    async def session() -> None:
        story = {"type": "conversation.item.create", "item": {"role": "user", "content": "Tell a long story."}}
        async with websockets.connect(ws_url(server)) as ws:
            await ws.recv()
            await ws.send(json.dumps({"type": "session.update", "session": {"max_response_output_tokens": 400}}))
            await events_until(ws, "session.updated")
            await ws.send(json.dumps(story))
            await ws.send(json.dumps({"type": "response.create"}))
            await events_until(ws, "response.output_text.delta")
            await ws.send(json.dumps({"type": "response.cancel"}))
            done = (await events_until(ws, "response.done"))[-1]
            assert done["response"]["status"] == "cancelled"
            await ws.send(json.dumps(story))
            await ws.send(json.dumps({"type": "response.create"}))
            await events_until(ws, "response.output_text.delta")
        # left mid-reply: the next request is served promptly (the abandoned generation was cancelled)
        started = time.monotonic()
        async with websockets.connect(ws_url(server)) as ws:
            await ws.recv()
            await ws.send(json.dumps({"type": "conversation.item.create", "item": {"role": "user", "content": "Hi"}}))
            await ws.send(json.dumps({"type": "response.create"}))
            await events_until(ws, "response.done")
        assert time.monotonic() - started < 10

    asyncio.run(session())


def test_browser_origin_must_match(server: str) -> None:
    async def session() -> None:
        with pytest.raises(websockets.exceptions.InvalidStatus):
            async with websockets.connect(ws_url(server), origin="http://evil.example"):
                pass
        async with websockets.connect(ws_url(server), origin=server) as ws:
            assert json.loads(await ws.recv())["type"] == "session.created"

    asyncio.run(session())


# --- exposure and keys ---------------------------------------------------------------------------------------------


def test_binding_beyond_loopback_needs_a_key() -> None:
    env = {k: v for k, v in os.environ.items() if k != "ASSISTANT_API_KEY"}
    result = subprocess.run([sys.executable, "-m", "assistant", "serve", "--host", "0.0.0.0", *SERVER_ARGS],
                            capture_output=True, text=True, timeout=60, env=env)  # fmt: skip
    assert result.returncode == 2 and "set server.api_key" in result.stderr


def test_api_key_is_required_when_set(question: Path) -> None:
    require_offline_models("smollm2-135m", "whisper-base")
    process, base = start_server(env={**os.environ, "ASSISTANT_API_KEY": API_KEY})
    try:
        with pytest.raises(openai.AuthenticationError):
            client(base, "wrong").models.list()
        assert client(base, API_KEY).models.list().data

        async def session() -> None:
            async with websockets.connect(ws_url(base)) as ws:
                await ws.send(json.dumps({"type": "auth", "api_key": "wrong"}))
                assert json.loads(await ws.recv())["type"] == "error"
            async with websockets.connect(
                ws_url(base), additional_headers={"Authorization": f"Bearer {API_KEY}"}
            ) as ws:
                assert json.loads(await ws.recv())["type"] == "session.created"

        asyncio.run(session())
    finally:
        process.terminate()
        process.wait(timeout=30)


def test_metrics_in_prometheus_format(server: str, question: Path) -> None:
    """``GET /metrics`` read by Prometheus' own parser: counters move with the requests answered."""
    import urllib.request

    from prometheus_client.parser import text_string_to_metric_families

    def scrape() -> dict[str, float]:
        with urllib.request.urlopen(f"{server}/metrics", timeout=30) as response:
            assert response.headers["Content-Type"].startswith("text/plain")
            text = response.read().decode()
        return {f"{sample.name}{sorted(sample.labels.items())}": sample.value
                for family in text_string_to_metric_families(text) for sample in family.samples}  # fmt: skip

    before = scrape()
    api = client(server)
    api.chat.completions.create(model=served(api), messages=[{"role": "user", "content": "Hi"}], max_tokens=4)
    with question.open("rb") as audio:
        api.audio.transcriptions.create(model="whisper-1", file=audio)
    with pytest.raises(openai.BadRequestError):
        api.chat.completions.create(model=served(api), messages=[{"role": "robot", "content": "x"}])
    after = scrape()

    def grew(name: str) -> float:
        return after.get(name, 0.0) - before.get(name, 0.0)

    assert grew("assistant_chat_completions_total[('stream', 'false')]") == 1
    assert grew("assistant_transcriptions_total[]") == 1
    assert grew("assistant_audio_seconds_total[('source', 'upload')]") > 1
    assert grew("assistant_tokens_total[('kind', 'completion')]") >= 1
    assert grew("assistant_errors_total[('code', 'invalid_value')]") == 1
    assert grew("assistant_time_to_first_token_seconds_count[]") == 1
    assert grew("assistant_queue_wait_seconds_count[]") >= 2
    assert "assistant_open_sessions[]" in after and "assistant_queue_depth[]" in after
