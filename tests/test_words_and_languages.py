"""Word timestamps and per-window languages on the real whisper-base weights, through both backends."""

from __future__ import annotations

import numpy as np
import pytest

from assistant.audio.decode import load_audio
from assistant.config import AsrConfig, TranscribeConfig, VadConfig
from assistant.models import OFFLINE_BUNDLES, bundle_status
from assistant.pipeline import TranscriptionPipeline
from tests.conftest import require, speak, write_wav
from tests.test_real_asr import similarity

pytestmark = pytest.mark.real_model
ENGLISH = "Good morning everyone and welcome to the weekly planning meeting."
GERMAN = "Guten Morgen zusammen. Heute sprechen wir über das Budget für das nächste Quartal."
ENGLISH_AGAIN = "Please call me back tomorrow morning."


def _pipeline(backend: str, **asr) -> TranscriptionPipeline:
    return TranscriptionPipeline.from_config_parts(AsrConfig(backend=backend, **asr), VadConfig(), TranscribeConfig())


@pytest.fixture(scope="module")
def pipelines():
    require(bundle_status(OFFLINE_BUNDLES["whisper-base"]) != "not installed", "offline whisper-base not installed")
    return {backend: _pipeline(backend) for backend in ("faster-whisper", "whisper-hf")}


@pytest.fixture(scope="module")
def mixed(tmp_path_factory):
    """English, German, English, each after a 3 s pause (longer than a window may span)."""
    folder = tmp_path_factory.mktemp("mixed")
    parts = [
        load_audio(speak(ENGLISH, folder / "en.wav")).samples,
        load_audio(speak(GERMAN, folder / "de.wav", voice="de")).samples,
        load_audio(speak(ENGLISH_AGAIN, folder / "en2.wav")).samples,
    ]
    pause = np.zeros(3 * 16000, np.float32)
    return write_wav(folder / "mixed.wav", np.concatenate([pause, parts[0], pause, parts[1], pause, parts[2]]))


@pytest.fixture(scope="module")
def sentence(tmp_path_factory):
    return speak(ENGLISH + " " + ENGLISH_AGAIN, tmp_path_factory.mktemp("words") / "words.wav")


@pytest.mark.parametrize("backend", ["faster-whisper", "whisper-hf"])
def test_each_language_is_transcribed_in_its_own_language(pipelines, mixed, backend):
    transcript = pipelines[backend].transcribe_file(mixed).transcript
    languages = [s.language for s in transcript.segments]
    german = " ".join(s.text for s in transcript.segments if s.language == "de")
    assert "de" in languages and languages[0] == "en" and languages[-1] == "en", transcript.segments
    assert similarity(german, GERMAN) >= 0.6, f"German kept German, not translated: {german!r}"
    assert transcript.language == "en", "the file's main language: the most speech"


def test_a_given_language_is_still_forced(mixed):
    transcript = _pipeline("faster-whisper", language="en").transcribe_file(mixed).transcript
    assert {s.language for s in transcript.segments} == {"en"}


@pytest.mark.parametrize("backend", ["faster-whisper", "whisper-hf"])
def test_words_cover_their_segments_in_order(pipelines, sentence, backend):
    transcript = pipelines[backend].transcribe_file(sentence, word_timestamps=True).transcript
    for segment in transcript.segments:
        assert segment.words, segment
        assert "".join(w.word for w in segment.words).split() == segment.text.split()
        for word in segment.words:
            assert segment.start_s - 0.05 <= word.start_s <= word.end_s <= segment.end_s + 0.05
            assert 0.0 <= word.probability <= 1.0
        starts = [w.start_s for w in segment.words]
        assert starts == sorted(starts)


def test_both_backends_agree_on_word_times(pipelines, sentence):
    """The same weights through the two engines: word times within a few hundred ms of faster-whisper's."""
    reference = [w for s in pipelines["faster-whisper"].transcribe_file(sentence, word_timestamps=True)
                 .transcript.segments for w in s.words]  # fmt: skip
    ours = [w for s in pipelines["whisper-hf"].transcribe_file(sentence, word_timestamps=True).transcript.segments
            for w in s.words]  # fmt: skip
    pairs = [
        (a, b)
        for a, b in zip(reference, ours, strict=False)
        if a.word.strip(".,").lower() == b.word.strip(".,").lower()
    ]
    assert len(pairs) >= 0.8 * len(reference)
    starts = np.array([abs(a.start_s - b.start_s) for a, b in pairs])
    ends = np.array([abs(a.end_s - b.end_s) for a, b in pairs])
    assert starts.mean() <= 0.2 and ends.mean() <= 0.2 and starts.max() <= 0.5, (starts, ends)
