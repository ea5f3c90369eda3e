"""The only types that stages share. Plain values: stages take these in and give these back."""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass, field, replace
from typing import Any, Literal, Protocol

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
class Word:
    """One recognised word with its times (seconds from the start of the source) and the model's probability for
    it; ``word`` keeps Whisper's leading space (``" hello"``) so that joining words gives the segment's text. The
    field names are faster-whisper's and OpenAI's (``word``, ``start``, ``end``, ``probability``)."""

    word: str
    start_s: float
    end_s: float
    probability: float | None  # None: the recogniser gives none (OpenAI's API returns words without it)


@dataclass(frozen=True)
class Segment:
    """A stretch of recognised speech; times in seconds from the start of the source. ``words`` is empty unless word
    timestamps were asked for; ``language`` is the language this segment was recognised in (None: not known).

    The rest is how the recogniser decoded it, the fields of openai/whisper's and OpenAI's ``verbose_json``
    segments, which clients use to drop hallucinations (a high ``no_speech_prob`` with a low ``avg_logprob``; a
    ``compression_ratio`` over 2.4): ``seek``, the start of the decoded 30 s window in 10 ms mel frames from the
    start of the source; ``tokens``, the segment's token ids (timestamp tokens included, as Whisper gives them);
    ``temperature``, the fallback temperature whose decode was kept; ``avg_logprob``, ``compression_ratio`` (zlib,
    of the decode's text) and ``no_speech_prob``, of the whole window's decode, so every segment of one decode
    carries the same values, as in openai/whisper. None: the recogniser did not give it (never a made-up value)."""

    start_s: float
    end_s: float
    text: str
    words: tuple[Word, ...] = ()
    language: str | None = None
    seek: int | None = None  # mel frames (FRAMES_PER_S a second)
    tokens: tuple[int, ...] | None = None
    temperature: float | None = None
    avg_logprob: float | None = None
    compression_ratio: float | None = None
    no_speech_prob: float | None = None

    def shifted(self, offset_s: float) -> Segment:
        """The same segment ``offset_s`` seconds later on the source's timeline (its words and ``seek`` too)."""
        words = tuple(Word(w.word, w.start_s + offset_s, w.end_s + offset_s, w.probability) for w in self.words)
        return replace(self, start_s=self.start_s + offset_s, end_s=self.end_s + offset_s, words=words,
                       seek=shifted_seek(self.seek, offset_s))  # fmt: skip


FRAMES_PER_S = 100  # Whisper's mel frames (10 ms hops): the unit of a segment's ``seek``


def shifted_seek(seek: int | None, offset_s: float) -> int | None:
    """A ``seek`` moved ``offset_s`` seconds along the timeline (None stays None)."""
    return None if seek is None else seek + round(offset_s * FRAMES_PER_S)


@dataclass(frozen=True)
class Transcript:
    """Recognised text. ``language_probability`` is the recogniser's confidence in ``language`` when it detected the
    language itself (None when the language was given)."""

    text: str
    language: str | None
    segments: tuple[Segment, ...] = ()
    audio_s: float = 0.0
    language_probability: float | None = None


@dataclass(frozen=True)
class Timings:
    """Wall seconds spent per stage of one job."""

    decode_s: float = 0.0
    vad_s: float = 0.0
    asr_s: float = 0.0
    total_s: float = 0.0


Role = Literal["system", "user", "assistant", "tool"]
ROLES: tuple[Role, ...] = ("system", "user", "assistant", "tool")


@dataclass(frozen=True)
class ToolCall:
    """A function call the model made (OpenAI's ``tool_calls[]`` item): ``arguments`` is JSON text, as OpenAI sends
    it (a model may write invalid JSON unless its choice was constrained)."""

    id: str
    name: str
    arguments: str

    def to_openai(self) -> dict[str, Any]:
        """The ``tool_calls[]`` item as OpenAI's API writes it (and as conversations are saved)."""
        return {"id": self.id, "type": "function", "function": {"name": self.name, "arguments": self.arguments}}


