"""The voice session: one conversation's turn engine, shared by every front end.

Audio (16 kHz mono float32), typed text and control calls go in; typed events (``messages.SessionEvent``) come out
through one ``emit`` callback, in order. The console (``voice.py``), the WebSocket protocol (``io/realtime.py``) and
the browser page (through the protocol) are thin drivers: they turn their input into calls and the events into their
output, and nothing here knows about terminals, sockets or sound devices. Model work is handed to the worker
(``ModelWorker``: recognition and the chat model; a second one for speech), so one session never blocks another.

What happens here, once for every front end:
- endpointing: server VAD (``Endpointer``) or manual commits, or a given segmenter (push-to-talk);
- live partial transcripts: while the user speaks, the growing utterance is recognised again whenever the model
  worker is idle and ``partial_interval_s`` of new speech has arrived; ``delta`` carries only the words two
  successive hypotheses agree on (LocalAgreement-2, Machacek et al. 2023, "Turning Whisper into Real-Time
  Transcription System"), so it never takes a word back. A partial that already covers all of the speech becomes
  the final transcript, so partials never delay it;
- the end of the turn (``semantic_vad``): the transcript of the pause's speech is judged by the end-of-turn
  detector (``assistant.turn``), which sets the silence that ends this turn: short after a finished sentence, long
  after a trailing "and ...";
- preemptive replies (``SessionOptions.preemptive``): in the same pause the reply to that transcript starts on a
  fork of the conversation, held back; when the turn ends with those words it streams at once, and when the user
  goes on it is cancelled within a token, leaving no trace (``_Speculation``, ``SpeculationDone``). LiveKit agents'
  preemptive generation; the end-of-turn idea is LiveKit's turn detector and pipecat's smart-turn;
- the turn: final transcript -> user item -> reply streamed from the chat model;
- voice out: each sentence of the reply is synthesized (on the speech worker) as soon as its end streams in, and
  sent as ``ReplyAudio`` while later text is still being generated;
- barge-in and cancel: the reply stops within a token and its queued speech is dropped. The history keeps what was
  actually heard of a spoken reply: the client is assumed to play the audio as it arrives, gaplessly, so the heard
  part is the audio time elapsed since the first chunk (``truncate`` with the client's own playback position
  overrides it, as in the Realtime API's ``conversation.item.truncate``);
- failures: a failed recognition or reply is that turn's error; a failed sentence of speech is reported and the
  text reply completes.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import threading
import time
import uuid
from collections import deque
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from concurrent.futures import Future
from dataclasses import dataclass, field
from typing import Any, Literal, Protocol

import numpy as np

from assistant.asr.base import LiveTranscriber, PartialTranscriber
from assistant.asr.text import apply_zh_script
from assistant.audio.level import StreamLevel, normalize
from assistant.chat import ChatSession
from assistant.config import Config, VadConfig, ZhScript
from assistant.conversation import Conversation
from assistant.endpointing import FRAME_SAMPLES, Endpointer, SpeechProbability
from assistant.errors import AsrError, AssistantError, ConfigError, ConversationError, LimitError, OutputError
from assistant.llm.base import Reply, generation_failed
from assistant.messages import (
    SAMPLE_RATE,
    Audio,
    ItemAdded,
    ItemDeleted,
    ItemTruncated,
    Message,
    Modality,
    ReplyAudio,
    ReplyDone,
    ReplyStarted,
    ReplyStats,
    ReplyTextDelta,
    SessionError,
    SessionEvent,
    SpeculationDone,
    SpeechStarted,
    SpeechStopped,
    Transcript,
    TranscriptFailed,
    TranscriptFinal,
    TranscriptPartial,
    TurnMetrics,
    Utterance,
)
from assistant.tts.base import first_clause, split_sentences
from assistant.turn import EAGERNESS_SCALE, TurnDetector, TurnWindows

Emit = Callable[[SessionEvent], Awaitable[None]]
SYNTHESIS_AHEAD = 2  # sentences of one reply given to the speech worker before the current one is sent
RESUME_S = 1.5  # speech this soon after a turn's audio ended, before its reply was heard, continues that turn
HEARD_S = 0.15  # ... "heard": this much of the reply's audio played


def _word_key(word: str) -> str:
    """A word as hypotheses are compared: 'the...' and 'The' agree."""
    return word.strip(".,!?;:…-'\"。，！？；：、").lower()


def new_id(prefix: str) -> str:
    return f"{prefix}_{uuid.uuid4().hex[:20]}"


class Segmenter(Protocol):
    """Cuts a stream into utterances: the VAD endpointer or push-to-talk."""

    def push(self, samples: np.ndarray) -> Iterator[SpeechStarted | Utterance]: ...

    def flush(self) -> Iterator[SpeechStarted | Utterance]: ...


class Worker(Protocol):
    """What the session needs of ``assistant.worker.ModelWorker``."""

    @property
    def idle(self) -> bool: ...

    @property
    def pending(self) -> int: ...

    def submit(self, job: Callable[[], Any]) -> Future[Any]: ...

    async def run(self, job: Callable[[], Any]) -> Any: ...

    async def batch(self, key: Any, item: Any, run_many: Callable[[list[Any]], list[Any]], *, limit: int) -> Any: ...

    def stream(self, make: Callable[[], Iterator[str]], cancel: threading.Event) -> Any: ...


class SpeechStage(Protocol):
    """What the session needs of ``assistant.tts.Speech``: a voice chosen per text."""

    def synthesize(self, text: str, *, voice: str | None = None, speed: float | None = None) -> Audio: ...


@dataclass(frozen=True)
class TurnDetection:
    """Server VAD: the session cuts turns itself. Names follow the Realtime API's ``turn_detection``."""

    threshold: float = 0.5
    silence_duration_ms: int = 500  # the plain window; semantic_vad's detector shortens or lengthens it per turn
    prefix_padding_ms: int = 200
    create_response: bool = True  # answer every turn without waiting for a response.create
    interrupt_response: bool = True  # speech during a reply cancels it (barge-in)
    # server_vad: every turn ends after silence_duration_ms; semantic_vad: the end-of-turn detector (turn.detector)
    # judges the words before the pause, and eagerness scales the windows (high: sooner, low: the user may pause)
    type: Literal["server_vad", "semantic_vad"] = "server_vad"
    eagerness: Literal["low", "medium", "high", "auto"] = "auto"
    complete_silence_ms: int = 250  # semantic_vad: a turn judged finished (turn.complete_silence_ms)
    incomplete_silence_ms: int = 1200  # semantic_vad: a turn judged unfinished (turn.incomplete_silence_ms)

    def windows(self) -> TurnWindows | None:
        """semantic_vad's silence windows at this eagerness; None for server_vad (a fixed window)."""
        if self.type != "semantic_vad":
            return None
        scale = EAGERNESS_SCALE[self.eagerness]
        return TurnWindows(round(self.complete_silence_ms * scale), round(self.silence_duration_ms * scale),
                           round(self.incomplete_silence_ms * scale))  # fmt: skip


