"""The console's voice loop: a thin driver of the voice session (``assistant.session``).

The *ears* thread reads the audio source (microphone or files) and hands the pieces to the session on an asyncio
loop; the session's events go to the sinks: the partial transcript updating in place, the transcript, the reply as it
streams, its speech (``speaker`` sink), metrics. Everything a turn is (endpointing, partials, recognition, the chat
turn, barge-in, voice out, what the history keeps of a cut reply) happens in the session, exactly as for WebSocket
clients. A failing turn (ASR or LLM error) is reported and the session goes on; noise takes no turn.
"""

from __future__ import annotations

import asyncio
import threading
import time
from collections.abc import Callable, Iterator, Sequence

import numpy as np

from assistant import registry
from assistant.asr.base import Transcriber
from assistant.chat import ChatSession
from assistant.config import Config
from assistant.endpointing import Endpointer
from assistant.errors import AssistantError, AudioSourceError
from assistant.messages import (
    SAMPLE_RATE,
    Audio,
    AudioSource,
    EndOfRecording,
    ReplyAudio,
    ReplyDone,
    ReplySink,
    ReplyStarted,
    ReplyTextDelta,
    SessionError,
    SessionEvent,
    SpeechStarted,
    TranscriptFailed,
    TranscriptFinal,
    TranscriptPartial,
    Utterance,
)
from assistant.session import Segmenter, Services, SessionOptions, SpeechStage, VoiceSession
from assistant.worker import ModelWorker

_END = object()  # the ears are done
WORKER_QUEUE = 64  # model jobs one console session may have waiting (files played fast queue their turns)
WORKER_STOP_S = 10.0  # at the end, the longest wait for the model jobs still running (a cancelled reply: a token)


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
    """Voice turns from ``source`` until it ends, shown (and spoken) by ``sinks``."""

    def __init__(
        self,
        source: AudioSource,
        segmenter: Segmenter,
        transcriber: Transcriber,
        session: ChatSession,
        sinks: Sequence[ReplySink],
        *,
        config: Config,
        speech: SpeechStage | None = None,
    ) -> None:
        self.source = source
        self.segmenter = segmenter
        self.session = session
        self._transcriber = transcriber
        self._sinks = list(sinks)
        self._config = config
        self._speech = speech
        self._replying = threading.Event()  # set while a reply streams (tests pace their sources on it)
        self._last_transcript = ""
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
        return asyncio.run(self._run())

    async def _run(self) -> int:
        worker = ModelWorker(WORKER_QUEUE)
        speech_worker = ModelWorker(WORKER_QUEUE) if self._speech is not None else None
        turn = self._config.turn
        services = Services(self._transcriber, worker, self._speech, speech_worker,
                            zh_script=self._config.asr.zh_script,
                            turn_detector=registry.create("turn", turn.detector, turn))  # fmt: skip
        modalities = ("audio",) if self._speech is not None else ("text",)
        options = SessionOptions.from_config(self._config, modalities=modalities, live=self.source.live)
        voice = VoiceSession(self.session, services, options, self._on_event, vad=self._config.vad,
                             segmenter=self.segmenter)  # fmt: skip
        pieces: asyncio.Queue[object] = asyncio.Queue()
        loop = asyncio.get_running_loop()
        ears = threading.Thread(target=self._listen, args=(loop, pieces), name="ears", daemon=True)
        ears.start()
        source_failures = 0
        try:
            while (piece := await pieces.get()) is not _END:
                try:
                    if isinstance(piece, AudioSourceError):
                        self.source_error = piece
                        self._tell_error(str(piece))
                        break
                    if isinstance(piece, Exception):
                        source_failures += 1
                        self._tell_error(str(piece))
                    elif isinstance(piece, EndOfRecording):
                        await voice.commit()
                    else:
                        await voice.push_audio(piece)  # type: ignore[arg-type]
                except AssistantError as exc:
                    source_failures += 1
                    self._tell_error(str(exc))
            await voice.commit()
            await voice.drain()
        finally:
            self.source.close()
            await voice.close()
            worker.close()
            if speech_worker is not None:
                speech_worker.close()
            for running in (worker, speech_worker):  # the models are closed next: nothing may still run on them
                if running is not None:
                    running.join(WORKER_STOP_S)
        return voice.failures + source_failures

    # --- the ears ----------------------------------------------------------------------------------------------------

    def _listen(self, loop: asyncio.AbstractEventLoop, pieces: asyncio.Queue[object]) -> None:
        def put(item: object) -> None:
            loop.call_soon_threadsafe(pieces.put_nowait, item)

        try:
            for item in self.source.chunks():
                put(item)
        except AudioSourceError as exc:
            put(exc)
        except Exception as exc:  # a capture library failing in an unexpected way ends listening, not the program
            put(AudioSourceError(f"audio capture failed: {type(exc).__name__}: {exc}"))
        finally:
            put(_END)

    # --- session events -> sinks -------------------------------------------------------------------------------------

    async def _on_event(self, event: SessionEvent) -> None:
        if isinstance(event, SpeechStarted):
            if self._config.input.barge_in and self.source.live:
                for sink in self._sinks:
                    sink.interrupted()  # whatever is being said is stale now
        elif isinstance(event, TranscriptPartial):
            for sink in self._sinks:
                sink.partial(event.text)
        elif isinstance(event, TranscriptFinal):
            self._transcribed(event)
        elif isinstance(event, TranscriptFailed | SessionError):
            self._tell_error(str(event.error))
        elif isinstance(event, ReplyStarted):
            self._replying.set()
        elif isinstance(event, ReplyTextDelta):
            for sink in self._sinks:
                sink.delta(event.delta)
        elif isinstance(event, ReplyAudio):
            for sink in self._sinks:
                sink.audio(event.audio)
        elif isinstance(event, ReplyDone):
            self._replying.clear()
            self._reply_done(event)

    def _transcribed(self, event: TranscriptFinal) -> None:
        if not event.text:
            for sink in self._sinks:
                sink.notice(f"(heard {event.audio_s:.1f} s of sound but no words; no turn taken)")
            return
        self._last_transcript = event.text
        for sink in self._sinks:
            sink.transcript(event.text)

    def _reply_done(self, event: ReplyDone) -> None:
        if event.status == "failed":
            self._tell_error(str(event.error))
            return
        if event.metrics is None:
            return
        self.turns += 1
        for sink in self._sinks:
            sink.turn_done(self._last_transcript, event.text, event.metrics)

    def _tell_error(self, message: str) -> None:
        for sink in self._sinks:
            sink.error(message)
