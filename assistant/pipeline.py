"""Where the stages meet. ``TranscriptionPipeline``: file -> decode -> VAD -> ASR -> text clean-up -> Transcript."""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TypeVar

from assistant import registry
from assistant.asr.base import Transcriber, VoiceActivityDetector, language_error
from assistant.asr.text import apply_zh_script
from assistant.audio import blocks_at_quiet_points, group_spans
from assistant.config import AsrConfig, Config, TranscribeConfig, VadConfig
from assistant.errors import ConfigError
from assistant.io.audio_file import AudioInfo, probe, stream_audio
from assistant.messages import Audio, Segment, Timings, Transcript

DECODE_PIECE_S = 30.0  # seconds read from ffmpeg at a time
T = TypeVar("T")


@dataclass(frozen=True)
class FileResult:
    info: AudioInfo
    transcript: Transcript
    timings: Timings


class TranscriptionPipeline:
    """Transcribes files one after another with models loaded once."""

    def __init__(
        self,
        transcriber: Transcriber,
        vad: VoiceActivityDetector | None,
        *,
        asr: AsrConfig,
        transcribe: TranscribeConfig,
    ) -> None:
        self.transcriber = transcriber
        self._vad = vad
        self._asr = asr
        self._transcribe = transcribe
        self._language = normalize_language(asr.language)
        if self._language and not transcriber.supports_language(self._language):
            raise ConfigError(f"asr.language: {language_error(self._language, asr.model)}")

    @classmethod
    def from_config(cls, config: Config) -> TranscriptionPipeline:
        return cls.from_config_parts(config.asr, config.vad, config.transcribe)

    @classmethod
    def from_config_parts(cls, asr: AsrConfig, vad: VadConfig, transcribe: TranscribeConfig) -> TranscriptionPipeline:
        """Build the stages the configuration names, through the registry."""
        transcriber = registry.create("asr", asr.backend, asr)
        detector = registry.create("vad", vad.backend, vad) if vad.enabled else None
        return cls(transcriber, detector, asr=asr, transcribe=transcribe)

    def transcribe_file(
        self,
        path: str | Path,
        *,
        on_progress: Callable[[float], None] | None = None,
        language: str | None = None,
    ) -> FileResult:
        """Transcribe one file; ``on_progress`` gets the seconds of audio done so far; ``language`` overrides the
        configured one for this file."""
        started = time.perf_counter()
        info = probe(path)
        clock = _StageClock()
        language = normalize_language(language) or self._language
        if language and not self.transcriber.supports_language(language):
            raise ConfigError(f"language: {language_error(language, self._asr.model)}")
        segments: list[Segment] = []
        pieces = clock.timed_iter("decode", stream_audio(path, piece_s=DECODE_PIECE_S))
        for block in blocks_at_quiet_points(pieces, self._transcribe.block_s):
            windows = self._windows(block, clock)
            if language is None and windows:
                with clock.stage("asr"):
                    language = self.transcriber.detect_language(max(windows, key=lambda w: w.duration_s))
            for batch in _batched(windows, self.transcriber.batch_size):
                with clock.stage("asr"):
                    results = self.transcriber.transcribe_many(batch, language=language, task=self._asr.task)
                for window, result in zip(batch, results, strict=True):
                    segments.extend(_place(result.segments, window))
                if on_progress:
                    on_progress(batch[-1].end_s)
            if on_progress:
                on_progress(block.end_s)
        audio_s = clock.decoded_s
        transcript = Transcript(" ".join(s.text for s in segments).strip(), language, tuple(segments), audio_s)
        if self._asr.task == "transcribe":
            transcript = apply_zh_script(transcript, self._asr.zh_script)
        timings = Timings(
            decode_s=clock.seconds["decode"],
            vad_s=clock.seconds["vad"],
            asr_s=clock.seconds["asr"],
            total_s=time.perf_counter() - started,
        )
        return FileResult(info, transcript, timings)

    def _windows(self, block: Audio, clock: _StageClock) -> list[Audio]:
        """The pieces of a block worth recognising: VAD speech grouped into windows, or the whole block."""
        if self._vad is None:
            return [block]
        with clock.stage("vad"):
            spans = self._vad.speech_spans(block)
        grouped = group_spans(spans, self._asr.chunk_s)
        return [block.slice(span.start_s - block.start_s, span.end_s - block.start_s) for span in grouped]


def normalize_language(language: str | None) -> str | None:
    if language is None or language.strip().lower() in ("", "auto"):
        return None
    return language.strip().lower()


def _place(segments: Sequence[Segment], window: Audio) -> Iterator[Segment]:
    """Segments relative to ``window`` moved onto the source's time line, clipped to the window."""
    for segment in segments:
        start = min(max(segment.start_s + window.start_s, window.start_s), window.end_s)
        end = min(max(segment.end_s + window.start_s, start), window.end_s)
        yield Segment(round(start, 3), round(end, 3), segment.text)


def _batched(items: Sequence[T], size: int) -> Iterator[Sequence[T]]:
    for first in range(0, len(items), max(1, size)):
        yield items[first : first + size]


class _StageClock:
    """Wall seconds per stage, and how much audio the decoder has produced."""

    def __init__(self) -> None:
        self.seconds: dict[str, float] = {"decode": 0.0, "vad": 0.0, "asr": 0.0}
        self.decoded_s = 0.0

    def stage(self, name: str) -> _Timer:
        return _Timer(self.seconds, name)

    def timed_iter(self, name: str, pieces: Iterator[Audio]) -> Iterator[Audio]:
        while True:
            with self.stage(name):
                piece = next(pieces, None)
            if piece is None:
                return
            self.decoded_s = piece.end_s
            yield piece


class _Timer:
    def __init__(self, totals: dict[str, float], name: str) -> None:
        self._totals = totals
        self._name = name
        self._start = 0.0

    def __enter__(self) -> None:
        self._start = time.perf_counter()

    def __exit__(self, *exc: object) -> None:
        self._totals[self._name] += time.perf_counter() - self._start
