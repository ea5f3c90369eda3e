"""``POST /v1/audio/transcriptions`` and ``/v1/audio/translations`` as OpenAI's clients use them: every field of
docs/openai-compat.md's two tables honoured or refused by name (a real server on 127.0.0.1, the official openai
SDK), ``verbose_json`` segments with Whisper's own decoding values on both local backends (the offline whisper-base),
and streamed transcripts."""

from __future__ import annotations

import json
import re
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from assistant.audio.decode import load_audio
from assistant.config import AsrConfig, TranscribeConfig
from assistant.messages import Audio, Transcript
from assistant.pipeline import TranscriptionPipeline
from tests.conftest import EnergyVad, FakeTranscriber, require_offline_models, speak, tone, write_wav
from tests.test_server import client, start_server

openai = pytest.importorskip("openai")
requests = pytest.importorskip("requests")

DOCS = Path(__file__).parents[1] / "docs" / "openai-compat.md"
ROW = re.compile(r"^\| `(?P<field>[a-z_]+)` \| (?P<status>supported|refused|extension) \| .+ \|$")
FIRST, SECOND = "The quick brown fox jumps over the lazy dog.", "Please send the report by Friday."
LADDER = (0.0, 0.2, 0.4, 0.6, 0.8, 1.0)  # asr.temperatures' default
VOCABULARY = 51865  # Whisper's multilingual tokens, timestamps included
# a value for each field of the tables, as the openai SDK takes it
SAMPLES: dict[str, Any] = {
    "model": "whisper-1", "chunking_strategy": "auto", "include": ["logprobs"], "keywords": ["Friday"],
    "known_speaker_names": ["agent"], "known_speaker_references": ["data:audio/wav;base64,UklGRg=="],
    "language": "en", "languages": ["en", "de"], "prompt": "Fox, dog, report.", "response_format": "srt",
    "stream": True, "temperature": 0.2, "timestamp_granularities": ["word"],
}  # fmt: skip
NEEDS = {"timestamp_granularities": {"response_format": "verbose_json"}}  # what a field needs beside it


def table(section: str) -> list[tuple[str, str]]:
    """The (field, status) rows of one ``## POST ...`` section of docs/openai-compat.md."""
    text = DOCS.read_text(encoding="utf-8")
    body = text.split(f"## {section}\n", 1)[1].split("\n## ", 1)[0]
    return [(m["field"], m["status"]) for line in body.splitlines() if (m := ROW.match(line))]


TRANSCRIPTION_ROWS = table("POST /v1/audio/transcriptions")
TRANSLATION_ROWS = table("POST /v1/audio/translations")


@pytest.fixture(scope="module")
def server() -> Iterator[str]:
    require_offline_models("smollm2-135m", "whisper-base")
    process, base = start_server()
    yield base
    process.terminate()
    process.wait(timeout=30)