@dataclass(frozen=True)
class SessionOptions:
    """Everything a client may change during a session (``session.update``); defaults come from the config."""

    turn_detection: TurnDetection | None = field(default_factory=TurnDetection)  # None: the client commits turns
    language: str | None = None  # recognition language; None = detect per turn
    transcription_prompt: str | None = None  # Whisper's initial prompt (names, spelling): asr.initial_prompt, read only
    modalities: tuple[Modality, ...] = ("text",)  # ("audio",): replies are spoken, their text is the transcript
    voice: str = "auto"
    speed: float = 1.0
    partial_interval_s: float = 0.5  # new speech between live partial transcripts; 0 = none
    max_turn_audio_s: float = 60.0  # audio of one manually committed turn
    max_utterance_s: float = 30.0  # server VAD: a turn this long is cut and answered
    min_speech_ms: int = 250
    live: bool = True  # audio arrives as it is spoken (latency from the end of speech; barge-in applies)
    preemptive: bool = True  # in a pause, the reply starts (held back) before the turn is known to be over

    @classmethod
    def from_config(cls, config: Config, *, modalities: tuple[Modality, ...], live: bool = True) -> SessionOptions:
        from assistant.pipeline import normalize_language

        vad, turn = config.vad, config.turn
        detection = TurnDetection(vad.threshold, vad.min_silence_ms, vad.speech_pad_ms,
                                  interrupt_response=config.input.barge_in and live,
                                  type="server_vad" if turn.detector == "fixed" else "semantic_vad",
                                  complete_silence_ms=turn.complete_silence_ms,
                                  incomplete_silence_ms=turn.incomplete_silence_ms)  # fmt: skip
        return cls(turn_detection=detection, language=normalize_language(config.asr.language),
                   transcription_prompt=config.asr.initial_prompt, modalities=modalities, voice=config.tts.voice,
                   speed=config.tts.speed, partial_interval_s=config.input.partial_interval_s,
                   max_turn_audio_s=config.server.max_turn_audio_s, max_utterance_s=config.input.max_utterance_s,
                   min_speech_ms=vad.min_speech_ms, live=live, preemptive=turn.preemptive and live)  # fmt: skip

    def vad(self, base: VadConfig) -> VadConfig:
        detection = self.turn_detection or TurnDetection()
        return dataclasses.replace(base, threshold=detection.threshold, min_silence_ms=detection.silence_duration_ms,
                                   speech_pad_ms=detection.prefix_padding_ms,
                                   min_speech_ms=self.min_speech_ms)  # fmt: skip


@dataclass(frozen=True)
class ResponseOptions:
    """One reply's overrides (a Realtime ``response.create``)."""

    modalities: tuple[Modality, ...] | None = None
    instructions: str | None = None
    max_output_tokens: int | None = None
    voice: str | None = None
    extend: bool = False  # continue the last reply where it stopped (its item grows) instead of answering anew


@dataclass
class Services:
    """The models and workers a session uses; shared by all sessions of a process."""

    transcriber: Any  # asr.base.Transcriber
    worker: Worker
    speech: SpeechStage | None = None  # None: no voice out
    speech_worker: Worker | None = None
    probability: Callable[[], SpeechProbability] | None = None  # a new per-stream VAD; None: no server VAD
    zh_script: ZhScript = "simplified"
    turn_detector: TurnDetector | None = None  # semantic_vad's judge of the words before a pause; None: fixed windows


@dataclass
class _Spoken:
    """What a spoken reply said, sentence by sentence, for truncation to what was heard."""

    text: str = ""  # the whole reply text
    ends: list[tuple[int, float]] = field(default_factory=list)  # (end in text, end in audio seconds) per sentence
    first_audio: float | None = None  # clock of the first audio chunk
    audio_s: float = 0.0

    def heard_s(self, now: float) -> float:
        """Audio played by ``now``, for a client that plays chunks as they arrive."""
        return 0.0 if self.first_audio is None else min(self.audio_s, max(0.0, now - self.first_audio))

    def text_at(self, audio_s: float) -> str:
        """The reply text spoken in the first ``audio_s`` seconds: whole sentences, then the share of the sentence
        cut in its middle by its fraction of characters (speech rate is close to constant within a sentence)."""
        start_char, start_s = 0, 0.0
        for end_char, end_s in self.ends:
            if audio_s >= end_s:
                start_char, start_s = end_char, end_s
                continue
            share = (audio_s - start_s) / max(end_s - start_s, 1e-6)
            cut = start_char + int(share * (end_char - start_char))
            return self.text[:cut].rstrip()
        return self.text[:start_char].rstrip()


@dataclass
class _Partial:
    utterance: int  # which utterance of the session
    samples: int  # how much of it was recognised
    task: asyncio.Task[tuple[str, str | None]]  # (text, detected language)
    final: bool = True  # made as the final transcript would be (not with a language borrowed from a partial)
    ran: list[float] = field(default_factory=list)  # clocks: when the worker started and ended it


@dataclass
class _Turn:
    """Work for the turn loop, in order: a spoken turn to recognise, or a reply to make."""

    audio: Audio | None = None
    item_id: str = ""
    speech_end: float = 0.0
    ahead: list[_Partial] = field(default_factory=list)  # recognitions of it started before it ended
    speculation: _Speculation | None = None  # its reply, started in the pause before it ended
    ended: float = 0.0  # clock: when the endpointer ended it
    recognised: list[float] = field(default_factory=list)  # clocks: the recognition of its final transcript ran
    respond: ResponseOptions | None = None
    add: Message | None = None


