"""Synthesized audio to bytes clients play: resampling (soxr), PCM16, WAV, G.711 mu-law / A-law, and mp3 / opus /
aac / flac through ffmpeg. ``resample``, ``pcm16`` and the G.711 codecs are pure numpy (+ soxr): fast enough for
streamed audio."""

from __future__ import annotations

import io
import subprocess
import tempfile
import wave
from pathlib import Path

import numpy as np

from assistant.errors import AudioDecodeError, ConfigError, OutputError
from assistant.messages import Audio

SPEECH_SAMPLE_RATE = 24_000  # Hz: OpenAI's speech and realtime audio, and what /v1/audio/speech sends
ENCODE_TIMEOUT_S = 120.0  # ffmpeg compressing one reply

# response_format -> (media type, ffmpeg output arguments; None = encoded here)
FORMATS: dict[str, tuple[str, tuple[str, ...] | None]] = {
    "mp3": ("audio/mpeg", ("-c:a", "libmp3lame", "-b:a", "64k", "-f", "mp3")),
    "opus": ("audio/ogg", ("-c:a", "libopus", "-b:a", "32k", "-f", "ogg")),
    "aac": ("audio/aac", ("-c:a", "aac", "-b:a", "64k", "-f", "adts")),
    "flac": ("audio/flac", ("-c:a", "flac", "-f", "flac")),
    "wav": ("audio/wav", None),
    "pcm": ("audio/pcm", None),  # raw 16-bit little-endian mono, no header
}

_PCM16_SCALE = 32767.0
# G.711 as in the ITU reference (Sun's g711.c, which CPython's audioop and most codecs use)
_MULAW_BIAS, _MULAW_CLIP = 0x84, 8159  # the clip is on 14-bit magnitudes
_MULAW_SEGMENT_ENDS = np.array([0x3F, 0x7F, 0xFF, 0x1FF, 0x3FF, 0x7FF, 0xFFF, 0x1FFF])  # biased 14-bit magnitude
_ALAW_SEGMENT_ENDS = np.array([0x1F, 0x3F, 0x7F, 0xFF, 0x1FF, 0x3FF, 0x7FF, 0xFFF])  # 13-bit magnitude per segment


def resample(audio: Audio, rate: int) -> Audio:
    """``audio`` at ``rate`` Hz (soxr, high quality); the same object when it is already at that rate."""
    if audio.sample_rate == rate:
        return audio
    import soxr

    samples = np.asarray(audio.samples, dtype=np.float32)
    converted = soxr.resample(samples, audio.sample_rate, rate) if len(samples) else samples
    return Audio(np.asarray(converted, dtype=np.float32), rate, audio.start_s)


def _int16(samples: np.ndarray) -> np.ndarray:
    clean = np.nan_to_num(np.asarray(samples, dtype=np.float32), nan=0.0, posinf=1.0, neginf=-1.0)
    return np.rint(np.clip(clean, -1.0, 1.0) * _PCM16_SCALE).astype(np.int16)


def pcm16(samples: np.ndarray) -> bytes:
    """float samples in [-1, 1] (clipped beyond) as signed 16-bit little-endian PCM."""
    return _int16(samples).astype("<i2", copy=False).tobytes()


