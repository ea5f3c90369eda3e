"""Remote recognition (``asr.backend: openai``): windows sent to a real second `assistant serve` on 127.0.0.1 and
placed on the file's timeline as local results are; the remote side's faults (429 with Retry-After, 5xx, 401) met
by a small HTTP server of the test's own that answers as OpenAI's API does."""

from __future__ import annotations

import difflib
import json
import threading
import time
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from assistant.asr.openai_remote import transcript_of
from assistant.audio.decode import load_audio
from assistant.config import AsrConfig, TranscribeConfig, VadConfig
from assistant.errors import AsrError
from assistant.pipeline import TranscriptionPipeline
from tests.conftest import require_offline_models, speak, write_wav
from tests.test_server import start_server

SENTENCES = ["The budget for next year is ready.", "We will hire two engineers in March.",
             "Please send the report before Friday.", "Lunch is served at noon on Fridays."]  # fmt: skip


@pytest.fixture(scope="module")
def four_windows(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Four spoken sentences 3 s apart (a pause over 2 s starts a new window): four windows."""
    folder = tmp_path_factory.mktemp("speech")
    pieces = []
    for index, sentence in enumerate(SENTENCES):
        pieces += [load_audio(speak(sentence, folder / f"{index}.wav")).samples, np.zeros(48000, np.float32)]
    return write_wav(folder / "four.wav", np.concatenate(pieces))


def pipeline(**asr: Any) -> TranscriptionPipeline:
    return TranscriptionPipeline.from_config_parts(AsrConfig(**asr), VadConfig(), TranscribeConfig())


def words_of(text: str) -> list[str]:
    return [w.strip(".,!?").lower() for w in text.split()]


@pytest.mark.real_model
def test_windows_sent_to_a_second_server_come_back_placed_as_local_results(four_windows: Path) -> None:
    require_offline_models("whisper-base")
    process, base = start_server()
    try:
        remote = pipeline(backend="openai", base_url=f"{base}/v1", model="whisper-base", language="en",
                          word_timestamps=True)  # fmt: skip
        result = remote.transcribe_file(four_windows, word_timestamps=True)
    finally:
        process.terminate()
        process.wait(timeout=30)
    local = pipeline(model="whisper-base", language="en").transcribe_file(four_windows, word_timestamps=True)
    # the remote server runs its own pipeline on each window (level, VAD): espeak's voice may come out a word apart
    script = words_of(" ".join(SENTENCES))
    for transcript in (result.transcript, local.transcript):
        assert difflib.SequenceMatcher(None, words_of(transcript.text), script).ratio() > 0.8, transcript.text
    remote_segments, local_segments = result.transcript.segments, local.transcript.segments
    assert len(remote_segments) == len(local_segments) == 4
    for theirs, ours in zip(remote_segments, local_segments, strict=True):
        assert abs(theirs.start_s - ours.start_s) < 0.3 and abs(theirs.end_s - ours.end_s) < 0.3, (theirs, ours)
        assert theirs.words and abs(theirs.words[0].start_s - ours.words[0].start_s) < 0.3
        assert theirs.language == "en"
    assert result.transcript.segments[3].start_s > 3 * 3.0  # on the file's timeline, not the window's


class FakeOpenAI(BaseHTTPRequestHandler):
    """Answers /v1/audio/transcriptions as OpenAI does (full language names, words at the top level), after the
    failures listed in ``server.script`` (status codes, one per request); counts requests in flight."""

    def do_POST(self) -> None:
        server: Any = self.server
        request = self.rfile.read(int(self.headers["Content-Length"]))
        with server.lock:
            server.in_flight += 1
            server.most_in_flight = max(server.most_in_flight, server.in_flight)
            status = server.script.pop(0) if server.script else 200
            server.requests += 1
        time.sleep(0.2)  # long enough for the other windows' requests to arrive
        plain = server.plain_only and b"verbose_json" not in request
        if server.plain_only and not plain:  # as vLLM 0.7 answered
            refusal = "Currently only support response_format `text` or `json`, not verbose_json"
            status, body = 400, {"error": {"message": refusal, "type": "BadRequestError", "code": 400}}
        elif plain:
            body = {"text": "Hello there."}
        elif status == 200:
            body = {"task": "transcribe", "language": "english", "duration": 2.0, "text": "Hello there.",
                    "segments": [{"id": 0, "start": 0.1, "end": 1.2, "text": " Hello there."}],
                    "words": [{"word": "Hello", "start": 0.1, "end": 0.5},
                              {"word": "there.", "start": 0.6, "end": 1.2}]}  # fmt: skip
        else:
            body = {"error": {"message": f"scripted failure {status}", "type": "server_error", "code": None}}
        data = json.dumps(body).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        if status == 429:
            self.send_header("Retry-After", "1")
        self.end_headers()
        self.wfile.write(data)
        with server.lock:
            server.in_flight -= 1

    def log_message(self, *args: Any) -> None:
        pass


@pytest.fixture
def fake() -> Iterator[Any]:
    server: Any = ThreadingHTTPServer(("127.0.0.1", 0), FakeOpenAI)
    server.lock, server.script, server.requests, server.in_flight, server.most_in_flight = threading.Lock(), [], 0, 0, 0
    server.plain_only = False
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield server
    server.shutdown()


def fake_pipeline(fake: Any, **asr: Any) -> TranscriptionPipeline:
    return pipeline(backend="openai", base_url=f"http://127.0.0.1:{fake.server_address[1]}/v1", model="whisper-1",
                    **asr)  # fmt: skip


def test_429_after_its_retry_after_and_5xx_are_retried_and_windows_go_out_in_parallel(
    fake: Any, four_windows: Path
) -> None:
    fake.script = [429, 503]
    started = time.monotonic()
    result = fake_pipeline(fake, max_in_flight=4, max_retries=3).transcribe_file(four_windows, word_timestamps=True)
    assert time.monotonic() - started >= 1.0  # the 429's Retry-After was waited out
    assert fake.requests == 4 + 2 and fake.most_in_flight == 4
    segments = result.transcript.segments
    assert len(segments) == 4 and all(s.text == " Hello there." and s.language == "en" for s in segments)
    assert [w.word for w in segments[2].words] == ["Hello", "there."] and segments[2].words[0].probability is None
    assert segments[2].start_s > 6.0  # placed on the file's timeline


def test_a_refusal_is_reported_with_the_servers_message_and_what_to_check(fake: Any, four_windows: Path) -> None:
    fake.script = [401] * 8
    with pytest.raises(AsrError, match=r"HTTP 401: scripted failure 401 \(check asr.api_key\)"):
        fake_pipeline(fake, max_in_flight=1, max_retries=3).transcribe_file(four_windows)
    assert fake.requests == 1  # 401 is not retried


def test_a_server_without_verbose_json_gets_plain_json_and_each_window_is_one_segment(
    fake: Any, four_windows: Path
) -> None:
    fake.plain_only = True
    result = fake_pipeline(fake, max_in_flight=1).transcribe_file(four_windows)
    segments = result.transcript.segments
    assert len(segments) == 4 and all(s.text.strip() == "Hello there." for s in segments)
    assert fake.requests == 1 + 4  # refused once, then json for every window
    assert segments[1].start_s > 3.0 and segments[1].end_s - segments[1].start_s < 6.0  # the window's own span


def test_an_unreachable_server_is_named() -> None:
    remote = pipeline(backend="openai", base_url="http://127.0.0.1:9/v1", model="x", max_retries=0, timeout_s=5)
    with pytest.raises(AsrError, match=r"cannot reach http://127.0.0.1:9/v1"):
        remote.transcriber.transcribe_many([load_audio_like(1.0)], language="en")


def load_audio_like(seconds: float) -> Any:
    from assistant.messages import Audio

    return Audio(np.zeros(int(16000 * seconds), np.float32))


def test_verbose_json_of_each_server_kind_becomes_a_transcript() -> None:
    word = {"word": " Hi.", "start": 0.1, "end": 0.4, "probability": 0.9}
    nested = {
        "language": "en",
        "text": "Hi.",
        "segments": [{"start": 0.0, "end": 1.0, "text": " Hi.", "words": [word]}],
    }
    transcript = transcript_of(nested, 2.0, None)
    assert transcript.language == "en" and transcript.segments[0].words[0].probability == 0.9
    text_only = transcript_of({"text": "你好", "language": "Chinese"}, 1.5, None)
    assert text_only.language == "zh" and text_only.segments[0].end_s == 1.5
    forced = transcript_of({"text": "x", "language": "english", "segments": []}, 1.0, "de")
    assert forced.language == "de"
