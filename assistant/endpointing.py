"""Endpointing: cut a live 16 kHz stream into utterances with a frame-level speech probability (Silero).

Speech starts when the probability rises over ``vad.threshold`` and stays speech for ``vad.min_speech_ms`` (shorter
bursts, clicks and coughs, are dropped and never interrupt a reply). It ends after ``vad.min_silence_ms`` under the
lower threshold (threshold - 0.15, Silero's own hysteresis), or when it reaches ``input.max_utterance_s``; an
end-of-turn detector may set another window for the utterance in progress (``require_silence_ms``). The
utterance keeps ``vad.speech_pad_ms`` of audio before and after. No torch here: the probability comes from the VAD
backend, so this is tested with a synthetic one.
"""

from __future__ import annotations

import time
from collections import deque
from collections.abc import Callable, Iterator

import numpy as np

from assistant.config import VadConfig
from assistant.messages import SAMPLE_RATE, Audio, SpeechStarted, Utterance

FRAME_SAMPLES = 512  # 32 ms at 16 kHz: the window Silero VAD scores
FRAME_S = FRAME_SAMPLES / SAMPLE_RATE
HYSTERESIS = 0.15  # speech continues until the probability drops below threshold - this

SpeechProbability = Callable[[np.ndarray], float]
Event = SpeechStarted | Utterance


class Endpointer:
    def __init__(
        self,
        probability: SpeechProbability,
        vad: VadConfig,
        *,
        max_utterance_s: float,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._probability = probability
        self._threshold = vad.threshold
        self._min_speech = max(1, round(vad.min_speech_ms / 1000 / FRAME_S))
        self._end_silence = max(1, round(vad.min_silence_ms / 1000 / FRAME_S))
        self._pad = round(vad.speech_pad_ms / 1000 / FRAME_S)
        self._max_frames = max(1, round(max_utterance_s / FRAME_S))
        self._clock = clock
        self._pending = np.zeros(0, np.float32)
        self._preroll: deque[np.ndarray] = deque(maxlen=self._pad + 1)
        self._frames_seen = 0
        self._reset_utterance()

    def _reset_utterance(self) -> None:
        self._speech: list[np.ndarray] = []  # frames of the current utterance (pre-roll included)
        self._start_frame = 0
        self._speech_frames = 0  # frames over the threshold
        self._silence_run = 0
        self._started = False
        self._last_speech_clock = 0.0
        self._needed_silence = self._end_silence  # this utterance's window (require_silence_ms)

    def push(self, samples: np.ndarray) -> Iterator[Event]:
        """Feed captured 16 kHz samples; yields SpeechStarted and Utterance events as they happen."""
        self._pending = np.concatenate([self._pending, samples.astype(np.float32, copy=False)])
        while len(self._pending) >= FRAME_SAMPLES:
            frame, self._pending = self._pending[:FRAME_SAMPLES], self._pending[FRAME_SAMPLES:]
            yield from self._frame(frame)

    def current_speech(self) -> np.ndarray | None:
        """The samples of the utterance in progress (pre-roll included), None when no speech has started; while
        the latest frame is still speech (not in a pause that may end the utterance). For partial transcripts."""
        if not self._started or self._silence_run:
            return None
        return np.concatenate(self._speech)

    def settled_speech(self) -> np.ndarray | None:
        """In a pause after speech, once ``speech_pad_ms`` of it has passed, the utterance is fixed: more silence is
        trimmed, so if the pause lasts until ``min_silence_ms`` these are exactly its samples. None otherwise. Lets a
        recogniser start before the end of the turn is certain."""
        if not self._started or self._silence_run < max(self._pad, 1):
            return None
        keep = len(self._speech) - (self._silence_run - self._pad)
        return np.concatenate(self._speech[:keep])

    def require_silence_ms(self, milliseconds: float) -> None:
        """The silence that ends the utterance in progress, instead of ``vad.min_silence_ms`` (an end-of-turn
        detector's verdict on what was said); never shorter than the ``speech_pad_ms`` the utterance keeps, so the
        settled cut stays the utterance. The next utterance starts with the configured window again."""
        frames = round(milliseconds / 1000 / FRAME_S)
        self._needed_silence = max(1, self._pad + 1, frames)

    def end_if_silent(self) -> Iterator[Event]:
        """End the utterance now if its pause is already as long as the window asks (after a shorter window was
        set by ``require_silence_ms``, without waiting for the next frame)."""
        if self._started and self._silence_run >= self._needed_silence:
            yield self._utterance(trailing_silence=self._silence_run)
            self._reset_utterance()
            self._preroll.clear()

    @property
    def pad_samples(self) -> int:
        """Samples of padding an utterance keeps after its last speech frame."""
        return self._pad * FRAME_SAMPLES

    def flush(self) -> Iterator[Event]:
        """End of input: an utterance in progress ends here."""
        if self._speech and self._speech_frames >= self._min_speech:
            yield self._utterance(trailing_silence=self._silence_run)
        self._reset_utterance()

    def _frame(self, frame: np.ndarray) -> Iterator[Event]:
        probability = self._probability(frame)
        index = self._frames_seen
        self._frames_seen += 1
        if not self._speech:
            self._preroll.append(frame)
            if probability >= self._threshold:
                self._speech = list(self._preroll)
                self._start_frame = index - len(self._preroll) + 1
                self._speech_frames = 1
                self._last_speech_clock = self._clock()
            return
        self._speech.append(frame)
        in_band = probability >= self._threshold - HYSTERESIS and self._silence_run == 0  # speech tails off slowly
        if probability >= self._threshold or in_band:
            self._silence_run = 0
            self._speech_frames += 1
            self._last_speech_clock = self._clock()
        else:
            self._silence_run += 1
        if not self._started and self._speech_frames >= self._min_speech:
            self._started = True
            yield SpeechStarted(self._start_frame * FRAME_S)
        if self._silence_run >= self._needed_silence or len(self._speech) >= self._max_frames:
            if self._speech_frames >= self._min_speech:
                yield self._utterance(trailing_silence=self._silence_run)
            self._reset_utterance()
            self._preroll.clear()

    def _utterance(self, *, trailing_silence: int) -> Utterance:
        keep = len(self._speech) - max(0, trailing_silence - self._pad)
        samples = np.concatenate(self._speech[:keep])
        return Utterance(Audio(samples, SAMPLE_RATE, self._start_frame * FRAME_S), self._last_speech_clock)
