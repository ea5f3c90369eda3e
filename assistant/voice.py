"""The voice turn loop: audio source -> endpointing (VAD or push-to-talk) -> ASR -> chat -> sinks.

Two threads. The *ears* read the source and run the endpointer, so listening never stops, also while a reply
streams: speech that starts during a reply cancels it (barge-in) and becomes the next turn. The main thread takes
utterances one at a time: transcribes, sends the text to the chat session, streams the reply to every sink, and
reports per-turn latency measured from the end of speech. A failing turn (ASR or LLM error) is reported and the
session goes on; noise that transcribes to nothing takes no turn.
"""

from __future__ import annotations

import queue
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from typing import Protocol

import numpy as np

from assistant import registry
from assistant.asr.base import Transcriber
from assistant.asr.text import apply_zh_script
from assistant.chat import ChatSession
from assistant.config import Config
from assistant.endpointing import Endpointer
from assistant.errors import AsrError, AssistantError, AudioSourceError
from assistant.messages import (
    SAMPLE_RATE,
    Audio,
    AudioSource,
    EndOfRecording,
    ReplySink,
    SpeechStarted,
    TurnMetrics,
    Utterance,
)
from assistant.pipeline import normalize_language

_END = object()  # the ears are done


class Segmenter(Protocol):
    """Cuts a stream into utterances: the VAD endpointer or push-to-talk."""

    def push(self, samples: np.ndarray) -> Iterator[SpeechStarted | Utterance]: ...

    def flush(self) -> Iterator[SpeechStarted | Utterance]: ...


class PushToTalk:
    """Enter starts a turn and Enter ends it (``toggle`` is called from the thread that reads the keyboard)."""

    def __init__(self, *, max_utterance_s: float, clock: Callable[[], float] = time.monotonic) -> None:
        self.recording = threading.Event()
        self._max_samples = int(max_utterance_s * SAMPLE_RATE)
        self._clock = clock
        self._buffer: list[np.ndarray] = []
        self._buffered = 0  # samples in the buffer
        self._heard = 0  # samples seen so far
        self._start = 0  # sample where the current recording began
        self._was_recording = False

    def toggle(self) -> None:
        if self.recording.is_set():
            self.recording.clear()
        else:
            self.recording.set()

    def push(self, samples: np.ndarray) -> Iterator[SpeechStarted | Utterance]:
        if self.recording.is_set():
            if not self._was_recording:
                self._was_recording = True
                self._start = self._heard
                yield SpeechStarted(self._start / SAMPLE_RATE)
            self._buffer.append(samples)
            self._buffered += len(samples)
            if self._buffered >= self._max_samples:
                self.recording.clear()
                yield from self.flush()
        elif self._was_recording:
            yield from self.flush()
        self._heard += len(samples)

    def flush(self) -> Iterator[SpeechStarted | Utterance]:
        self._was_recording = False
        if self._buffer:
            samples = np.concatenate(self._buffer)
            self._buffer, self._buffered = [], 0
            yield Utterance(Audio(samples, SAMPLE_RATE, self._start / SAMPLE_RATE), self._clock())


