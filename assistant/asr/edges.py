"""Silence around every window handed to a local Whisper, so that it hears the first and the last word.

Whisper was trained on 30 s windows cut from long recordings, where speech rarely starts at the window's first
sample. Speech that does (a push-to-talk clip, a trimmed recording, a client-side VAD's utterance, a file's first
word) loses its first word or turns to letters: "Hello, what is the weather like today?" spoken by espeak-ng and
trimmed to its first sample comes back from whisper-base as "What is the weather like today?" or "below what is
...". 50 ms of silence in front already brings the word back on the clips we measured (tests/test_console_use.py);
``LEAD_S`` keeps a margin. Whisper's own zero padding of the mel does not help: it pads only after the audio.

Both local backends decorate their entry points (``transcribe_many``, ``transcribe_partial``, and faster-whisper's
live window decode that ``transcribe_live`` routes short utterances to) with these, so every
path (files, ``chat --audio``, the microphone, push-to-talk, HTTP uploads, WebSocket commits) gets the silence in
one place, and the times they return are shifted back onto the caller's audio (clamped to its bounds).
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace
from typing import Concatenate, ParamSpec, TypeVar

import numpy as np

from assistant.messages import Audio, Segment, Transcript, Word, shifted_seek

LEAD_S = 0.3  # silence put before the audio, seconds (50 ms was the least that kept the first words measured)
TAIL_S = 0.3  # and after it, so the last word is not cut at the window's end
WINDOW_S = 30.0  # Whisper's window: audio that fits stays within it once padded (no long-form decoding)

P = ParamSpec("P")
S = TypeVar("S")
R = TypeVar("R", Transcript, Transcript | None)  # a window's transcript, or None where a backend has none yet


@dataclass(frozen=True)
class Edges:
    """The silence added around one piece of audio, and that audio's own length (the bounds times are kept in)."""

    lead_s: float
    tail_s: float
    audio_s: float

    @classmethod
    def around(cls, audio: Audio) -> Edges:
        """``LEAD_S`` before and ``TAIL_S`` after; audio that fits in Whisper's window gets only what still fits."""
        room = max(0.0, WINDOW_S - audio.duration_s) if audio.duration_s <= WINDOW_S else LEAD_S + TAIL_S
        lead = min(LEAD_S, room)
        return cls(lead, min(TAIL_S, room - lead), audio.duration_s)

    def pad(self, audio: Audio) -> Audio:
        """``audio`` with the silence around it (its ``start_s`` kept: the backends read times from the start)."""
        lead = np.zeros(round(self.lead_s * audio.sample_rate), dtype=np.float32)
        tail = np.zeros(round(self.tail_s * audio.sample_rate), dtype=np.float32)
        samples = np.concatenate([lead, np.asarray(audio.samples, dtype=np.float32), tail])
        return Audio(samples, audio.sample_rate, audio.start_s)

    def unpad(self, transcript: Transcript) -> Transcript:
        """A transcript of the padded audio with its times on the original audio's: shifted back by the lead,
        clamped to [0, the audio's length]."""
        segments = tuple(self._segment(segment) for segment in transcript.segments)
        return replace(transcript, segments=segments, audio_s=self.audio_s)

    def _time(self, seconds: float, low: float = 0.0) -> float:
        return min(max(seconds - self.lead_s, low), self.audio_s)

    def _segment(self, segment: Segment) -> Segment:
        start = self._time(segment.start_s)
        words = []
        for word in segment.words:
            word_start = self._time(word.start_s, start)
            words.append(Word(word.word, word_start, self._time(word.end_s, word_start), word.probability))
        seek = shifted_seek(segment.seek, -self.lead_s)
        return replace(segment, start_s=start, end_s=self._time(segment.end_s, start), words=tuple(words),
                       seek=None if seek is None else max(0, seek))  # fmt: skip


def silent_edges_many(
    method: Callable[Concatenate[S, Sequence[Audio], P], list[R]],
) -> Callable[Concatenate[S, Sequence[Audio], P], list[R]]:
    """``transcribe_many`` (or a backend's own decode of several windows) with each window padded
    (``Edges.around``) and its transcript's times shifted back; a None result stays None."""

    @functools.wraps(method)
    def padded(self: S, audios: Sequence[Audio], /, *args: P.args, **kwargs: P.kwargs) -> list[R]:
        edges = [Edges.around(audio) for audio in audios]
        results = method(self, [edge.pad(audio) for edge, audio in zip(edges, audios, strict=True)], *args, **kwargs)
        return [result if result is None else edge.unpad(result) for edge, result in zip(edges, results, strict=True)]

    return padded


def silent_edges_one(
    method: Callable[Concatenate[S, Audio, P], Transcript],
) -> Callable[Concatenate[S, Audio, P], Transcript]:
    """A one-window entry point (``transcribe_partial``) padded the same way."""

    @functools.wraps(method)
    def padded(self: S, audio: Audio, /, *args: P.args, **kwargs: P.kwargs) -> Transcript:
        edges = Edges.around(audio)
        return edges.unpad(method(self, edges.pad(audio), *args, **kwargs))

    return padded