@dataclass(frozen=True)
class Tool:
    """A function the model may call (OpenAI's ``tools[]`` item of type function): ``parameters`` is its JSON
    Schema."""

    name: str
    description: str = ""
    parameters: dict[str, Any] = field(default_factory=lambda: {"type": "object", "properties": {}})
    strict: bool = False

    def to_openai(self) -> dict[str, Any]:
        """The ``tools[]`` item as OpenAI's API (and chat templates, as transformers passes them) write it."""
        function: dict[str, Any] = {"name": self.name, "description": self.description, "parameters": self.parameters}
        if self.strict:
            function["strict"] = True
        return {"type": "function", "function": function}


@dataclass(frozen=True)
class ToolUse:
    """The functions offered for one reply. ``choice``: ``auto`` (the model decides), ``required`` (at least one
    call), ``none`` (no call: the tools are not shown), or the name of the one function to call; ``parallel``: more
    than one call in a reply allowed (OpenAI's ``parallel_tool_calls``)."""

    tools: tuple[Tool, ...]
    choice: str = "auto"
    parallel: bool = True


@dataclass(frozen=True)
class Message:
    """One turn of a conversation. ``cut`` marks a reply that was stopped before the model finished it. An assistant
    turn may hold ``tool_calls`` (its ``content`` then often ""); a ``tool`` turn is one call's result, naming the
    call in ``tool_call_id``."""

    role: Role
    content: str
    cut: bool = False
    tool_calls: tuple[ToolCall, ...] = ()
    tool_call_id: str | None = None


@dataclass(frozen=True)
class ReplyStats:
    """How one reply was generated: prompt size, reply size, time to first token and decode speed."""

    prompt_tokens: int = 0
    cached_tokens: int = 0  # prompt tokens whose KV cache was reused from the previous turn
    completion_tokens: int = 0
    first_token_s: float = 0.0  # from the request to the first generated token
    total_s: float = 0.0
    finish_reason: str = "stop"  # stop | length | cancelled | tool_calls (the reply ended in function calls)

    @property
    def decode_tokens_per_s(self) -> float:
        """Generated tokens per second after the first one (the prompt is excluded)."""
        decode_s = self.total_s - self.first_token_s
        return (self.completion_tokens - 1) / decode_s if self.completion_tokens > 1 and decode_s > 0 else 0.0


@dataclass(frozen=True)
class SpeechStarted:
    """The endpointer heard speech begin (long enough not to be a click): the moment to barge in."""

    at_s: float  # seconds into the source
    item_id: str | None = None  # the user item this speech becomes (set by the voice session)


@dataclass(frozen=True)
class Utterance:
    """One spoken turn, cut by the endpointer (or push-to-talk)."""

    audio: Audio
    speech_end_clock: float  # time.monotonic() when the last speech sample was captured


@dataclass(frozen=True)
class TurnMetrics:
    """Latency of one voice turn, in milliseconds from the end of speech (the VAD's silence window included).
    ``speech_end_to_first_audio_ms`` is the figure voice agents quote: end of speech to the first byte of spoken
    reply (None when the reply was text only or no audio was made)."""

    audio_s: float
    speech_end_to_transcript_ms: float
    transcript_to_first_char_ms: float
    speech_end_to_first_char_ms: float
    tokens_per_s: float
    cut: bool = False
    speech_end_to_first_audio_ms: float | None = None
    # the breakdown (spoken turns): where the time from the end of speech to the first character went
    endpoint_ms: float | None = None  # end of speech -> the turn ended (the silence the end-of-turn rule asked for)
    asr_start_ms: float | None = None  # end of speech -> recognition of the final transcript started
    asr_ms: float | None = None  # that recognition's own run on the model worker
    first_token_ms: float | None = None  # the chat model's request -> first token (prefill, mostly)
    preemptive: bool = False  # the reply was started in the pause and held until the turn ended


# --- the voice session's events (assistant.session): typed, in the order they happen ----------------------------
# Item ids name the messages of a conversation (a user turn, a reply), as the OpenAI Realtime API's conversation
# items do; response ids name one reply's generation.


@dataclass(frozen=True)
class SpeechStopped:
    """The endpointer (or a commit) ended the user's turn; its audio goes to the recogniser as item ``item_id``."""

    item_id: str
    at_s: float  # seconds into the session's audio


