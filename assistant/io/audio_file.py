"""Decode any file ffmpeg reads (audio or video) to 16 kHz mono float32, streamed in pieces.

pydub finds the ffmpeg and ffprobe programs (honouring its own overrides) but its ``AudioSegment.from_file`` holds
the whole decoded file as 16-bit PCM at the source rate in memory, several times the size we need for a long
recording. So the decode runs ffmpeg directly and reads its stdout a piece at a time: memory stays bounded by
the piece size whatever the file's length.
"""

from __future__ import annotations

import collections
import json
import signal
import subprocess
import threading
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from assistant.audio import tool_path
from assistant.config import InputConfig
from assistant.errors import AudioDecodeError
from assistant.messages import SAMPLE_RATE, Audio, EndOfRecording

_BYTES_PER_SAMPLE = 4  # float32
_STDERR_LINES_KEPT = 20
_LIVE_PIECE_S = 0.1  # seconds per piece when files are played in as speech


@dataclass(frozen=True)
class AudioInfo:
    path: Path
    duration_s: float | None  # None when the container does not say
    codec: str
    source_rate: int
    channels: int


def probe(path: str | Path) -> AudioInfo:
    """Check that ``path`` holds an audio stream ffmpeg can read; raises AudioDecodeError naming the problem."""
    path = Path(path)
    _check_file(path)
    try:
        result = subprocess.run(
            [tool_path("ffprobe"), "-v", "error", "-of", "json", "-show_format", "-show_streams", str(path)],
            capture_output=True,
            timeout=60,
            check=False,
        )
    except subprocess.TimeoutExpired:
        raise AudioDecodeError(f"cannot read '{path}': ffprobe took over 60 s; is it on a stalled mount?") from None
    if result.returncode != 0:
        reason = _last_line(result.stderr) or f"ffprobe exit code {result.returncode}"
        raise AudioDecodeError(
            f"cannot read '{path}': ffmpeg does not recognise it as audio or video ({reason}); check that the "
            "file is not truncated or mislabelled"
        )
    info = json.loads(result.stdout or b"{}")
    audio_streams = [s for s in info.get("streams", []) if s.get("codec_type") == "audio"]
    if not audio_streams:
        kinds = sorted({s.get("codec_type", "unknown") for s in info.get("streams", [])}) or ["no streams"]
        raise AudioDecodeError(f"'{path}' has no audio stream (it holds {', '.join(kinds)}); give a file with sound")
    stream = audio_streams[0]
    duration = stream.get("duration") or info.get("format", {}).get("duration")
    return AudioInfo(
        path=path,
        duration_s=float(duration) if duration not in (None, "N/A") else None,
        codec=str(stream.get("codec_name", "unknown")),
        source_rate=int(stream.get("sample_rate", 0) or 0),
        channels=int(stream.get("channels", 0) or 0),
    )


def _check_file(path: Path) -> None:
    if not path.exists():
        raise AudioDecodeError(f"cannot read '{path}': no such file")
    if not path.is_file():
        raise AudioDecodeError(f"cannot read '{path}': not a regular file")
    if path.stat().st_size == 0:
        raise AudioDecodeError(f"cannot read '{path}': the file is empty (0 bytes)")


def stream_audio(path: str | Path, *, piece_s: float = 30.0, sample_rate: int = SAMPLE_RATE) -> Iterator[Audio]:
    """Yield the file's first audio stream as consecutive mono float32 pieces of ``piece_s`` seconds."""
    path = Path(path)
    _check_file(path)
    command = [
        tool_path("ffmpeg"), "-nostdin", "-hide_banner", "-loglevel", "error", "-threads", "0",
        "-i", str(path), "-map", "0:a:0", "-vn", "-sn", "-dn",
        "-ac", "1", "-ar", str(sample_rate), "-f", "f32le", "-",
    ]  # fmt: skip
    process = subprocess.Popen(command, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    assert process.stdout is not None and process.stderr is not None
    errors: collections.deque[bytes] = collections.deque(maxlen=_STDERR_LINES_KEPT)
    drain = threading.Thread(target=lambda: errors.extend(process.stderr), daemon=True)  # type: ignore[arg-type]
    drain.start()
    piece_bytes = int(piece_s * sample_rate) * _BYTES_PER_SAMPLE
    position = 0
    try:
        while True:
            data = _read_exactly(process.stdout, piece_bytes)
            if not data:
                break
            samples = np.frombuffer(data[: len(data) - len(data) % _BYTES_PER_SAMPLE], dtype=np.float32)
            yield Audio(samples, sample_rate, position / sample_rate)
            position += len(samples)
        code = process.wait()
        drain.join(timeout=5)
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()
        process.stdout.close()
    if code < 0:
        raise AudioDecodeError(
            f"decoding '{path}' stopped after {position / sample_rate:.1f} s: ffmpeg was killed by "
            f"{signal.Signals(-code).name} (from outside, or for lack of memory); try again"
        )
    if code != 0:
        reason = _last_line(b"".join(errors)) or f"ffmpeg exit code {code}"
        raise AudioDecodeError(f"decoding '{path}' failed after {position / sample_rate:.1f} s: {reason}")
    if position == 0:
        raise AudioDecodeError(f"'{path}' decoded to no audio samples; the audio stream is empty")


def load_audio(path: str | Path, *, sample_rate: int = SAMPLE_RATE) -> Audio:
    """The whole file at once (short clips; long recordings should go through ``stream_audio``)."""
    pieces = [piece.samples for piece in stream_audio(path, sample_rate=sample_rate)]
    return Audio(np.concatenate(pieces), sample_rate)


def _read_exactly(stream: object, size: int) -> bytes:
    chunks = []
    remaining = size
    while remaining:
        chunk = stream.read(remaining)  # type: ignore[attr-defined]
        if not chunk:
            break
        chunks.append(chunk)
        remaining -= len(chunk)
    return b"".join(chunks)


def _last_line(stderr: bytes) -> str:
    lines = [line.strip() for line in stderr.decode("utf-8", "replace").splitlines() if line.strip()]
    return lines[-1][:200] if lines else ""


class FileSource:
    """Audio files played in as if spoken: each file (or each VAD utterance of a long one) is a turn."""

    def __init__(self, config: InputConfig, paths: Sequence[str | Path]) -> None:
        self.live = config.realtime
        self._paths = [Path(p) for p in paths]
        self._closed = False

    def chunks(self) -> Iterator[np.ndarray | EndOfRecording | Exception]:
        for path in self._paths:
            started = time.monotonic()
            played_s = 0.0
            try:
                for piece in stream_audio(path, piece_s=_LIVE_PIECE_S):
                    if self._closed:
                        return
                    if self.live:  # speaking pace: a piece is ready only once it has "been said"
                        played_s += piece.duration_s
                        time.sleep(max(0.0, started + played_s - time.monotonic()))
                    yield piece.samples
            except AudioDecodeError as exc:
                yield exc
            yield EndOfRecording(str(path))

    def close(self) -> None:
        self._closed = True
