"""openai/whisper's checks on one decode, shared by the local backends: the compression ratio of its text, the
verdict (keep it, redo it hotter, or drop it as silence) and the temperature ladder a request's ``temperature``
starts."""

from __future__ import annotations

import zlib
from collections.abc import Sequence
from typing import Literal

from assistant.config import AsrConfig

Verdict = Literal["ok", "fallback", "silence"]


def compression_ratio(text: str) -> float:
    """How well the text's UTF-8 compresses with zlib (openai/whisper's ``compression_ratio``): repetitive
    hallucinations ("Thank you. Thank you. Thank you.") compress well, above 2.4."""
    encoded = text.encode("utf-8")
    return len(encoded) / len(zlib.compress(encoded))


def verdict(config: AsrConfig, ratio: float, avg_logprob: float, no_speech_prob: float) -> Verdict:
    """openai/whisper's rule for one decode: "silence" (no speech: the text is dropped), "fallback" (too repetitive
    or too unlikely: decode again at the next temperature, when there is one) or "ok"."""
    unlikely = config.logprob_threshold is not None and avg_logprob < config.logprob_threshold
    if config.no_speech_threshold is not None and no_speech_prob > config.no_speech_threshold and unlikely:
        return "silence"
    repetitive = config.compression_ratio_threshold is not None and ratio > config.compression_ratio_threshold
    return "fallback" if (repetitive or unlikely) and len(config.temperatures) > 1 else "ok"


def temperature_ladder(start: float, configured: Sequence[float]) -> tuple[float, ...]:
    """The temperatures to try for a request that asks for ``start`` (OpenAI's ``temperature``): ``start``, then
    the configured fallback steps above it, as openai/whisper's CLI climbs from its ``--temperature``. ``0`` keeps
    the whole configured ladder (OpenAI: "If set to 0, the model will ... automatically increase the temperature
    until certain thresholds are hit")."""
    return (start, *(t for t in configured if t > start))
