"""Where the stages meet. ``TranscriptionPipeline``: file -> decode -> VAD -> ASR -> text clean-up -> Transcript."""

from __future__ import annotations

import time
from collections.abc import Callable, Generator, Iterator, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, TypeVar

import numpy as np

from assistant import registry
from assistant.asr.base import Transcriber, VoiceActivityDetector, language_error
from assistant.asr.language import LanguageGuess, settle_languages
from assistant.asr.quality import temperature_ladder
from assistant.asr.text import apply_zh_script
from assistant.audio import blocks_at_quiet_points, group_spans
from assistant.audio.decode import AudioInfo, AudioSource, choose_source, probe, stream_audio
from assistant.audio.level import FRAME_S, frame_levels, normalize
from assistant.config import AsrConfig, Config, Task, TranscribeConfig, VadConfig
from assistant.errors import ConfigError, LimitError
from assistant.messages import Audio, Segment, Timings, Transcript, Word, shifted_seek

DECODE_PIECE_S = 30.0  # seconds read from ffmpeg at a time
SPEECH_LEVEL_DBFS = -45.0  # without a VAD, frames above this level count as speech when choosing a track
TRUNCATED_S = 1.0  # decoded audio this much shorter than the stream's declared duration is worth a warning
MAX_GAP_IN_WINDOW_S = 2.0  # speech spans further apart go to separate windows: no window (or cue) spans a long pause
T = TypeVar("T")


RunModel = Callable[[Callable[[], list[Transcript]]], list[Transcript]]


def _run_here(call: Callable[[], list[Transcript]]) -> list[Transcript]:
    return call()


@dataclass
class _FileJob:
    """What one file's transcription carries from block to block."""

    language: str | None
    keep_words: bool
    clock: _StageClock
    on_progress: Callable[[float], None] | None
    run_model: RunModel
    task: Task = "transcribe"
    decoding: dict[str, Any] = field(default_factory=dict)  # one request's prompt and temperatures, when given
    spoken: SpokenLanguages = field(default_factory=lambda: SpokenLanguages())


@dataclass(frozen=True)
class AudioLimit:
    """At most ``seconds`` of audio in one file; ``setting`` names the option the user can change."""

    seconds: float
    setting: str

    def check_declared(self, info: AudioInfo) -> None:
        declared = info.declared_s
        if declared > self.seconds:
            raise LimitError(self._message(f"holds {declared / 60:.0f} min of audio"))

    def enforced(self, pieces: Generator[Audio, None, None]) -> Iterator[Audio]:
        try:
            for piece in pieces:
                if piece.end_s > self.seconds:
                    raise LimitError(self._message(f"holds over {self.seconds / 60:g} min of audio (found decoding)"))
                yield piece
        finally:
            pieces.close()  # stops ffmpeg now, not when the error is forgotten

    def _message(self, found: str) -> str:
        return f"the file {found}, over {self.setting} ({self.seconds:g} s); send a shorter file or raise the limit"


@dataclass(frozen=True)
class FileResult:
    info: AudioInfo
    transcript: Transcript
    timings: Timings
    source: AudioSource = field(default_factory=AudioSource)  # the track (and channel) that was transcribed
    warnings: tuple[str, ...] = ()  # for the user: why a transcript may be empty


