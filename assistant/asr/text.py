"""Text clean-up after recognition: the Chinese script users asked for."""

from __future__ import annotations

from dataclasses import replace

from assistant.config import ZhScript
from assistant.messages import Transcript

_OPENCC_CONVERSION = {"simplified": "t2s", "traditional": "s2t"}  # OpenCC profile per wanted script
_CHINESE = ("zh",)  # Whisper's Mandarin code; yue keeps what the model writes


def apply_zh_script(transcript: Transcript, script: ZhScript) -> Transcript:
    """Whisper mixes simplified and traditional characters; convert all of a Chinese transcript to one script."""
    if script == "as-is" or transcript.language not in _CHINESE:
        return transcript
    from opencc import OpenCC

    converter = OpenCC(_OPENCC_CONVERSION[script])
    segments = tuple(replace(s, text=converter.convert(s.text)) for s in transcript.segments)
    return replace(transcript, text=converter.convert(transcript.text), segments=segments)