@dataclass(frozen=True)
class TranscriptPartial:
    """Words recognised so far while the user still speaks. ``delta`` extends what earlier partials of this item
    said and is never taken back (words two successive hypotheses agree on); ``text`` is the whole current
    hypothesis, which may still change."""

    item_id: str
    delta: str
    text: str


@dataclass(frozen=True)
class TranscriptFinal:
    """The user turn's transcript (empty: noise, no turn is taken)."""

    item_id: str
    text: str
    audio_s: float
    latency_ms: float  # end of speech -> transcript


@dataclass(frozen=True)
class TranscriptFailed:
    item_id: str
    error: Exception


@dataclass(frozen=True)
class ItemAdded:
    """A message joined the conversation (a typed or spoken user turn, or a reply as it starts)."""

    item_id: str
    previous_item_id: str | None
    message: Message


@dataclass(frozen=True)
class ItemDeleted:
    item_id: str


@dataclass(frozen=True)
class ItemTruncated:
    """A spoken reply was cut at ``audio_end_ms``: the history keeps only what was heard up to there."""

    item_id: str
    audio_end_ms: int
    message: Message


Modality = Literal["text", "audio"]


@dataclass(frozen=True)
class ReplyStarted:
    response_id: str
    item_id: str
    modalities: tuple[Modality, ...]


@dataclass(frozen=True)
class ReplyTextDelta:
    """Reply text as it streams: whole characters. With audio out it is the transcript of the audio."""

    response_id: str
    item_id: str
    delta: str


@dataclass(frozen=True)
class ReplyAudio:
    """One spoken sentence of the reply, as soon as it is synthesized (``audio`` at the synthesizer's rate)."""

    response_id: str
    item_id: str
    audio: Audio


@dataclass(frozen=True)
class ReplyDone:
    """The end of one reply. ``status``: completed | cancelled | incomplete (max tokens) | failed."""

    response_id: str
    item_id: str
    text: str
    status: Literal["completed", "cancelled", "incomplete", "failed"]
    reason: str | None  # turn_detected | client_cancelled | max_output_tokens | an error code
    stats: ReplyStats
    metrics: TurnMetrics | None  # from the end of speech (spoken turns) or the request (typed); None if it failed
    audio_s: float = 0.0  # seconds of reply audio produced
    error: Exception | None = None


@dataclass(frozen=True)
class SpeculationDone:
    """A reply started in a pause, before the turn was known to be over (``turn.preemptive``), has met its fate:
    ``used`` (the turn ended with those words: its held text streamed at once), ``wasted`` (the turn ended with
    other words, or the conversation changed meanwhile) or ``cancelled`` (the user went on speaking). It never
    reaches the history or the transcript events."""

    outcome: Literal["used", "wasted", "cancelled"]
    ran_ms: float  # from its start to that verdict


@dataclass(frozen=True)
class SessionError:
    """Something that failed without ending the session (a bad request, the speech of one sentence)."""

    error: Exception
    event_id: str | None = None  # the client event that caused it


SessionEvent = (
    SpeechStarted
    | SpeechStopped
    | TranscriptPartial
    | TranscriptFinal
    | TranscriptFailed
    | ItemAdded
    | ItemDeleted
    | ItemTruncated
    | ReplyStarted
    | ReplyTextDelta
    | ReplyAudio
    | ReplyDone
    | SpeculationDone
    | SessionError
)


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
    """Where a voice turn is shown, played or recorded (the console's outputs)."""

    def partial(self, text: str) -> None:
        """The words recognised so far while the user still speaks (may change until the transcript)."""
        ...

    def transcript(self, text: str) -> None: ...

    def delta(self, text: str) -> None: ...

    def audio(self, audio: Audio) -> None:
        """One spoken sentence of the reply, to play after the ones before it."""
        ...

    def interrupted(self) -> None:
        """The user spoke over the reply: stop playing it now."""
        ...

    def turn_done(self, transcript: str, reply: str, metrics: TurnMetrics) -> None: ...

    def error(self, message: str) -> None: ...

    def notice(self, message: str) -> None: ...