class TranscriptionPipeline:
    """Transcribes files one after another with models loaded once."""

    def __init__(
        self,
        transcriber: Transcriber,
        vad: VoiceActivityDetector | None,
        *,
        asr: AsrConfig,
        transcribe: TranscribeConfig,
        vad_pad_s: float = 0.0,
    ) -> None:
        """``vad_pad_s``: the silence the VAD keeps before each stretch of speech (``vad.speech_pad_ms``); no segment
        is placed to start inside it, before the speech the VAD heard."""
        self.transcriber = transcriber
        self._vad = vad
        self._vad_pad_s = vad_pad_s if vad is not None else 0.0
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
        return cls(transcriber, detector, asr=asr, transcribe=transcribe, vad_pad_s=vad.speech_pad_ms / 1000)

    def check_language(self, language: str | None) -> str | None:
        """``language`` as the recogniser's code (None: the configured one, or detection); ConfigError when the
        model does not know it."""
        language = normalize_language(language) or self._language
        if language and not self.transcriber.supports_language(language):
            raise ConfigError(f"language: {language_error(language, self._asr.model)}", param="language")
        return language

    def transcribe_file(
        self,
        path: str | Path,
        *,
        on_progress: Callable[[float], None] | None = None,
        language: str | None = None,
        word_timestamps: bool = False,
        limit: AudioLimit | None = None,
        run_model: RunModel | None = None,
        task: Task | None = None,
        prompt: str | None = None,
        temperature: float | None = None,
        on_segments: Callable[[Sequence[Segment]], None] | None = None,
    ) -> FileResult:
        """Transcribe one file; ``on_progress`` gets the seconds of audio done so far; ``language`` overrides the
        configured one for this file; ``word_timestamps`` asks for words even when ``asr.word_timestamps`` is off;
        ``limit`` refuses a file holding more audio (LimitError): from its declared duration before any work, and
        while decoding for files that declare none or lie about it. ``run_model(call)`` runs each recogniser call
        (one batch of windows) and returns its result: the server passes its model worker's bulk queue, so that
        interactive requests go between the units of a long file; by default the calls run here.

        One request's choices over the configuration (the HTTP API's fields): ``task`` (``asr.task``), ``prompt``
        (``asr.initial_prompt``) and ``temperature``, where the fallback ladder starts (``temperature_ladder``).
        ``on_segments`` gets each block's final segments as soon as the block is done (a streamed answer)."""
        started = time.perf_counter()
        info = probe(path)
        if limit is not None:
            limit.check_declared(info)
        source = choose_source(
            info, self._speech_seconds, track=self._transcribe.audio_track, channel=self._transcribe.audio_channel
        )
        clock = _StageClock()
        language = self.check_language(language)
        decoding: dict[str, Any] = {} if prompt is None else {"prompt": prompt}
        if temperature is not None:
            decoding["temperatures"] = temperature_ladder(temperature, self._asr.temperatures)
        job = _FileJob(language, word_timestamps or self._asr.word_timestamps, clock, on_progress,
                       run_model or _run_here, task or self._asr.task, decoding)  # fmt: skip
        segments: list[Segment] = []
        pieces = clock.timed_iter("decode", stream_audio(path, source=source, piece_s=DECODE_PIECE_S))
        if limit is not None:
            pieces = limit.enforced(pieces)
        for block in blocks_at_quiet_points(pieces, self._transcribe.block_s):
            found = self._transcribe_block(block, job)
            if job.task == "transcribe":  # per block, so that what on_segments gets is final
                found = list(apply_zh_script(Transcript("", language, tuple(found)), self._asr.zh_script).segments)
            segments += found
            if on_segments:
                on_segments(found)
            if on_progress:
                on_progress(block.end_s)
        audio_s = clock.decoded_s
        main_language = language or job.spoken.main
        transcript = Transcript(" ".join(s.text for s in segments).strip(), main_language, tuple(segments), audio_s)
        timings = Timings(
            decode_s=clock.seconds["decode"],
            vad_s=clock.seconds["vad"],
            asr_s=clock.seconds["asr"],
            total_s=time.perf_counter() - started,
        )
        return FileResult(info, transcript, timings, source, _warnings(info, source, transcript))

    def _transcribe_block(self, block: Audio, job: _FileJob) -> list[Segment]:
        """One block: level, VAD windows, recognition in batches, languages settled, segments on the file's clock."""
        block, _gain_db = normalize(block)
        windows = self._windows(block, job.clock)
        results: list[Transcript] = []
        for batch in _batched(windows, self.transcriber.batch_size):
            results += self._recognise(job, batch, job.language)
            if job.on_progress:
                job.on_progress(batch[-1].end_s)
        if job.language is None:
            results = self._settle_languages(windows, results, job)
        segments: list[Segment] = []
        for window, result in zip(windows, results, strict=True):
            job.spoken.add(result, window.duration_s)
            lead_s = self._vad_pad_s if window.start_s > block.start_s else 0.0  # at a block's start: clipped
            placed = _place(result.segments, window, lead_s)
            segments.extend(placed if job.keep_words else (_fit_to_words(segment) for segment in placed))
        return segments

    def _recognise(self, job: _FileJob, windows: Sequence[Audio], language: str | None) -> list[Transcript]:
        # without a VAD a Whisper segment may run on over a long silence: its words say where the speech ends
        words = job.keep_words or self._vad is None
        with job.clock.stage("asr"):
            return job.run_model(
                lambda: self.transcriber.transcribe_many(
                    windows, language=language, task=job.task, word_timestamps=words, **job.decoding
                )
            )

    def _speech_seconds(self, audio: Audio) -> float:
        """Seconds of speech in a short excerpt (choosing a track): the VAD's, or loud frames' without a VAD."""
        audio, _gain = normalize(audio)
        if self._vad is not None:
            return sum(span.duration_s for span in self._vad.speech_spans(audio))
        return float(np.count_nonzero(frame_levels(audio.samples) > SPEECH_LEVEL_DBFS)) * FRAME_S

    def _settle_languages(self, windows: Sequence[Audio], results: list[Transcript], job: _FileJob) -> list[Transcript]:
        """Windows whose own detection was unsure are redone in the language their neighbours settle on."""
        guesses = [_guess(w, r) for w, r in zip(windows, results, strict=True)]
        settled = settle_languages(guesses, before=job.spoken.last)
        redo: dict[str, list[int]] = {}
        for index, (result, code) in enumerate(zip(results, settled, strict=True)):
            if code is not None and result.text and code != result.language:
                redo.setdefault(code, []).append(index)
        for code, indexes in redo.items():
            again = self._recognise(job, [windows[i] for i in indexes], code)
            for index, result in zip(indexes, again, strict=True):
                results[index] = result
        return results

    def _windows(self, block: Audio, clock: _StageClock) -> list[Audio]:
        """The pieces of a block worth recognising: VAD speech grouped into windows, or the whole block."""
        if self._vad is None:
            return [block]
        with clock.stage("vad"):
            spans = self._vad.speech_spans(block)
        grouped = group_spans(spans, self._asr.chunk_s, max_gap_s=MAX_GAP_IN_WINDOW_S)
        return [block.slice(span.start_s - block.start_s, span.end_s - block.start_s) for span in grouped]


