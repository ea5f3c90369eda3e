"""The only types that stages share. Plain values: stages take these in and give these back."""

from __future__ import annotations

from dataclasses import dataclass

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
