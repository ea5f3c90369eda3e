"""Transcript writers: one function per output format, looked up in WRITERS (as openai/whisper does)."""

from __future__ import annotations

import json
from collections.abc import Callable, Mapping
from typing import Any

from assistant.messages import Segment, Transcript


def _clock(seconds: float, decimal: str) -> str:
    millis = max(0, round(seconds * 1000))
    hours, millis = divmod(millis, 3_600_000)
    minutes, millis = divmod(millis, 60_000)
    secs, millis = divmod(millis, 1000)
    return f"{hours:02d}:{minutes:02d}:{secs:02d}{decimal}{millis:03d}"


def _cue_text(segment: Segment) -> str:
    # A blank line ends a cue and "-->" starts a timing line in both SRT and VTT; neither may appear in the text.
    lines = [line.strip() for line in segment.text.replace("-->", "->").splitlines() if line.strip()]
    return "\n".join(lines)


def write_txt(transcript: Transcript, meta: Mapping[str, Any]) -> str:
    return "".join(f"{segment.text.strip()}\n" for segment in transcript.segments)


def write_srt(transcript: Transcript, meta: Mapping[str, Any]) -> str:
    cues = [
        f"{number}\n{_clock(s.start_s, ',')} --> {_clock(max(s.end_s, s.start_s), ',')}\n{_cue_text(s)}\n"
        for number, s in enumerate(transcript.segments, start=1)
    ]
    return "\n".join(cues)


def write_vtt(transcript: Transcript, meta: Mapping[str, Any]) -> str:
    cues = [
        f"{_clock(s.start_s, '.')} --> {_clock(max(s.end_s, s.start_s), '.')}\n{_cue_text(s)}\n"
        for s in transcript.segments
    ]
    return "WEBVTT\n\n" + "\n".join(cues)


def write_tsv(transcript: Transcript, meta: Mapping[str, Any]) -> str:
    rows = ["start\tend\ttext"]
    rows += [
        f"{round(s.start_s * 1000)}\t{round(s.end_s * 1000)}\t{' '.join(s.text.split())}" for s in transcript.segments
    ]
    return "\n".join(rows) + "\n"


def write_json(transcript: Transcript, meta: Mapping[str, Any]) -> str:
    document = {
        "text": transcript.text,
        "language": transcript.language,
        "duration": round(transcript.audio_s, 3),
        "segments": [
            {"id": i, "start": round(s.start_s, 3), "end": round(s.end_s, 3), "text": s.text}
            for i, s in enumerate(transcript.segments)
        ],
        **meta,
    }
    return json.dumps(document, ensure_ascii=False, indent=2) + "\n"


WRITERS: dict[str, Callable[[Transcript, Mapping[str, Any]], str]] = {
    "txt": write_txt,
    "srt": write_srt,
    "vtt": write_vtt,
    "tsv": write_tsv,
    "json": write_json,
}