def _warnings(info: AudioInfo, source: AudioSource, transcript: Transcript) -> tuple[str, ...]:
    """What the user should know about a result that may not be what they expected."""
    found = []
    declared = info.tracks[source.track].duration_s
    start = info.tracks[source.track].start_s
    if declared and transcript.audio_s < start + declared - max(TRUNCATED_S, 0.02 * declared):
        found.append(f"only {transcript.audio_s - start:.1f} s of the {declared:.1f} s the file declares could be "
                     "decoded: it may be truncated (an interrupted download or recording)")  # fmt: skip
    if not transcript.text and source.others:
        found.append(f"no speech was recognised in {source.label}; {source.others}: choose another with "
                     "--audio-track N or --audio-channel N")  # fmt: skip
    elif not transcript.text:
        found.append("no speech was recognised: the outputs are empty (silence or noise; if there is speech, try "
                     "--language or --no-vad)")  # fmt: skip
    return tuple(found)


def _guess(window: Audio, result: Transcript) -> LanguageGuess:
    """What a window's own detection says; a window with no words says nothing."""
    if not result.text or result.language is None:
        return LanguageGuess(None, 0.0, window.duration_s)
    probability = 1.0 if result.language_probability is None else result.language_probability
    return LanguageGuess(result.language, probability, window.duration_s)


class SpokenLanguages:
    """Seconds of recognised speech per language over a file: its main language, and the last one heard."""

    def __init__(self) -> None:
        self.seconds: dict[str, float] = {}
        self.last: str | None = None

    def add(self, result: Transcript, seconds: float) -> None:
        if result.text and result.language:
            self.seconds[result.language] = self.seconds.get(result.language, 0.0) + seconds
            self.last = result.language

    @property
    def main(self) -> str | None:
        return max(self.seconds, key=lambda code: self.seconds[code]) if self.seconds else None


def normalize_language(language: str | None) -> str | None:
    if language is None or language.strip().lower() in ("", "auto"):
        return None
    return language.strip().lower()


def _place(segments: Sequence[Segment], window: Audio, lead_s: float = 0.0) -> Iterator[Segment]:
    """Segments (and their words) relative to ``window`` moved onto the source's time line, clipped to the window;
    none starts in the window's first ``lead_s`` seconds (the VAD's padding before the speech it heard: Whisper
    often puts its first timestamp at 0.00 there). ``seek`` moves with the window (it is where the decoded window
    starts on the source); the decoding values stay the recogniser's."""

    def clip(seconds: float, low: float) -> float:
        return round(min(max(seconds + window.start_s, low), window.end_s), 3)

    onset = min(window.start_s + lead_s, window.end_s)
    for segment in segments:
        ends_after_onset = segment.end_s + window.start_s > onset
        start = clip(segment.start_s, onset if ends_after_onset else window.start_s)
        words = []
        for word in segment.words:
            word_start = clip(word.start_s, start)
            words.append(Word(word.word, word_start, clip(word.end_s, word_start), word.probability))
        yield replace(segment, start_s=start, end_s=clip(segment.end_s, start), words=tuple(words),
                      seek=shifted_seek(segment.seek, window.start_s))  # fmt: skip


def _fit_to_words(segment: Segment) -> Segment:
    """The segment from its first word's start to its last word's end, without its words (they were asked for
    only to place it); its text and decoding values are unchanged."""
    if not segment.words:
        return segment
    start, end = segment.words[0].start_s, segment.words[-1].end_s
    return replace(segment, start_s=max(segment.start_s, start), end_s=max(min(segment.end_s, end), start), words=())


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

    def timed_iter(self, name: str, pieces: Iterator[Audio]) -> Generator[Audio, None, None]:
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
