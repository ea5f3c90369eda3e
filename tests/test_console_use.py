"""The console as people use it (issue 21): speech with no lead-in keeps its first word, the same audio gives the same
transcript on every run; text in any encoding; a pasted paragraph is one turn; a quiet exit from a microphone chat."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from assistant.audio.decode import load_audio
from assistant.config import AsrConfig, Config, VadConfig
from assistant.pipeline import TranscriptionPipeline
from tests.conftest import require_offline_models, speak, write_wav

pytestmark = pytest.mark.real_model

BACKENDS = ["faster-whisper", "whisper-hf"]


def trimmed(path: Path) -> Path:
    """The clip cut to start at its first loud sample and end at its last: no lead-in, as a push-to-talk clip, a
    trimmed recording or a client-side VAD's utterance has."""
    samples = load_audio(path).samples
    loud = np.flatnonzero(np.abs(samples) > 0.02)
    return write_wav(path.with_name(f"trimmed-{path.name}"), samples[loud[0] : loud[-1] + 1])


@pytest.fixture(scope="module")
def clips(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    require_offline_models("whisper-base")
    folder = tmp_path_factory.mktemp("clips")
    # whisper-base heard these as "What is the weather like today?" and "the S. Tell me I don't come out of cars."
    # (faster-whisper), "The S. L.M.I.N.O.C.M. outcast." (whisper-hf) before the silence in front
    return {
        "hello": trimmed(speak("Hello, what is the weather like today?", folder / "hello.wav", voice="en")),
        "cats": trimmed(speak("Yes. Tell me a joke about cats.", folder / "cats.wav", voice="en",
                              words_per_minute=190)),
    }  # fmt: skip


def transcribe(path: Path, backend: str, **asr: object) -> str:
    """A fresh pipeline each time (a new run as far as the models' random generators go): the file's text."""
    config = Config(asr=AsrConfig(backend=backend, language="en", **asr), vad=VadConfig())  # type: ignore[arg-type]
    return TranscriptionPipeline.from_config(config).transcribe_file(path).transcript.text


@pytest.mark.parametrize("backend", BACKENDS)
def test_speech_from_the_first_sample_keeps_its_first_word(clips: dict[str, Path], backend: str) -> None:
    texts = [transcribe(clips["hello"], backend) for _ in range(3)]
    assert texts[0].lower().startswith("hello"), texts
    assert texts[1:] == texts[:2]
    assert transcribe(clips["cats"], backend).lower().startswith("yes"), backend


@pytest.mark.parametrize("backend", BACKENDS)
def test_the_sampled_fallback_gives_the_same_text_every_run(clips: dict[str, Path], backend: str) -> None:
    """Temperature 1 only: every window is sampled (as the fallback does), seeded by ``asr.seed``."""
    texts = [transcribe(clips["cats"], backend, temperatures=(1.0,)) for _ in range(3)]
    assert texts[0] and texts[1:] == texts[:2], texts
    assert texts[0].lower().startswith("ye"), texts  # "Yes" or "Yea": sampled