class VoiceSession:
    """One conversation driven by audio, text and control calls. Call everything from one asyncio event loop."""

    def __init__(self, chat: ChatSession, services: Services, options: SessionOptions, emit: Emit, *,
                 vad: VadConfig, segmenter: Segmenter | None = None,
                 clock: Callable[[], float] = time.monotonic) -> None:  # fmt: skip
        self.chat = chat
        self.options = options
        self._services = services
        self._emit = emit
        self._vad_base = vad
        self._clock = clock
        self._fixed_segmenter = segmenter
        self._probability: SpeechProbability | None = None
        self._endpointer: Endpointer | None = None
        self._buffer: list[np.ndarray] = []  # manual commits: audio since the last commit
        self._buffered = 0
        self._heard = 0  # samples pushed in this session (for audio_start_ms / audio_end_ms)
        self._level = StreamLevel()
        self._segment_offset_s = 0.0  # where the current endpointer's clock starts in the session's audio
        self.items: list[str] = [new_id("item") for _ in chat.conversation.turns]  # ids of conversation.turns
        self._spoken: dict[str, _Spoken] = {}  # reply item id -> what its audio said
        self._speech_item: str | None = None  # the item the speech in progress becomes
        self._utterances = 0
        self._partial: _Partial | None = None
        self._settled: _Partial | None = None  # the final transcript recognised in the pause before the turn ends
        self._partial_language: str | None = None  # detected by the first partial of the utterance in progress
        self._partial_event: asyncio.Future[None] | None = None  # the last partial transcript being sent
        self._partial_words: list[str] = []  # the previous hypothesis, as comparison keys
        self._agreed = 0  # words of the current utterance already sent as partial deltas
        self._turns: asyncio.Queue[_Turn | None] = asyncio.Queue()
        self._turn_loop: asyncio.Task[None] | None = None
        self._response: asyncio.Task[None] | None = None
        self._response_item: str | None = None
        self._cancel = threading.Event()
        self._cancel_reason = "client_cancelled"
        self._cancelled_at = 0.0
        self._response_voice: _Voice | None = None  # the speech of the reply in progress
        self.failures = 0
        self._in_turn = False  # the turn loop is working on a turn
        self._speculation: _Speculation | None = None  # a reply started in the pause of the speech in progress
        self._speculating: set[_Speculation] = set()  # every one still generating (some wait in queued turns)
        self._segmenting = asyncio.Lock()  # the endpointer is fed (push) or ended early (detector) one at a time
        self._background: set[asyncio.Future[None]] = set()  # small tasks started from callbacks, kept till done
        self._last_turn: _Ended | None = None  # the last spoken turn that ended, for taking it back
        self._resumes: dict[str, str] = {}  # speech item -> the user item it continues (a turn ended too soon)
        self._continued: set[str] = set()  # user items a resumed speech continues: they get no reply of their own

    # --- input ------------------------------------------------------------------------------------------------------

    async def push_audio(self, samples: np.ndarray) -> None:
        """16 kHz mono float32 samples, as captured. With the server's VAD the level is normalised as it streams
        (a microphone set far too low is common: ``StreamLevel``); manual turns are normalised whole at commit."""
        self._ensure_loop()
        segmenter = await self._segmenter()
        if segmenter is not None:
            samples = self._level.apply(samples)
        if segmenter is None:  # manual commits
            self._buffer.append(samples)
            self._buffered += len(samples)
            self._heard += len(samples)
            if self._buffered > self.options.max_turn_audio_s * SAMPLE_RATE:
                self.clear_audio()
                raise LimitError(f"the turn is over {self.options.max_turn_audio_s:g} s of audio "
                                 "(server.max_turn_audio_s); commit shorter turns")  # fmt: skip
            return
        self._heard += len(samples)
        async with self._segmenting:
            # the VAD model runs in a thread: on the event loop it would delay every other session's events
            events = await asyncio.to_thread(lambda: list(segmenter.push(samples)))
            for event in events:
                await self._segmented(event)
        self._check_speculation()
        self._speculate()

    async def commit(self) -> None:
        """End the user's turn now: push-to-talk release, end of a file, or a client's manual commit."""
        self._ensure_loop()
        segmenter = await self._segmenter()
        if segmenter is not None:
            for event in await asyncio.to_thread(lambda: list(segmenter.flush())):
                await self._segmented(event)
            return
        if not self._buffer:
            raise ConfigError("input_audio_buffer.commit: the buffer is empty; append audio first")
        samples = np.concatenate(self._buffer)
        start_s = (self._heard - len(samples)) / SAMPLE_RATE
        self._buffer, self._buffered = [], 0
        item_id = new_id("item")
        await self._emit(SpeechStopped(item_id, self._heard / SAMPLE_RATE))
        turn, _gain_db = normalize(Audio(samples, SAMPLE_RATE, start_s))
        self._turns.put_nowait(_Turn(turn, item_id, self._clock()))

    def clear_audio(self) -> None:
        """Drop audio not yet turned into a turn."""
        self._buffer, self._buffered = [], 0
        self._endpointer = None  # a fresh endpointer: the speech in progress is forgotten
        self._speech_item = None
        self._drop_speculation("cancelled")

    async def add_message(self, message: Message, *, item_id: str | None = None) -> str:
        """A typed user message (or a reply a client puts in the history); returns its item id."""
        self._ensure_loop()
        if message.role not in ("user", "assistant"):
            raise ConfigError(f"conversation.item.create: role {message.role!r} is not supported here; set the "
                              "system prompt with session.update instructions")  # fmt: skip
        if not message.content.strip():
            raise ConfigError("conversation.item.create: the message has no text (content: [{type: input_text, "
                              "text}])")  # fmt: skip
        item_id = item_id or new_id("item")
        self._turns.put_nowait(_Turn(item_id=item_id, add=message))
        return item_id

    async def respond(self, options: ResponseOptions | None = None, *, started: float | None = None) -> None:
        """Reply to the conversation as it is (its last message must be the user's)."""
        self._ensure_loop()
        settled = self._turns.empty() and not self._in_turn and not self.replying
        if settled:  # known now: say so to the request that asked
            self._check_answerable(options or ResponseOptions())
        self._turns.put_nowait(_Turn(respond=options or ResponseOptions(), speech_end=started or self._clock()))

    def cancel(self, reason: str = "client_cancelled") -> bool:
        """Stop the reply in progress within a token, and its speech; False when none was in progress."""
        if self._response is None or self._response.done():
            return False
        self._cancel_reason = reason
        self._cancelled_at = self._clock()  # what was heard is counted to here, not to when the reply winds down
        self._cancel.set()
        return True

    async def truncate(self, item_id: str, audio_end_ms: int) -> None:
        """The client heard only the first ``audio_end_ms`` of a spoken reply: keep that much of its text."""
        in_progress = self._response_voice if item_id == self._response_item else None
        if in_progress is not None:  # checked before anything stops
            sent = in_progress.spoken.audio_s if in_progress.spoken is not None else None
            if sent is None or audio_end_ms < 0 or audio_end_ms > round(sent * 1000):
                what = "is not a spoken reply" if sent is None else f"has {round(sent * 1000)} ms of audio so far"
                raise ConfigError(f"conversation.item.truncate: item {item_id!r} {what}; audio_end_ms "
                                  f"{audio_end_ms} cannot be honoured")  # fmt: skip
            if self.cancel("client_cancelled"):
                await self._after_response()  # the reply stops where the client stopped playing it
        spoken = self._spoken.get(item_id)
        index = self._index(item_id)
        if self.chat.conversation.turns[index].role != "assistant" or spoken is None:
            raise ConfigError(f"conversation.item.truncate: item {item_id!r} is not a spoken reply")
        if audio_end_ms < 0:
            raise ConfigError(f"conversation.item.truncate: audio_end_ms {audio_end_ms} is negative; give the "
                              "milliseconds of the item's audio the user heard")  # fmt: skip
        if audio_end_ms > round(spoken.audio_s * 1000):
            raise ConfigError(f"conversation.item.truncate: audio_end_ms {audio_end_ms} is beyond the "
                              f"{round(spoken.audio_s * 1000)} ms of audio that item has")  # fmt: skip
        await self._truncate(item_id, audio_end_ms / 1000)

    async def delete(self, item_id: str) -> None:
        index = self._index(item_id)
        if item_id == self._response_item:
            raise ConfigError("conversation.item.delete: that reply is still being generated; cancel it first")
        self.chat.conversation.remove(index)
        del self.items[index]
        self._spoken.pop(item_id, None)
        await self._emit(ItemDeleted(item_id))

    def item(self, item_id: str) -> Message:
        return self.chat.conversation.turns[self._index(item_id)]

    async def drain(self) -> None:
        """Wait until every queued turn is answered (the end of a file source)."""
        self._ensure_loop()
        self._turns.put_nowait(None)
        if self._turn_loop is not None:
            await self._turn_loop
        self._turn_loop = None

    async def settle(self) -> None:
        """Wait for the reply in progress (if any) to end and be reported (``ReplyDone``)."""
        await self._after_response()

    async def close(self) -> None:
        """Stop everything in progress; the session is finished."""
        self._cancelled_at = self._clock()
        self._cancel.set()
        for speculation in self._speculating:
            speculation.cancel.set()
        if self._partial is not None:
            self._partial.task.cancel()
        if self._turn_loop is not None:
            self._turn_loop.cancel()
            await asyncio.gather(self._turn_loop, return_exceptions=True)
        if self._response is not None:
            await asyncio.gather(self._response, return_exceptions=True)

    @property
    def replying(self) -> bool:
        return self._response is not None and not self._response.done()

    # --- segmentation ------------------------------------------------------------------------------------------------

    async def _segmenter(self) -> Segmenter | None:
        if self._fixed_segmenter is not None:
            return self._fixed_segmenter
        if self.options.turn_detection is None or self._services.probability is None:
            return None
        if self._endpointer is None:
            if self._probability is None:
                self._probability = await asyncio.to_thread(self._services.probability)
            max_s = min(self.options.max_utterance_s, self.options.max_turn_audio_s)
            self._segment_offset_s = self._heard / SAMPLE_RATE  # its times start at 0: ours at the session's start
            self._endpointer = Endpointer(self._probability, self.options.vad(self._vad_base),
                                          max_utterance_s=max_s, clock=self._clock)  # fmt: skip
        return self._endpointer

    def reconfigure(self, options: SessionOptions) -> None:
        """New options (session.update); a changed turn detection takes effect from the next audio."""
        if options.turn_detection != self.options.turn_detection or options.min_speech_ms != self.options.min_speech_ms:
            self._endpointer = None
            self._drop_speculation("cancelled")
        self.options = options

    async def _segmented(self, event: SpeechStarted | Utterance) -> None:
        if isinstance(event, SpeechStarted):
            self._speech_item = new_id("item")
            self._partial_words, self._agreed, self._partial_language = [], 0, None
            detection = self.options.turn_detection
            at_s = event.at_s + self._segment_offset_s
            if self.options.live and (detection is None or detection.interrupt_response):
                await self._barge_in(at_s)
            await self._emit(dataclasses.replace(event, at_s=at_s, item_id=self._speech_item))
            return
        item_id = self._speech_item or new_id("item")
        self._speech_item = None
        self._utterances += 1
        ahead = [job for job in (self._settled, self._partial)
                 if job is not None and job.utterance == self._utterances - 1]  # fmt: skip
        speculation, self._speculation = self._speculation, None
        if speculation is not None and speculation.utterance != self._utterances - 1:
            self._drop(speculation, "wasted")
            speculation = None
        self._partial = self._settled = None
        await self._emit(SpeechStopped(item_id, event.audio.end_s + self._segment_offset_s))
        self._last_turn = _Ended(item_id, event.audio.end_s + self._segment_offset_s)
        self._turns.put_nowait(_Turn(event.audio, item_id, event.speech_end_clock, ahead, speculation=speculation,
                                     ended=self._clock()))  # fmt: skip

    async def _barge_in(self, at_s: float) -> None:
        """The user speaks over the assistant: the reply stops, and a spoken reply still playing is cut where the
        user started. Speech that comes back right after a turn ended, before anything of its reply was heard, is
        the same turn going on (a hesitation the end of turn took for the end): it joins that turn (``_resumed``)."""
        resumed = self._resumable(at_s)
        if resumed is not None and self._speech_item is not None:
            self._resumes[self._speech_item] = resumed
            self._continued.add(resumed)
        if self.cancel("turn_detected"):
            return  # the reply's end truncates it
        last = self.items[-1] if self.items else None
        spoken = self._spoken.get(last) if last else None
        if last is not None and spoken is not None and spoken.heard_s(self._clock()) < spoken.audio_s - 0.05:
            await self._truncate(last, spoken.heard_s(self._clock()))

    def _resumable(self, at_s: float) -> str | None:
        """The user item of the last spoken turn when speech starting at ``at_s`` (seconds of the session's audio)
        continues it: less than ``RESUME_S`` of audio after that turn's end, and nothing of its reply reached the
        user (no reply yet; a spoken reply with no more than ``HEARD_S`` of its audio played; a text reply with no
        text sent yet)."""
        ended = self._last_turn
        if ended is None or at_s - ended.end_s > RESUME_S:
            return None
        if ended.reply is None:
            return ended.item_id
        voice = self._response_voice if ended.reply == self._response_item else None
        spoken = voice.spoken if voice is not None else self._spoken.get(ended.reply)
        if spoken is not None:
            return ended.item_id if spoken.heard_s(self._clock()) <= HEARD_S else None
        return ended.item_id if voice is not None and not voice.text else None

    async def _resumed(self, fragment: str) -> bool:
        """Undo the reply to ``fragment`` (the user item a resumed speech continues) so the speech joins it: the
        reply, cut before it was heard, leaves the history. False when the history has moved on since."""
        items, turns = self.items, self.chat.conversation.turns
        if len(items) >= 2 and items[-2] == fragment and turns[-1].role == "assistant":
            reply = items.pop()
            self.chat.conversation.remove(len(turns) - 1)
            self._spoken.pop(reply, None)
            await self._emit(ItemDeleted(reply))
        return bool(items) and items[-1] == fragment and turns[-1].role == "user"

    # --- partial transcripts -----------------------------------------------------------------------------------------

    def _speculate(self) -> None:
        """Recognition ahead of the end of the turn, started only while the model worker is idle, so it never makes
        anyone's work wait: in a pause that has settled the utterance (``Endpointer.settled_speech``), the final
        transcript itself, ready before the silence window ends; while speech goes on, a partial transcript every
        ``partial_interval_s`` of new speech."""
        endpointer = self._current_endpointer()
        if endpointer is None or self._speech_item is None or not self._services.worker.idle:
            return
        if any(job is not None and not job.task.done() for job in (self._partial, self._settled)):
            return
        settled = endpointer.settled_speech()
        if settled is not None:
            known = self._settled is not None and (self._settled.utterance, self._settled.samples) == (
                self._utterances, len(settled))  # fmt: skip
            if not known:
                self._settled = self._ahead(settled)
                utterance, samples = self._utterances, len(settled)
                self._settled.task.add_done_callback(lambda task: self._settled_done(task, utterance, samples))
            return
        interval = self.options.partial_interval_s
        speech = endpointer.current_speech()
        if interval <= 0 or speech is None:
            return
        done = self._partial.samples if self._partial is not None and self._partial.utterance == self._utterances else 0
        if len(speech) - done < interval * SAMPLE_RATE:
            return
        # the language the first partial of this utterance detected: later partials skip detection (an encoder pass)
        self._partial = self._ahead(speech, self._partial_language, partial=True)
        item_id = self._speech_item
        self._partial.task.add_done_callback(lambda done_task: self._partial_done(done_task, item_id))

    def _ahead(self, samples: np.ndarray, language: str | None = None, *, partial: bool = False) -> _Partial:
        """Recognise ``samples`` on the worker; ``language`` (for partials only) saves detecting it again. A partial
        uses the backend's quick pass when it has one (``PartialTranscriber``), and is then never a final."""
        audio, chosen = Audio(samples), language or self.options.language
        quick = partial and isinstance(self._services.transcriber, PartialTranscriber)
        ran: list[float] = []

        def recognise() -> tuple[str, str | None]:
            ran.append(self._clock())
            try:
                return self._recognise(audio, chosen, quick=quick)
            finally:
                ran.append(self._clock())

        task = asyncio.ensure_future(self._services.worker.run(recognise))
        return _Partial(self._utterances, len(samples), task, final=chosen == self.options.language and not quick,
                        ran=ran)  # fmt: skip

    # --- the end of the turn, and the reply started before it -------------------------------------------------------

    def _settled_done(self, task: asyncio.Task[tuple[str, str | None]], utterance: int, samples: int) -> None:
        """The final transcript of a pause is known before the turn is: the end-of-turn detector sets how much
        more silence ends it (semantic_vad), and the reply starts, held back (``turn.preemptive``)."""
        if task.cancelled() or task.exception() is not None or not self._still_paused(utterance, samples):
            return
        text, language = task.result()
        endpointer = self._current_endpointer()
        detection = self.options.turn_detection
        if not text or endpointer is None or detection is None:
            return
        windows = detection.windows()
        detector = self._services.turn_detector
        if windows is not None and detector is not None:
            endpointer.require_silence_ms(windows.silence_ms(detector.end_probability(text, language)))
        if self._may_speculate():
            self._speculation = self._speculate_reply(text, utterance, samples)
        if windows is not None:
            self._in_background(self._end_if_silent())

    def _speculate_reply(self, text: str, utterance: int, samples: int) -> _Speculation | None:
        try:
            speculation = _Speculation(self, text, utterance, samples)
        except AssistantError:  # the worker is full: the turn is answered when it ends, as without preemption
            return None
        self._speculating.add(speculation)
        speculation.done.add_done_callback(lambda _: self._speculating.discard(speculation))
        return speculation

    def _still_paused(self, utterance: int, samples: int) -> bool:
        """The utterance ``utterance`` is still in progress and in the same pause: its settled cut is ``samples``."""
        endpointer = self._current_endpointer()
        if utterance != self._utterances or endpointer is None or self._speech_item is None:
            return False
        settled = endpointer.settled_speech()
        return settled is not None and len(settled) == samples

    def _may_speculate(self) -> bool:
        """A reply may start before the turn ends: asked for, answered automatically, nothing else in progress,
        and no other work (another session's) waiting for the model worker."""
        detection, turns = self.options.turn_detection, self.chat.conversation.turns
        return (self.options.preemptive and detection is not None and detection.create_response
                and self._speculation is None and not self.replying and not self._in_turn and self._turns.empty()
                and self._services.worker.pending == 0 and not (turns and turns[-1].role == "user"))  # fmt: skip

    async def _end_if_silent(self) -> None:
        """After the detector shortened the window: end the turn now if the pause is already that long."""
        async with self._segmenting:
            endpointer = self._current_endpointer()
            if endpointer is None:
                return
            for event in list(endpointer.end_if_silent()):
                await self._segmented(event)

    def _check_speculation(self) -> None:
        """The user went on speaking (or the pause changed): the reply started in the pause is dropped."""
        speculation = self._speculation
        if (
            speculation is not None
            and speculation.utterance == self._utterances
            and not self._still_paused(speculation.utterance, speculation.samples)
        ):
            self._drop_speculation("cancelled")

    def _drop_speculation(self, outcome: Literal["wasted", "cancelled"]) -> None:
        speculation, self._speculation = self._speculation, None
        if speculation is not None:
            self._drop(speculation, outcome)

    def _drop(self, speculation: _Speculation, outcome: Literal["wasted", "cancelled"]) -> None:
        """Stop a speculative reply within a token; nothing of it was sent or kept."""
        speculation.cancel.set()
        self._in_background(self._emit(SpeculationDone(outcome, (self._clock() - speculation.started) * 1000)))

    def _in_background(self, work: Awaitable[None]) -> None:
        task = asyncio.ensure_future(work)
        self._background.add(task)
        task.add_done_callback(self._background.discard)

    def _partial_done(self, task: asyncio.Task[tuple[str, str | None]], item_id: str) -> None:
        if task.cancelled() or task.exception() is not None or item_id != self._speech_item:
            return  # a failed or stale partial is not worth a word: the final transcript will say it
        text, language = task.result()
        self._partial_language = self._partial_language or language  # later partials of this utterance skip detection
        words = text.split()
        keys = [_word_key(word) for word in words]
        agreed = 0
        while agreed < min(len(keys), len(self._partial_words)) and keys[agreed] == self._partial_words[agreed]:
            agreed += 1
        self._partial_words = keys
        delta = " ".join(words[self._agreed : agreed]) if agreed > self._agreed else ""
        if delta and self._agreed:
            delta = " " + delta
        self._agreed = max(self._agreed, agreed)
        self._partial_event = asyncio.ensure_future(self._emit(TranscriptPartial(item_id, delta, " ".join(words))))

    def _current_endpointer(self) -> Endpointer | None:
        fixed = self._fixed_segmenter
        return fixed if isinstance(fixed, Endpointer) else self._endpointer

    def _recognise(self, audio: Audio, language: str | None, *, quick: bool = False) -> tuple[str, str | None]:
        """(text, detected language); runs on the worker thread, so it touches no session state."""
        transcriber = self._services.transcriber
        if quick:
            result = transcriber.transcribe_partial(audio, language=language)
        else:
            result = self._finals([audio], language)[0]
        return apply_zh_script(result, self._services.zh_script).text.strip(), result.language

    def _finals(self, audios: list[Audio], language: str | None) -> list[Transcript]:
        """Final transcripts of live utterances: at the utterance's own cost where the backend can
        (``LiveTranscriber``: a short encoder window, the same words), else ``transcribe_many``."""
        transcriber = self._services.transcriber
        if isinstance(transcriber, LiveTranscriber):
            return transcriber.transcribe_live(audios, language=language)
        return list(transcriber.transcribe_many(audios, language=language, timestamps=False))

    # --- the turn loop -----------------------------------------------------------------------------------------------

    def _ensure_loop(self) -> None:
        if self._turn_loop is None or self._turn_loop.done():
            self._turn_loop = asyncio.ensure_future(self._run_turns())

    async def _run_turns(self) -> None:
        while (turn := await self._turns.get()) is not None:
            self._in_turn = True
            try:
                if turn.audio is not None:
                    await self._spoken_turn(turn)
                elif turn.respond is not None:
                    await self._after_response()
                    await self._start_response(turn.respond, (turn.speech_end, turn.speech_end, 0.0))
                elif turn.add is not None:
                    await self._after_response()
                    try:
                        self._append(turn.add, turn.item_id)
                    except ConversationError as exc:
                        if turn.add.role != "user":
                            raise
                        raise ConversationError("conversation.item.create: the last user message has no reply yet; "
                                                "send response.create first, or remove it with "
                                                "conversation.item.delete") from exc  # fmt: skip
                    await self._emit(ItemAdded(turn.item_id, self._previous(turn.item_id), turn.add))
            except AssistantError as exc:
                self.failures += 1
                await self._emit(SessionError(exc))
            finally:
                self._in_turn = False
        await self._after_response()

    async def _spoken_turn(self, turn: _Turn) -> None:
        audio = turn.audio
        assert audio is not None
        started = turn.speech_end if self.options.live else self._clock()
        speculation = turn.speculation
        try:
            text = await self._final_transcript(turn)
        except AssistantError as exc:
            self.failures += 1
            if speculation is not None:
                self._drop(speculation, "wasted")
            await self._emit(TranscriptFailed(turn.item_id, exc))
            await self._answer_fragment(turn)
            return
        transcribed = self._clock()
        await self._after_response()  # the previous reply ends first (a barge-in cut it already)
        await self._emit(TranscriptFinal(turn.item_id, text, audio.duration_s, (transcribed - started) * 1000))
        detection = self.options.turn_detection
        if speculation is not None and not (text and detection is not None and detection.create_response
                                            and speculation.answers(self, text)):  # fmt: skip
            self._drop(speculation, "wasted")
            speculation = None
        if not text:
            await self._answer_fragment(turn)
            return  # noise: no turn
        message = Message("user", text)
        fragment = self._resumes.pop(turn.item_id, None)
        joiner = " " if fragment is not None and await self._resumed(fragment) else "\n"
        try:
            self._append(message, turn.item_id)
        except ConversationError:  # unanswered (typed, or a resumed turn): this speech joins it, under the new id
            index = len(self.chat.conversation.turns) - 1
            merged = Message("user", f"{self.chat.conversation.turns[index].content}{joiner}{text}")
            self.chat.conversation.replace(index, merged)
            replaced, self.items[index] = self.items[index], turn.item_id
            await self._emit(ItemDeleted(replaced))
            message = merged
        await self._emit(ItemAdded(turn.item_id, self._previous(turn.item_id), message))
        if turn.item_id in self._continued:  # the user went on: the reply waits for the rest of the turn
            self._continued.discard(turn.item_id)
            if speculation is not None:
                self._drop(speculation, "wasted")
            return
        if detection is not None and detection.create_response:  # manual turns wait for response.create
            breakdown = self._breakdown(turn, started)
            if speculation is not None:
                await self._emit(SpeculationDone("used", (self._clock() - speculation.started) * 1000))
            await self._start_response(ResponseOptions(), (started, transcribed, audio.duration_s),
                                       adopted=speculation, breakdown=breakdown)  # fmt: skip
            if self._last_turn is not None and self._last_turn.item_id == turn.item_id:
                self._last_turn.reply = self._response_item

    async def _answer_fragment(self, turn: _Turn) -> None:
        """Speech that was to continue a turn came to nothing (noise, a failed recognition): the turn it was to
        continue is answered as it is, when it is still the last message and unanswered."""
        fragment = self._resumes.pop(turn.item_id, None)
        if fragment is None or not self.items or self.items[-1] != fragment:
            return
        self._continued.discard(fragment)
        turns, detection = self.chat.conversation.turns, self.options.turn_detection
        if turns and turns[-1].role == "user" and detection is not None and detection.create_response:
            await self._start_response(ResponseOptions(), (turn.speech_end, self._clock(), 0.0))

    def _breakdown(self, turn: _Turn, speech_end: float) -> dict[str, Any]:
        """Where a spoken turn's time went before its reply (``TurnMetrics``' breakdown fields), in ms from the end
        of speech: when the turn ended, and the recognition whose text became its final transcript."""
        fields: dict[str, Any] = {"endpoint_ms": (turn.ended - speech_end) * 1000 if turn.ended else None}
        ran = turn.recognised
        if len(ran) == 2:
            fields["asr_start_ms"] = (ran[0] - speech_end) * 1000
            fields["asr_ms"] = (ran[1] - ran[0]) * 1000
        return fields

    async def _final_transcript(self, turn: _Turn) -> str:
        audio = turn.audio
        assert audio is not None
        endpointer = self._current_endpointer()
        pad = endpointer.pad_samples if endpointer is not None else 0
        for job in turn.ahead:  # the settled cut is the utterance itself; a partial may have heard all of its speech
            covers = job.samples == len(audio.samples) or job.samples >= len(audio.samples) - pad - FRAME_SAMPLES
            if covers and job.final:
                with contextlib.suppress(Exception):
                    text = (await job.task)[0]  # no second recognition
                    turn.recognised = job.ran
                    return text
        if turn.speculation is not None:  # its words are not the turn's: stop it now, not after a recognition
            self._drop(turn.speculation, "wasted")
            turn.speculation = None
        transcriber = self._services.transcriber
        language, script = self.options.language, self._services.zh_script
        ran = turn.recognised

        def transcribe_many(audios: list[Audio]) -> list[str]:
            ran[:] = [self._clock()]
            results = self._finals(audios, language)
            ran.append(self._clock())
            return [apply_zh_script(result, script).text.strip() for result in results]

        # utterances of several sessions waiting together are transcribed in one batch (whisper-hf batches them)
        try:
            return str(await self._services.worker.batch(("asr", language), audio, transcribe_many,
                                                         limit=transcriber.batch_size))  # fmt: skip
        except AssistantError:
            raise
        except Exception as exc:  # the recogniser failed on this turn only
            raise AsrError(f"transcription failed: {type(exc).__name__}: {exc}") from None

    async def _after_response(self) -> None:
        if self._response is not None:
            await asyncio.gather(self._response, return_exceptions=True)

    # --- replies -----------------------------------------------------------------------------------------------------

    def _check_answerable(self, options: ResponseOptions) -> None:
        turns = self.chat.conversation.turns
        if options.extend and (not turns or turns[-1].role != "assistant" or not self.items):
            raise ConversationError("response.continue: the last message is not a reply; there is nothing to "
                                    "continue")  # fmt: skip
        if not options.extend and (not turns or turns[-1].role != "user"):
            raise ConversationError("response.create: there is no user message to answer; add one first "
                                    "(conversation.item.create or audio)")  # fmt: skip

    async def _start_response(
        self,
        options: ResponseOptions,
        clocks: tuple[float, float, float],
        *,
        adopted: _Speculation | None = None,
        breakdown: dict[str, Any] | None = None,
    ) -> None:
        """``clocks``: (end of speech or request, transcript ready, seconds of speech) for the turn's metrics;
        ``adopted``: the reply already started in the pause, whose held text streams out now."""
        self._check_answerable(options)
        self._cancel = adopted.cancel if adopted is not None else threading.Event()
        self._cancel_reason, self._cancelled_at = "client_cancelled", 0.0
        response_id = new_id("resp")
        item_id = self.items[-1] if options.extend else new_id("item")  # a continued reply keeps its item
        self._response_item = item_id
        self._response = asyncio.ensure_future(self._reply(response_id, item_id, options, clocks, self._cancel,
                                                           adopted, breakdown or {}))  # fmt: skip

    async def _reply(self, response_id: str, item_id: str, options: ResponseOptions,
                     clocks: tuple[float, float, float], cancel: threading.Event,
                     adopted: _Speculation | None = None, breakdown: dict[str, Any] | None = None) -> None:  # fmt: skip
        modalities = options.modalities or self.options.modalities
        speech = self._services.speech if "audio" in modalities else None
        await self._emit(ReplyStarted(response_id, item_id, modalities))
        chat = self.chat
        sampling = chat.sampling
        if options.max_output_tokens is not None:
            sampling = dataclasses.replace(sampling, max_new_tokens=options.max_output_tokens)
        holder: dict[str, Reply] = {}

        def deltas() -> Iterator[str]:
            saved = chat.sampling, chat.conversation.system
            chat.sampling = sampling
            if options.instructions is not None:
                chat.conversation.system = options.instructions
            try:
                reply = chat.continue_reply(cancel=cancel) if options.extend else chat.reply(cancel=cancel)
            finally:
                chat.sampling, chat.conversation.system = saved
            holder["reply"] = reply
            yield from reply

        voice = _Voice(self, response_id, item_id, speech, options.voice or self.options.voice, cancel)
        self._response_voice = voice
        first_char = 0.0
        failure: Exception | None = None
        text = ""
        stream_ended = threading.Event()  # the worker's bridge sets it however the stream ends
        stream = adopted.deltas() if adopted is not None else self._services.worker.stream(deltas, stream_ended)
        try:
            async for delta in stream:
                first_char = first_char or self._clock()
                text += delta
                await self._emit(ReplyTextDelta(response_id, item_id, delta))
                voice.add_text(delta)
        except Exception as exc:  # this turn fails; the session and its history go on
            cancel.set()
            failure = generation_failed(exc)
        except BaseException:  # the session is closing: stop generating and speaking
            cancel.set()
            raise
        if failure is None:
            voice.finish()
        await voice.wait()
        if adopted is not None:
            holder["reply"] = adopted.commit(self.chat.conversation, failed=failure is not None)
        reply = holder.get("reply")
        stats = reply.stats if reply is not None else ReplyStats(finish_reason="cancelled")
        if failure is not None:
            self.failures += 1
            turns = self.chat.conversation.turns
            user_dropped = not options.extend and (not turns or turns[-1].role != "user")
            if user_dropped and self.items and len(self.items) > len(turns):
                dropped = self.items.pop()
                await self._emit(ItemDeleted(dropped))
            await self._emit(ReplyDone(response_id, item_id, text, "failed", getattr(failure, "code", "error"),
                                       stats, None, error=failure))  # fmt: skip
            self._response_item, self._response_voice = None, None
            return
        # a cancel after the text was complete, while it was still being spoken, cancels the rest of the speech
        cancelled = stats.finish_reason == "cancelled" or cancel.is_set()
        if reply is not None and options.extend:  # the item grew: its whole text (not truncated to what was heard)
            text = self.chat.conversation.turns[-1].content
        elif reply is not None:
            self.items.append(item_id)
            text = reply.text
            if voice.spoken is not None:
                voice.spoken.text = text
                self._spoken[item_id] = voice.spoken
            await self._emit(ItemAdded(item_id, self._previous(item_id), Message("assistant", text, cut=cancelled)))
        self._response_item, self._response_voice = None, None
        spoken_anew = voice.spoken is not None and not options.extend
        if cancelled and spoken_anew and voice.spoken is not None and voice.spoken.audio_s > 0:
            await self._truncate(item_id, voice.spoken.heard_s(self._cancelled_at or self._clock()))
        elif cancelled and spoken_anew:  # nothing was heard yet
            await self._truncate(item_id, 0.0)
        status = "cancelled" if cancelled else "incomplete" if stats.finish_reason == "length" else "completed"
        reason = self._cancel_reason if cancelled else "max_output_tokens" if status == "incomplete" else None
        speech_end, transcribed, speech_s = clocks
        first_char = first_char or self._clock()
        first_audio = voice.spoken.first_audio if voice.spoken is not None else None
        metrics = TurnMetrics(
            audio_s=speech_s,
            speech_end_to_transcript_ms=(transcribed - speech_end) * 1000,
            transcript_to_first_char_ms=(first_char - transcribed) * 1000,
            speech_end_to_first_char_ms=(first_char - speech_end) * 1000,
            tokens_per_s=stats.decode_tokens_per_s,
            cut=cancelled,
            speech_end_to_first_audio_ms=(first_audio - speech_end) * 1000 if first_audio else None,
            first_token_ms=stats.first_token_s * 1000 if stats.completion_tokens else None,
            preemptive=adopted is not None,
            **(breakdown or {}),
        )
        audio_s = voice.spoken.audio_s if voice.spoken is not None else 0.0
        await self._emit(ReplyDone(response_id, item_id, text, status, reason, stats, metrics, audio_s))

    async def _truncate(self, item_id: str, heard_s: float) -> None:
        spoken = self._spoken.get(item_id)
        if spoken is None:
            return
        index = self._index(item_id)
        message = Message("assistant", spoken.text_at(heard_s), cut=True)
        self.chat.conversation.replace(index, message)
        await self._emit(ItemTruncated(item_id, round(heard_s * 1000), message))

    # --- items -------------------------------------------------------------------------------------------------------

    def _append(self, message: Message, item_id: str) -> None:
        conversation = self.chat.conversation
        if message.role == "user":
            conversation.add_user(message.content)
        elif conversation.turns and conversation.turns[-1].role == "assistant":
            raise ConversationError("conversation.item.create: the last message is already a reply; add a user "
                                    "message first")  # fmt: skip
        else:
            conversation.add_reply(message.content, cut=message.cut)
        self.items.append(item_id)

    def _index(self, item_id: str) -> int:
        try:
            return self.items.index(item_id)
        except ValueError:
            raise ConfigError(f"no conversation item {item_id!r} in this session") from None

    def _previous(self, item_id: str) -> str | None:
        index = self.items.index(item_id) if item_id in self.items else len(self.items)
        return self.items[index - 1] if index > 0 else None


