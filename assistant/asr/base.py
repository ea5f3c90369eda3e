"""The Transcriber contract every ASR backend fulfils."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import replace
from typing import Protocol, runtime_checkable

from assistant.config import AsrConfig, Task
from assistant.messages import Audio, Span, Transcript


class Transcriber(Protocol):
    """Audio in, transcript out. Times in the returned segments are relative to each ``Audio``'s own start."""

    @property
    def description(self) -> str:
        """Backend and model, for logs and JSON output (e.g. ``faster-whisper whisper-base int8 cpu``)."""
        ...

    @property
    def batch_size(self) -> int:
        """How many windows ``transcribe_many`` decodes together with profit on this device."""
        ...

    def supports_language(self, language: str) -> bool: ...

    def transcribe_many(
        self,
        audios: Sequence[Audio],
        *,
        language: str | None,
        task: Task = "transcribe",
        timestamps: bool = True,
        word_timestamps: bool = False,
        prompt: str | None = None,
        temperatures: tuple[float, ...] | None = None,
    ) -> list[Transcript]:
        """One transcript per window, in order. ``language=None``: each window detects its own language (the
        transcript's ``language`` and ``language_probability`` say what was found). ``word_timestamps``: segments
        carry ``words``. ``prompt`` and ``temperatures``: one request's own initial prompt and fallback ladder
        (OpenAI's ``prompt`` and ``temperature``); None keeps ``asr.initial_prompt`` / ``asr.temperatures``."""
        ...


@runtime_checkable
class PartialTranscriber(Protocol):
    """A backend that can also give a quick, rough transcript of a short utterance still being spoken (live
    partials): cheaper than ``transcribe_many``, never used for a final transcript."""

    def transcribe_partial(self, audio: Audio, *, language: str | None) -> Transcript: ...


@runtime_checkable
class LiveTranscriber(Protocol):
    """A backend whose final transcript of a short live utterance costs what the utterance is: a drop-in for
    ``transcribe_many(audios, language=language, timestamps=False)`` on a live turn's final (same words on the
    benchmark's questions, each transcript a single untimed segment or none). faster-whisper implements it with an
    encoder window cut to the utterance; whisper-hf does not (transformers' Whisper encoder requires the whole 3000
    frames), nor does the remote backend: callers use ``transcribe_many`` for those."""

    def transcribe_live(self, audios: Sequence[Audio], *, language: str | None) -> list[Transcript]: ...


def for_request(config: AsrConfig, prompt: str | None, temperatures: tuple[float, ...] | None) -> AsrConfig:
    """The backend's configuration with one request's prompt and temperature ladder over it: one value that the
    backend's decoding steps all read, instead of two more arguments each."""
    if prompt is None and temperatures is None:
        return config
    return replace(config, initial_prompt=config.initial_prompt if prompt is None else prompt,
                   temperatures=config.temperatures if temperatures is None else temperatures)  # fmt: skip


def language_error(language: str, model: str) -> str:
    hint = " (Cantonese 'yue' needs whisper-large-v3; use 'zh' otherwise)" if language == "yue" else ""
    return f"model '{model}' does not know language {language!r}{hint}; use a language code it supports or 'auto'"


class VoiceActivityDetector(Protocol):
    def speech_spans(self, audio: Audio) -> list[Span]:
        """Speech in ``audio``, in seconds from the start of ``audio``'s source."""
        ...
