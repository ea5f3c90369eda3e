"""Transcript writers: one function per output format, looked up in WRITERS (as openai/whisper does).

Every writer is called as ``WRITERS[fmt](transcript, meta, options)``. SRT and VTT cut segments into readable cues
(``assistant.asr.cues``: 2 lines of 42 characters, 16 for CJK text, 7 s at most, following ``options``); TXT, TSV and
JSON keep whole segments and ignore ``options``; only JSON writes ``meta``.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from typing import Any, Protocol

from assistant.asr.cues import CueOptions, build_cues
from assistant.messages import Segment, Transcript

DEFAULT_CUES = CueOptions()


class Writer(Protocol):
    def __call__(
        self, transcript: Transcript, meta: Mapping[str, Any], options: CueOptions = DEFAULT_CUES, /
    ) -> str: ...


def _clock(millis: int, decimal: str) -> str:
    hours, millis = divmod(millis, 3_600_000)
    minutes, millis = divmod(millis, 60_000)
    secs, millis = divmod(millis, 1000)
    return f"{hours:02d}:{minutes:02d}:{secs:02d}{decimal}{millis:03d}"


def _vtt_escape(text: str) -> str:
    # WebVTT cue text: "&" and "<" start escapes and tags, and ">" is escaped too (W3C WebVTT, 4.2.2 "Cue text").
    return text.replace("&", "&amp;").replace("<", "&lt;").replace(">", "&gt;")


def write_txt(transcript: Transcript, meta: Mapping[str, Any], options: CueOptions = DEFAULT_CUES) -> str:
    return "".join(f"{segment.text.strip()}\n" for segment in transcript.segments)


def write_srt(transcript: Transcript, meta: Mapping[str, Any], options: CueOptions = DEFAULT_CUES) -> str:
    cues = [
        f"{number}\n{_clock(cue.start_ms, ',')} --> {_clock(cue.end_ms, ',')}\n{cue.text}\n"
        for number, cue in enumerate(build_cues(transcript.segments, options), start=1)
    ]
    return "\n".join(cues)


def write_vtt(transcript: Transcript, meta: Mapping[str, Any], options: CueOptions = DEFAULT_CUES) -> str:
    cues = [
        f"{_clock(cue.start_ms, '.')} --> {_clock(cue.end_ms, '.')}\n{_vtt_escape(cue.text)}\n"
        for cue in build_cues(transcript.segments, options)
    ]
    return "WEBVTT\n\n" + "\n".join(cues)


def write_tsv(transcript: Transcript, meta: Mapping[str, Any], options: CueOptions = DEFAULT_CUES) -> str:
    rows = ["start\tend\ttext"]
    rows += [
        f"{round(s.start_s * 1000)}\t{round(s.end_s * 1000)}\t{' '.join(s.text.split())}" for s in transcript.segments
    ]
    return "\n".join(rows) + "\n"


def segment_json(index: int, segment: Segment) -> dict[str, Any]:
    """One segment as JSON: openai/whisper's fields, in its order (those the recogniser did not give are left out,
    never null), plus ``language`` when known and ``words`` when asked for."""
    document: dict[str, Any] = {"id": index}
    if segment.seek is not None:
        document["seek"] = segment.seek
    document.update(start=round(segment.start_s, 3), end=round(segment.end_s, 3), text=segment.text)
    if segment.tokens is not None:
        document["tokens"] = list(segment.tokens)
    decoding = {"temperature": segment.temperature, "avg_logprob": segment.avg_logprob,
                "compression_ratio": segment.compression_ratio, "no_speech_prob": segment.no_speech_prob}  # fmt: skip
    document.update((key, value) for key, value in decoding.items() if value is not None)
    if segment.language:
        document["language"] = segment.language
    if segment.words:
        document["words"] = [
            {"word": w.word, "start": round(w.start_s, 3), "end": round(w.end_s, 3),
             "probability": None if w.probability is None else round(w.probability, 3)}
            for w in segment.words
        ]  # fmt: skip
    return document


def write_json(transcript: Transcript, meta: Mapping[str, Any], options: CueOptions = DEFAULT_CUES) -> str:
    document = {
        "text": transcript.text,
        "language": transcript.language,
        "duration": round(transcript.audio_s, 3),
        "segments": [segment_json(i, s) for i, s in enumerate(transcript.segments)],
        **meta,
    }
    return json.dumps(document, ensure_ascii=False, indent=2) + "\n"


WRITERS: dict[str, Writer] = {
    "txt": write_txt,
    "srt": write_srt,
    "vtt": write_vtt,
    "tsv": write_tsv,
    "json": write_json,
}