def from_pcm16(data: bytes) -> np.ndarray:
    """Signed 16-bit little-endian PCM as float32 in [-1, 1]."""
    return np.frombuffer(data[: len(data) // 2 * 2], dtype="<i2").astype(np.float32) / _PCM16_SCALE


def wav_bytes(audio: Audio) -> bytes:
    """A 16-bit mono WAV file of ``audio`` at its own rate."""
    out = io.BytesIO()
    with wave.open(out, "wb") as file:
        file.setnchannels(1)
        file.setsampwidth(2)
        file.setframerate(audio.sample_rate)
        file.writeframes(pcm16(audio.samples))
    return out.getvalue()


def pcmu(samples: np.ndarray) -> bytes:
    """G.711 mu-law (``audio/pcmu``): one byte per sample; give 8 kHz samples for telephony."""
    linear = _int16(samples).astype(np.int32) >> 2  # mu-law codes 14 bits
    negative = linear < 0
    mask = np.where(negative, 0x7F, 0xFF)
    magnitude = np.minimum(np.where(negative, -linear, linear), _MULAW_CLIP) + (_MULAW_BIAS >> 2)
    segment = np.searchsorted(_MULAW_SEGMENT_ENDS, magnitude, side="left")
    code = (np.minimum(segment, 7) << 4) | ((magnitude >> (segment + 1)) & 0x0F)
    code = np.where(segment >= 8, 0x7F, code)
    return ((code ^ mask) & 0xFF).astype(np.uint8).tobytes()


def decode_pcmu(data: bytes) -> np.ndarray:
    """G.711 mu-law bytes as float32 in [-1, 1]."""
    code = ~np.frombuffer(data, dtype=np.uint8).astype(np.int32) & 0xFF
    exponent = (code >> 4) & 0x07
    magnitude = ((((code & 0x0F) << 3) + _MULAW_BIAS) << exponent) - _MULAW_BIAS
    return (np.where(code & 0x80, -magnitude, magnitude) / 32768.0).astype(np.float32)


def pcma(samples: np.ndarray) -> bytes:
    """G.711 A-law (``audio/pcma``): one byte per sample; give 8 kHz samples for telephony."""
    linear = _int16(samples).astype(np.int32) >> 3  # A-law codes 13 bits
    negative = linear < 0
    mask = np.where(negative, 0x55, 0xD5)
    magnitude = np.where(negative, -linear - 1, linear)
    segment = np.searchsorted(_ALAW_SEGMENT_ENDS, magnitude, side="left")
    shift = np.maximum(segment, 1)
    code = (np.minimum(segment, 7) << 4) | ((magnitude >> shift) & 0x0F)
    code = np.where(segment >= 8, 0x7F, code)
    return ((code ^ mask) & 0xFF).astype(np.uint8).tobytes()


def decode_pcma(data: bytes) -> np.ndarray:
    """G.711 A-law bytes as float32 in [-1, 1]."""
    code = np.frombuffer(data, dtype=np.uint8).astype(np.int32) ^ 0x55
    segment = (code & 0x70) >> 4
    value = ((code & 0x0F) << 4) + np.where(segment == 0, 8, 0x108)
    value = np.where(segment > 1, value << np.maximum(segment - 1, 0), value)
    return (np.where(code & 0x80, value, -value) / 32768.0).astype(np.float32)


def encode(audio: Audio, response_format: str, *, sample_rate: int = SPEECH_SAMPLE_RATE) -> tuple[bytes, str]:
    """``audio`` resampled to ``sample_rate`` and encoded as ``response_format`` (a name in FORMATS): the bytes and
    their media type."""
    if response_format not in FORMATS:
        raise ConfigError(f"response_format: {response_format!r} is not valid; choose one of {', '.join(FORMATS)}")
    media_type, arguments = FORMATS[response_format]
    audio = resample(audio, sample_rate)
    if response_format == "wav":
        return wav_bytes(audio), media_type
    if response_format == "pcm":
        return pcm16(audio.samples), media_type
    assert arguments is not None
    return _ffmpeg(pcm16(audio.samples), sample_rate, arguments, response_format), media_type


def _ffmpeg(pcm: bytes, sample_rate: int, arguments: tuple[str, ...], response_format: str) -> bytes:
    from assistant.audio import FFMPEG_MISSING, tool_path

    try:
        program = tool_path("ffmpeg")
    except AudioDecodeError:
        raise OutputError(f"{response_format} output needs {FFMPEG_MISSING}; or ask for wav or pcm") from None
    # into a file, not a pipe: ffmpeg seeks back to complete the headers (FLAC's length, the MP3 Xing frame)
    with tempfile.TemporaryDirectory(prefix="assistant-speech-") as folder:
        target = Path(folder) / f"speech.{response_format}"
        command = [program, "-nostdin", "-hide_banner", "-loglevel", "error", "-f", "s16le", "-ar", str(sample_rate),
                   "-ac", "1", "-i", "pipe:0", *arguments, str(target)]  # fmt: skip
        try:
            result = subprocess.run(command, input=pcm, capture_output=True, timeout=ENCODE_TIMEOUT_S, check=False)
        except subprocess.TimeoutExpired:
            raise OutputError(f"ffmpeg took over {ENCODE_TIMEOUT_S:g} s to encode {response_format}") from None
        data = target.read_bytes() if result.returncode == 0 and target.is_file() else b""
    if not data:
        reason = result.stderr.decode("utf-8", "replace").strip()[-300:] or f"exit code {result.returncode}"
        raise OutputError(
            f"ffmpeg cannot encode {response_format} ({reason}); install an ffmpeg built with that encoder, or ask "
            "for wav or pcm"
        )
    return data