class VoiceChat:
    def __init__(
        self,
        source: AudioSource,
        segmenter: Segmenter,
        transcriber: Transcriber,
        session: ChatSession,
        sinks: Sequence[ReplySink],
        *,
        config: Config,
    ) -> None:
        self.source = source
        self.segmenter = segmenter
        self.session = session
        self._transcriber = transcriber
        self._sinks = list(sinks)
        self._config = config
        self._language = normalize_language(config.asr.language)
        self._cancel = threading.Event()
        self._replying = threading.Event()
        self.source_error: AudioSourceError | None = None  # set when the source failed (device gone)
        self.turns = 0

    @staticmethod
    def build_segmenter(config: Config) -> Segmenter:
        if config.input.mode == "push-to-talk":
            return PushToTalk(max_utterance_s=config.input.max_utterance_s)
        vad = registry.create("vad", config.vad.backend, config.vad)
        return Endpointer(vad.frame_probability(), config.vad, max_utterance_s=config.input.max_utterance_s)

    def run(self) -> int:
        """Take turns until the source ends (or fails); returns the number of failed turns."""
        events: queue.Queue[object] = queue.Queue()
        ears = threading.Thread(target=self._listen, args=(events,), name="ears", daemon=True)
        ears.start()
        failures = 0
        try:
            while (event := events.get()) is not _END:
                if isinstance(event, AudioSourceError):
                    self.source_error = event
                    self._tell("error", str(event))
                    break
                if isinstance(event, AssistantError):
                    failures += 1
                    self._tell("error", str(event))
                elif isinstance(event, Utterance) and not self._turn(event):
                    failures += 1
        finally:
            self.source.close()
        return failures

    # --- the ears ------------------------------------------------------------------------------------------------

    def _listen(self, events: queue.Queue[object]) -> None:
        try:
            for item in self.source.chunks():
                if isinstance(item, EndOfRecording):
                    self._heard(self.segmenter.flush(), events)
                elif isinstance(item, Exception):
                    events.put(item)
                else:
                    self._heard(self.segmenter.push(item), events)
            self._heard(self.segmenter.flush(), events)
        except AudioSourceError as exc:
            events.put(exc)
        except Exception as exc:  # a capture library failing in an unexpected way ends listening, not the program
            events.put(AudioSourceError(f"audio capture failed: {type(exc).__name__}: {exc}"))
        finally:
            events.put(_END)

    def _heard(self, found: Iterator[SpeechStarted | Utterance], events: queue.Queue[object]) -> None:
        for event in found:
            if isinstance(event, SpeechStarted):
                if self._replying.is_set() and self._config.input.barge_in and self.source.live:
                    self._cancel.set()  # barge-in: the reply stops within a token, the new speech is the next turn
            else:
                events.put(event)

    # --- one turn ------------------------------------------------------------------------------------------------

    def _turn(self, utterance: Utterance) -> bool:
        # live audio: latency counts from the end of speech; files played fast: from when the turn is taken
        started = utterance.speech_end_clock if self.source.live else time.monotonic()
        try:
            text = self._transcribe(utterance.audio)
        except AssistantError as exc:
            self._tell("error", str(exc))
            return False
        transcribed = time.monotonic()
        if not text:
            self._tell("notice", f"(heard {utterance.audio.duration_s:.1f} s of sound but no words; no turn taken)")
            return True
        for sink in self._sinks:
            sink.transcript(text, utterance)
        self._cancel.clear()
        self._replying.set()
        first_char = 0.0
        try:
            reply = self.session.send(text, cancel=self._cancel)
            for delta in reply:
                first_char = first_char or time.monotonic()
                for sink in self._sinks:
                    sink.delta(delta)
        except AssistantError as exc:
            self._tell("error", str(exc))
            return False
        finally:
            self._replying.clear()
        first_char = first_char or time.monotonic()
        metrics = TurnMetrics(
            audio_s=utterance.audio.duration_s,
            speech_end_to_transcript_ms=(transcribed - started) * 1000,
            transcript_to_first_char_ms=(first_char - transcribed) * 1000,
            speech_end_to_first_char_ms=(first_char - started) * 1000,
            tokens_per_s=reply.stats.decode_tokens_per_s,
            cut=reply.stats.finish_reason == "cancelled",
        )
        self.turns += 1
        for sink in self._sinks:
            sink.turn_done(text, reply.text, metrics)
        return True

    def _transcribe(self, audio: Audio) -> str:
        try:
            transcript = self._transcriber.transcribe_many([audio], language=self._language, timestamps=False)[0]
        except AssistantError:
            raise
        except Exception as exc:
            raise AsrError(f"transcription failed: {type(exc).__name__}: {exc}") from exc
        return apply_zh_script(transcript, self._config.asr.zh_script).text.strip()

    def _tell(self, kind: str, message: str) -> None:
        for sink in self._sinks:
            getattr(sink, kind)(message)