_END = object()


@dataclass
class _Ended:
    """The last spoken turn that ended: its user item, where its audio ended (seconds of the session's audio), and
    its reply's item once started."""

    item_id: str
    end_s: float
    reply: str | None = None


class _Speculation:
    """A reply started in a pause, before the turn is known to be over: on a fork of the conversation with the
    pause's transcript as the user's message, on the model worker, its deltas held here. When the turn ends with
    those words and nothing else changed, the reply adopts it (``answers``; the held deltas stream at once and the
    rest follows live); otherwise it is cancelled within a token and nothing of it is sent or kept. LiveKit agents'
    preemptive generation, for one local worker."""

    def __init__(self, session: VoiceSession, text: str, utterance: int, samples: int) -> None:
        chat = session.chat
        self.text, self.utterance, self.samples = text, utterance, samples
        self.history = tuple(chat.conversation.turns)
        self.system, self.sampling = chat.conversation.system, chat.sampling
        self._fork = ChatSession(chat.model, chat.conversation.fork(), chat.sampling)
        self._fork.conversation.add_user(text)
        self.cancel = threading.Event()
        self.started = session._clock()
        self._reply: Reply | None = None
        self._held: asyncio.Queue[object] = asyncio.Queue()
        stream = session._services.worker.stream(self._generate, threading.Event())  # BusyError when full
        self.done = asyncio.ensure_future(self._hold(stream))  # when it has stopped generating

    def answers(self, session: VoiceSession, text: str) -> bool:
        """Whether this reply is the one the turn needs: the same words, history, instructions and sampling."""
        chat = session.chat
        return (text == self.text and tuple(chat.conversation.turns) == self.history
                and chat.conversation.system == self.system and chat.sampling == self.sampling
                and not self.cancel.is_set())  # fmt: skip

    def _generate(self) -> Iterator[str]:  # on the worker thread
        self._reply = self._fork.reply(cancel=self.cancel)
        yield from self._reply

    async def _hold(self, stream: AsyncIterator[str]) -> None:
        try:
            async for delta in stream:
                self._held.put_nowait(delta)
        except Exception as exc:  # the adopting reply fails with it
            self._held.put_nowait(exc)
        finally:
            self._held.put_nowait(_END)

    async def deltas(self) -> AsyncIterator[str]:
        """The held deltas, then the rest as it is generated."""
        while (item := await self._held.get()) is not _END:
            if isinstance(item, Exception):
                raise item
            yield str(item)

    def commit(self, conversation: Conversation, *, failed: bool) -> Reply | None:
        """Record the adopted reply in the real ``conversation`` (its user message is there already) as the fork
        recorded it (cut or whole); a failed one takes the user message away again, as ``ChatSession.reply``
        does."""
        last = self._fork.conversation.last_reply()
        if failed or last is None:
            if conversation.turns and conversation.turns[-1].role == "user":
                conversation.drop_last_user()
            return None
        conversation.add_reply(last.content, cut=last.cut)
        return self._reply


