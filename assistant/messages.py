"""The only types that stages share. Plain values: stages take these in and give these back."""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from typing import Literal, Protocol

import numpy as np

SAMPLE_RATE = 16_000  # Hz; every stage after decoding works at this rate


@dataclass(frozen=True)
class Audio:
    """Mono float32 samples in [-1, 1] at ``sample_rate`` Hz, starting ``start_s`` seconds into its source."""

    samples: np.ndarray
    sample_rate: int = SAMPLE_RATE
    start_s: float = 0.0

    @property
    def duration_s(self) -> float:
        return len(self.samples) / self.sample_rate

    @property
    def end_s(self) -> float:
        return self.start_s + self.duration_s

    def slice(self, start_s: float, end_s: float) -> Audio:
        """The part between two times relative to this piece's own start."""
        first = max(0, round(start_s * self.sample_rate))
        last = min(len(self.samples), round(end_s * self.sample_rate))
        return Audio(self.samples[first:last], self.sample_rate, self.start_s + first / self.sample_rate)


@dataclass(frozen=True)
class Span:
    """A stretch of time in seconds (speech found by the VAD, a window sent to the recogniser)."""

    start_s: float
    end_s: float

    @property
    def duration_s(self) -> float:
        return self.end_s - self.start_s


@dataclass(frozen=True)
class Segment:
    """A stretch of recognised speech; times in seconds from the start of the source."""

    start_s: float
    end_s: float
    text: str

    def shifted(self, offset_s: float) -> Segment:
        return Segment(self.start_s + offset_s, self.end_s + offset_s, self.text)


@dataclass(frozen=True)
class Transcript:
    text: str
    language: str | None
    segments: tuple[Segment, ...] = ()
    audio_s: float = 0.0


@dataclass(frozen=True)
class Timings:
    """Wall seconds spent per stage of one job."""

    decode_s: float = 0.0
    vad_s: float = 0.0
    asr_s: float = 0.0
    total_s: float = 0.0


Role = Literal["system", "user", "assistant"]
ROLES: tuple[Role, ...] = ("system", "user", "assistant")


@dataclass(frozen=True)
class Message:
    """One turn of a conversation. ``cut`` marks a reply that was stopped before the model finished it."""

    role: Role
    content: str
    cut: bool = False


@dataclass(frozen=True)
class ReplyStats:
    """How one reply was generated: prompt size, reply size, time to first token and decode speed."""

    prompt_tokens: int = 0
    cached_tokens: int = 0  # prompt tokens whose KV cache was reused from the previous turn
    completion_tokens: int = 0
    first_token_s: float = 0.0  # from the request to the first generated token
    total_s: float = 0.0
    finish_reason: str = "stop"  # stop | length | cancelled

    @property
    def decode_tokens_per_s(self) -> float:
        """Generated tokens per second after the first one (the prompt is excluded)."""
        decode_s = self.total_s - self.first_token_s
        return (self.completion_tokens - 1) / decode_s if self.completion_tokens > 1 and decode_s > 0 else 0.0


@dataclass(frozen=True)
class SpeechStarted:
    """The endpointer heard speech begin (long enough not to be a click): the moment to barge in."""

    at_s: float  # seconds into the source


@dataclass(frozen=True)
class Utterance:
    """One spoken turn, cut by the endpointer (or push-to-talk)."""

    audio: Audio
    speech_end_clock: float  # time.monotonic() when the last speech sample was captured


@dataclass(frozen=True)
class TurnMetrics:
    """Latency of one voice turn, in milliseconds from the end of speech (the VAD's silence window included)."""

    audio_s: float
    speech_end_to_transcript_ms: float
    transcript_to_first_char_ms: float
    speech_end_to_first_char_ms: float
    tokens_per_s: float
    cut: bool = False


@dataclass(frozen=True)
class EndOfRecording:
    """A source's marker between recordings (files): an utterance in progress ends here."""

    name: str


class AudioSource(Protocol):
    """Spoken input as 16 kHz float32 mono pieces. ``live``: captured as it happens (barge-in applies)."""

    live: bool

    def chunks(self) -> Iterator[np.ndarray | EndOfRecording | Exception]:
        """Pieces of audio in order; an Exception item is a per-recording failure (the source goes on)."""
        ...

    def close(self) -> None: ...


class ReplySink(Protocol):
    """Where a voice turn is shown or recorded."""

    def transcript(self, text: str, utterance: Utterance) -> None: ...

    def delta(self, text: str) -> None: ...

    def turn_done(self, transcript: str, reply: str, metrics: TurnMetrics) -> None: ...

    def error(self, message: str) -> None: ...

    def notice(self, message: str) -> None: ...
