"""Level normalisation: speech recorded far too quietly is brought up before the VAD and the recogniser hear it.

Whisper's log-mel features floor power at 1e-10 and Silero VAD was trained on speech at ordinary levels, so a
recording 40-50 dB too quiet loses its consonants and its first words. A gain fixes that, but a gain that brought
any signal to a fixed level would turn room noise or dither into something that sounds like speech. The rule:

- levels are RMS over 30 ms frames, in dBFS; frames of digital silence are ignored;
- the *speech level* is the 95th percentile of the frame levels, the *noise floor* the 10th percentile;
- the gain raises the speech level to ``TARGET_DBFS`` but never the noise floor above ``NOISE_CEILING_DBFS``, and is
  never more than ``MAX_GAIN_DB`` nor less than 0 (loud audio is left alone).

Stationary noise has its speech level close to its noise floor, so it gains almost nothing: silence stays silence.
Files get one gain per block (``transcribe.block_s``), so the dynamics inside a block are kept; live streams get a
gain that follows the recent level slowly (``StreamLevel``). The percentile rule is the usual one in speech tools
(e.g. ITU-T P.56's active speech level uses the loud frames, not the mean).
"""

from __future__ import annotations

import collections
from dataclasses import replace

import numpy as np

from assistant.messages import SAMPLE_RATE, Audio

FRAME_S = 0.03
TARGET_DBFS = -20.0
NOISE_CEILING_DBFS = -55.0
MAX_GAIN_DB = 50.0
SILENT_FRAME_RMS = 1e-7  # digital silence (below 16-bit resolution)
STREAM_HISTORY_S = 10.0  # how much recent audio a live stream's gain is measured on
STREAM_SLEW_DB_PER_S = 20.0  # how fast a live stream's gain may change


def frame_levels(samples: np.ndarray, sample_rate: int = SAMPLE_RATE) -> np.ndarray:
    """dBFS of each whole 30 ms frame that is not digital silence."""
    frame = max(1, int(FRAME_S * sample_rate))
    count = len(samples) // frame
    if count == 0:
        return np.zeros(0, np.float32)
    rms = np.sqrt(np.square(samples[: count * frame].reshape(count, frame), dtype=np.float64).mean(axis=1))
    rms = rms[rms > SILENT_FRAME_RMS]
    return (20 * np.log10(rms)).astype(np.float32)


def gain_db(levels: np.ndarray) -> float:
    """The gain (dB, >= 0) the rule above gives for these frame levels."""
    if levels.size == 0:
        return 0.0
    speech, noise = np.percentile(levels, 95), np.percentile(levels, 10)
    return float(np.clip(min(TARGET_DBFS - speech, NOISE_CEILING_DBFS - noise, MAX_GAIN_DB), 0.0, None))


def normalize(audio: Audio) -> tuple[Audio, float]:
    """``audio`` with the rule's gain applied (clipped to [-1, 1]), and that gain in dB."""
    gain = gain_db(frame_levels(audio.samples, audio.sample_rate))
    if gain < 0.5:
        return audio, 0.0
    louder = np.clip(audio.samples * np.float32(10 ** (gain / 20)), -1.0, 1.0).astype(np.float32)
    return replace(audio, samples=louder), gain


class StreamLevel:
    """The same rule on a live stream (a microphone, a WebSocket): the gain is measured on the last 10 s heard and
    moves at most 20 dB per second, so it neither pumps within a word nor lags for long after the level changes."""

    def __init__(self, sample_rate: int = SAMPLE_RATE) -> None:
        self._sample_rate = sample_rate
        self._levels: collections.deque[float] = collections.deque(maxlen=int(STREAM_HISTORY_S / FRAME_S))
        self._rest = np.zeros(0, np.float32)
        self.gain_db = 0.0

    def apply(self, samples: np.ndarray) -> np.ndarray:
        """``samples`` (mono float32) with the current gain; updates the gain from them."""
        pending = np.concatenate([self._rest, samples]) if self._rest.size else samples
        frame = int(FRAME_S * self._sample_rate)
        whole = len(pending) // frame * frame
        self._levels.extend(frame_levels(pending[:whole], self._sample_rate).tolist())
        self._rest = pending[whole:].copy()
        wanted = gain_db(np.asarray(self._levels, np.float32))
        step = STREAM_SLEW_DB_PER_S * len(samples) / self._sample_rate
        self.gain_db += float(np.clip(wanted - self.gain_db, -step, step))
        if self.gain_db < 0.5:
            return samples
        return np.clip(samples * np.float32(10 ** (self.gain_db / 20)), -1.0, 1.0).astype(np.float32)