class _Voice:
    """A reply's speech: each sentence is queued as soon as its end streams in; the speech worker synthesizes up to
    ``SYNTHESIS_AHEAD`` of them ahead of the one being sent, so a long reply never floods the shared worker and the
    next sentence is ready when the current one has been sent."""

    def __init__(self, session: VoiceSession, response_id: str, item_id: str, speech: SpeechStage | None,
                 voice: str, cancel: threading.Event) -> None:  # fmt: skip
        self._session = session
        self._ids = (response_id, item_id)
        self._speech = speech
        self._voice = voice
        self._cancel = cancel
        self.spoken = _Spoken() if speech is not None else None
        self._text = ""  # the reply so far
        self._said = 0  # characters of it queued for speech
        self._sentences: asyncio.Queue[tuple[str, int] | None] = asyncio.Queue()  # (sentence, its end in the text)
        self._pump = asyncio.ensure_future(self._play()) if speech is not None else None
        self._failed = False

    @property
    def text(self) -> str:
        """The reply's text sent so far."""
        return self._text

    def add_text(self, delta: str) -> None:
        """Queue every sentence the reply has completed (its end position in the text kept for truncation)."""
        self._text += delta
        if self._speech is None or self._failed or self._cancel.is_set():
            return
        unsaid = self._text[self._said :]
        sentences, rest = split_sentences(unsaid)
        opening = first_clause(unsaid) if self._said == 0 and not sentences else None
        if opening is not None:  # the first audio of a long first sentence: its first clause, spoken now
            sentences, rest = [opening[0]], opening[1]
        cursor = 0
        for sentence in sentences:
            found = unsaid.find(sentence, cursor)
            cursor = found + len(sentence) if found >= 0 else cursor
            self._sentences.put_nowait((sentence, self._said + cursor))
        self._said = len(self._text) - len(rest)

    def finish(self) -> None:
        rest = self._text[self._said :].strip()
        if self._speech is not None and rest and not self._failed and not self._cancel.is_set():
            self._sentences.put_nowait((rest, len(self._text)))
        self._said = len(self._text)
        self._sentences.put_nowait(None)

    async def wait(self) -> None:
        if self._pump is None:
            return
        if self._cancel.is_set():
            self._sentences.put_nowait(None)
        await self._pump

    async def _play(self) -> None:
        ahead: deque[tuple[Future[Audio], int]] = deque()  # submitted to the speech worker, in order
        ended = False
        while True:
            while not ended and len(ahead) < SYNTHESIS_AHEAD:
                try:
                    entry = self._sentences.get_nowait() if ahead else await self._sentences.get()
                except asyncio.QueueEmpty:
                    break
                if entry is None:
                    ended = True
                elif not (self._cancel.is_set() or self._failed):
                    try:
                        ahead.append((self._submit(entry[0]), entry[1]))
                    except AssistantError as exc:  # the speech worker is full: this reply stays text
                        await self._fail(exc)
            if not ahead:
                if ended:
                    return
                continue
            job, end_char = ahead.popleft()
            if self._cancel.is_set() or self._failed:
                job.cancel()
                continue
            try:
                audio = await asyncio.wrap_future(job)
            except Exception as exc:  # speech is lost, the text reply goes on
                await self._fail(exc)
                continue
            if not self._cancel.is_set():
                await self._send(audio, end_char)

    def _submit(self, sentence: str) -> Future[Audio]:
        speech, voice, speed = self._speech, self._voice, self._session.options.speed
        worker = self._session._services.speech_worker
        assert speech is not None and worker is not None
        return worker.submit(lambda: speech.synthesize(sentence, voice=voice, speed=speed))

    async def _send(self, audio: Audio, end_char: int) -> None:
        assert self.spoken is not None
        if self.spoken.first_audio is None:
            self.spoken.first_audio = self._session._clock()
        self.spoken.audio_s += audio.duration_s
        self.spoken.ends.append((end_char, self.spoken.audio_s))
        await self._session._emit(ReplyAudio(*self._ids, audio))

    async def _fail(self, exc: Exception) -> None:
        self._failed = True
        message = exc.message if isinstance(exc, AssistantError) else f"{type(exc).__name__}: {exc}"
        await self._session._emit(SessionError(OutputError(f"tts: the reply cannot be spoken: {message}")))