@pytest.fixture(scope="module")
def sentence(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """One short sentence: one speech window, quick to transcribe."""
    return speak(FIRST, tmp_path_factory.mktemp("sentence") / "first.wav")


@pytest.fixture(scope="module")
def speech(sentence: Path) -> Path:
    """Two sentences 3 s apart: two speech windows, the second starting well into the file."""
    second = load_audio(speak(SECOND, sentence.with_name("second.wav"))).samples
    pause = np.zeros(3 * 16000, np.float32)
    return write_wav(sentence.with_name("speech.wav"), np.concatenate([load_audio(sentence).samples, pause, second]))


def check_segments(segments: Sequence[Any], ladder: Sequence[float] = LADDER) -> None:
    """Whisper's decoding values, plausible for clear speech (the SDK's TranscriptionSegment or a dict)."""
    for segment in segments:
        item = segment if isinstance(segment, dict) else segment.model_dump()
        assert isinstance(item["seek"], int) and 0 <= item["seek"] / 100 <= item["start"] + 0.01, item
        assert item["start"] - item["seek"] / 100 < 30, "seek: the start of the 30 s window decoded"
        assert item["tokens"] and all(isinstance(t, int) and 0 <= t < VOCABULARY for t in item["tokens"])
        assert item["temperature"] in ladder
        assert -1.0 < item["avg_logprob"] < 0, item
        assert 0.5 < item["compression_ratio"] < 2.4, item
        assert 0.0 <= item["no_speech_prob"] < 0.5, item


def post(base: str, route: str, fields: dict[str, Any], speech: Path) -> requests.Response:
    with speech.open("rb") as audio:
        return requests.post(f"{base}/v1/audio/{route}", files={"file": ("speech.wav", audio)}, data=fields,
                             timeout=120)  # fmt: skip


def test_the_tables_cover_openais_fields() -> None:
    """Every form field of OpenAI's reference (the SDK's parameters) has a row, and nothing else does."""
    from openai.types.audio import transcription_create_params, translation_create_params

    ours = {field for field, _ in TRANSCRIPTION_ROWS}
    assert ours == set(transcription_create_params.TranscriptionCreateParamsBase.__annotations__) | {"stream"}
    assert {field for field, _ in TRANSLATION_ROWS} == set(translation_create_params.TranslationCreateParams
                                                             .__annotations__)  # fmt: skip


@pytest.mark.real_model
@pytest.mark.parametrize(("field", "status"), [(f, s) for f, s in TRANSCRIPTION_ROWS if f != "file"])
def test_every_transcription_field_is_honoured_or_refused_by_name(server: str, sentence: Path, field: str,
                                                                   status: str) -> None:  # fmt: skip
    api = client(server).audio.transcriptions
    options = {"model": "whisper-1", field: SAMPLES[field], **NEEDS.get(field, {})}
    with sentence.open("rb") as audio:
        answer = api.with_raw_response.create(file=audio, **options) if status == "supported" else None
    if answer is not None:
        assert answer.http_response.status_code == 200
        return
    with pytest.raises(openai.BadRequestError) as refused, sentence.open("rb") as audio:
        api.create(file=audio, **options)
    assert refused.value.status_code == 400
    assert refused.value.body["param"] == field and refused.value.body["type"] == "invalid_request_error"
    assert field in refused.value.body["message"]


@pytest.mark.real_model
def test_every_translation_field_is_honoured(server: str, sentence: Path) -> None:
    """All of them at once (each is supported, and they go together): one request, not one per row."""
    assert {status for _, status in TRANSLATION_ROWS} == {"supported"}
    options = {field: SAMPLES[field] for field, _ in TRANSLATION_ROWS if field != "file"}
    with sentence.open("rb") as audio:
        answer = client(server).audio.translations.with_raw_response.create(file=audio, **options)
    assert answer.http_response.status_code == 200 and "fox" in answer.http_response.text.lower()


@pytest.mark.real_model
def test_refusals_name_the_field_in_openais_shape(server: str, sentence: Path) -> None:
    """Fields outside the reference, values this server does not do, and malformed values: 400, param = field."""
    cases = [
        ("transcriptions", {"foo": "1"}, "foo"),
        ("translations", {"language": "en"}, "language"),
        ("translations", {"timestamp_granularities[]": "word"}, "timestamp_granularities"),
        ("transcriptions", {"chunking_strategy[type]": "server_vad"}, "chunking_strategy"),
        ("transcriptions", {"response_format": "diarized_json"}, "response_format"),
        ("transcriptions", {"temperature": "1.5"}, "temperature"),
        ("transcriptions", {"stream": "true", "response_format": "srt"}, "stream"),
        ("transcriptions", {"timestamp_granularities[]": "word"}, "timestamp_granularities"),
        ("transcriptions", {"language": "xx"}, "language"),
    ]
    for route, fields, param in cases:
        answer = post(server, route, {"model": "whisper-1", **fields}, sentence)
        error = answer.json()["error"]
        assert answer.status_code == 400 and error["param"] == param, (fields, error)
        assert error["type"] == "invalid_request_error" and param in error["message"]


@pytest.mark.real_model
def test_verbose_json_segments_carry_whispers_decoding_values(server: str, speech: Path, sentence: Path) -> None:
    api = client(server).audio.transcriptions
    with speech.open("rb") as audio:
        raw = api.with_raw_response.create(model="whisper-1", file=audio, response_format="verbose_json",
                                           timestamp_granularities=["segment", "word"])  # fmt: skip
    result = raw.parse()
    assert type(result).__name__ == "TranscriptionVerbose" and result.language == "english"
    assert "fox" in result.text.lower() and "report" in result.text.lower()
    check_segments(result.segments)
    assert result.segments[-1].seek >= 300, "the second window starts after the pause: its seek says where"
    assert [s.id for s in result.segments] == list(range(len(result.segments)))
    # what the server sent fits the SDK's types exactly (pydantic validation, not the SDK's lenient parsing)
    from openai.types.audio import TranscriptionVerbose

    TranscriptionVerbose.model_validate(json.loads(raw.http_response.text))
    with sentence.open("rb") as audio:
        warmer = api.create(model="whisper-1", file=audio, response_format="verbose_json", temperature=0.6)
    check_segments(warmer.segments, ladder=(0.6, 0.8, 1.0))  # the request's temperature starts the ladder


@pytest.mark.real_model
def test_translation_verbose_json_is_english(server: str, sentence: Path) -> None:
    with sentence.open("rb") as audio:
        result = client(server).audio.translations.create(model="whisper-1", file=audio,
                                                          response_format="verbose_json")  # fmt: skip
    assert type(result).__name__ == "TranslationVerbose" and result.language == "english"
    assert "fox" in result.text.lower()
    check_segments(result.segments)


@pytest.mark.real_model
def test_a_streamed_transcript_comes_as_openais_events(server: str, sentence: Path) -> None:
    with sentence.open("rb") as audio:
        events = list(client(server).audio.transcriptions.create(model="whisper-1", file=audio, stream=True))
    kinds = [event.type for event in events]
    assert kinds[-1] == "transcript.text.done" and set(kinds[:-1]) == {"transcript.text.delta"}, kinds
    assert "".join(event.delta for event in events[:-1]) == events[-1].text
    assert "fox" in events[-1].text.lower()
    with pytest.raises(openai.BadRequestError), sentence.open("rb") as audio:  # refused before any event
        list(client(server).audio.transcriptions.create(model="whisper-1", file=audio, stream=True, language="xx"))


@pytest.mark.real_model
def test_whisper_hf_segments_carry_the_same_values(speech: Path, sentence: Path) -> None:
    """transformers' Whisper: avg_logprob from the scores, no_speech_prob from the first decoder step,
    compression_ratio of the text, the temperature of the decode kept; the SDK's types take them."""
    from openai.types.audio import TranscriptionVerbose

    from assistant.config import VadConfig
    from assistant.io.uploads import verbose_json
    from assistant.models import OFFLINE_BUNDLES, bundle_status
    from tests.conftest import require

    require(bundle_status(OFFLINE_BUNDLES["whisper-base"]) != "not installed", "offline whisper-base not installed")
    pipeline = TranscriptionPipeline.from_config_parts(AsrConfig(backend="whisper-hf", language="en"), VadConfig(),
                                                       TranscribeConfig())  # fmt: skip
    transcript = pipeline.transcribe_file(speech).transcript
    document = verbose_json(transcript, frozenset({"segment"}))
    check_segments(document["segments"])
    assert document["segments"][-1]["seek"] >= 300
    assert TranscriptionVerbose.model_validate(document).language == "english"
    hotter = pipeline.transcriber.transcribe_many([load_audio(sentence)], language="en", temperatures=(0.4, 1.0))
    assert {s.temperature for s in hotter[0].segments} <= {0.4, 1.0}


class RecordingTranscriber(FakeTranscriber):
    """The fake recogniser, keeping the per-request choices each call was given."""

    def __init__(self) -> None:
        super().__init__()
        self.choices: list[dict[str, Any]] = []

    def transcribe_many(self, audios: Sequence[Audio], *, language: str | None, task: str = "transcribe",
                        timestamps: bool = True, word_timestamps: bool = False,
                        **choices: Any) -> list[Transcript]:  # fmt: skip
        self.choices.append({"task": task, **choices})
        return super().transcribe_many(audios, language=language, task=task, word_timestamps=word_timestamps)


def test_a_requests_task_prompt_and_temperature_reach_the_recogniser(tmp_path: Path) -> None:
    transcriber = RecordingTranscriber()
    pipeline = TranscriptionPipeline(transcriber, EnergyVad(), asr=AsrConfig(), transcribe=TranscribeConfig())
    path = write_wav(tmp_path / "tone.wav", tone(1.0))
    pipeline.transcribe_file(path)
    assert transcriber.choices[-1] == {"task": "transcribe"}, "nothing asked: the configuration decides"
    blocks: list[int] = []
    pipeline.transcribe_file(path, task="translate", prompt="Glossary.", temperature=0.4,
                             on_segments=lambda segments: blocks.append(len(segments)))  # fmt: skip
    assert transcriber.choices[-1] == {"task": "translate", "prompt": "Glossary.", "temperatures": (0.4, 0.6, 0.8, 1.0)}
    assert blocks == [1]


def test_the_remote_backend_keeps_the_servers_decoding_values() -> None:
    """``asr.backend: openai`` passes a server's values through, and leaves out what the server left out."""
    from assistant.asr.openai_remote import transcript_of

    detailed = {"id": 0, "seek": 0, "start": 0.2, "end": 1.1, "text": " Hello.", "tokens": [50364, 2425, 13, 50414],
                "temperature": 0.2, "avg_logprob": -0.31, "compression_ratio": 0.75,
                "no_speech_prob": 0.01}  # fmt: skip
    bare = {"id": 1, "start": 1.2, "end": 1.9, "text": " Bye.", "avg_logprob": None}
    transcript = transcript_of({"text": "Hello. Bye.", "language": "english", "segments": [detailed, bare]}, 2.0, None)
    first, second = transcript.segments
    assert (first.seek, first.tokens, first.temperature) == (0, (50364, 2425, 13, 50414), 0.2)
    assert (first.avg_logprob, first.compression_ratio, first.no_speech_prob) == (-0.31, 0.75, 0.01)
    assert (second.seek, second.tokens, second.avg_logprob, second.no_speech_prob) == (None, None, None, None)
    assert first.shifted(1.5).seek == 150 and second.shifted(1.5).seek is None
