"""Endpointing on synthetic audio with a synthetic speech probability (loud frame = speech)."""

from __future__ import annotations

import numpy as np

from assistant.config import VadConfig
from assistant.endpointing import FRAME_SAMPLES, Endpointer
from assistant.messages import SpeechStarted, Utterance
from assistant.voice import PushToTalk
from tests.conftest import silence, tone


def loudness(frame: np.ndarray) -> float:
    return 1.0 if np.abs(frame).max() > 0.05 else 0.0


def endpoint(samples: np.ndarray, *, piece: int = 1000, max_utterance_s: float = 30.0, **vad: int) -> list:
    endpointer = Endpointer(loudness, VadConfig(**vad), max_utterance_s=max_utterance_s, clock=lambda: 0.0)
    events = []
    for start in range(0, len(samples), piece):  # odd piece sizes: frames must be re-assembled across pieces
        events += list(endpointer.push(samples[start : start + piece]))
    return events + list(endpointer.flush())


def test_two_phrases_make_two_utterances_with_padding() -> None:
    audio = np.concatenate([silence(1), tone(1.0), silence(1), tone(1.5), silence(1)])
    events = endpoint(audio, min_silence_ms=500, speech_pad_ms=200)
    kinds = [type(e).__name__ for e in events]
    assert kinds == ["SpeechStarted", "Utterance", "SpeechStarted", "Utterance"]
    first, second = events[1], events[3]
    assert abs(first.audio.start_s - 0.8) < 0.07 and abs(second.audio.start_s - 2.8) < 0.07
    assert 1.3 < first.audio.duration_s < 1.5  # 1 s of speech + 200 ms pad on each side
    assert abs(events[0].at_s - first.audio.start_s) < 1e-9


def test_a_short_pause_does_not_end_the_turn() -> None:
    audio = np.concatenate([tone(1.0), silence(0.3), tone(1.0), silence(1)])
    events = endpoint(audio, min_silence_ms=600)
    assert [type(e) for e in events] == [SpeechStarted, Utterance]


def test_clicks_shorter_than_min_speech_are_ignored() -> None:
    audio = np.concatenate([silence(0.5), tone(0.1), silence(1.5)])
    assert endpoint(audio, min_speech_ms=250) == []


def test_long_speech_is_cut_at_max_utterance() -> None:
    events = endpoint(np.concatenate([tone(5.0), silence(1)]), max_utterance_s=2.0)
    utterances = [e for e in events if isinstance(e, Utterance)]
    assert len(utterances) == 3 and abs(utterances[0].audio.duration_s - 2.0) < 0.1


def test_speech_running_into_the_end_of_input_is_flushed() -> None:
    events = endpoint(np.concatenate([silence(0.5), tone(1.0)]))
    assert isinstance(events[-1], Utterance) and events[-1].audio.duration_s > 1.0
    assert FRAME_SAMPLES == 512  # Silero's window at 16 kHz


def test_push_to_talk_cuts_where_the_key_was_pressed() -> None:
    gate = PushToTalk(max_utterance_s=30, clock=lambda: 0.0)
    events = list(gate.push(tone(0.5)))
    gate.toggle()
    events += list(gate.push(tone(0.5))) + list(gate.push(silence(0.5)))
    gate.toggle()
    events += list(gate.push(silence(0.5)))
    assert [type(e) for e in events] == [SpeechStarted, Utterance]
    assert events[1].audio.duration_s == 1.0 and events[1].audio.start_s == 0.5
