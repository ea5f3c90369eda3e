"""Text clean-up after recognition: the Chinese script users asked for."""

from __future__ import annotations

from dataclasses import replace

from assistant.config import ZhScript
from assistant.messages import Transcript

_OPENCC_CONVERSION = {"simplified": "t2s", "traditional": "s2t"}  # OpenCC profile per wanted script
_CHINESE = ("zh",)  # Whisper's Mandarin code; yue keeps what the model writes


def apply_zh_script(transcript: Transcript, script: ZhScript) -> Transcript:
    """Whisper mixes simplified and traditional characters; convert the Chinese of a transcript to one script.
    Segments carry their own language in files that switch language: only the Chinese ones are converted. Their
    decoding values (``tokens``, ``compression_ratio``, ...) stay those of the text as the recogniser wrote it."""
    chinese = [(s.language or transcript.language) in _CHINESE for s in transcript.segments]
    if script == "as-is" or not (any(chinese) or (not transcript.segments and transcript.language in _CHINESE)):
        return transcript
    from opencc import OpenCC

    converter = OpenCC(_OPENCC_CONVERSION[script])
    segments = tuple(
        replace(
            s, text=converter.convert(s.text), words=tuple(replace(w, word=converter.convert(w.word)) for w in s.words)
        )
        if is_chinese
        else s
        for s, is_chinese in zip(transcript.segments, chinese, strict=True)
    )
    text = " ".join(s.text for s in segments) if segments else converter.convert(transcript.text)
    return replace(transcript, text=text, segments=segments)
