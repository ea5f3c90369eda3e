"""Decode any file ffmpeg reads (audio or video) to 16 kHz mono float32, streamed in pieces, on the player's clock,
from the track and channel that hold the speech.

pydub finds the ffmpeg and ffprobe programs (honouring its own overrides) but its ``AudioSegment.from_file`` holds
the whole decoded file as 16-bit PCM at the source rate in memory, several times the size we need for a long
recording. So the decode runs ffmpeg directly and reads its stdout a piece at a time: memory stays bounded by
the piece size whatever the file's length.

Times are the player's times: sample ``n`` of the output plays ``n / 16000`` seconds after the file's start, as a
player (mpv, VLC, a browser) shows it. ffmpeg already measures timestamps from the file's start; ``aresample``'s
``async=1:first_pts=0`` then pads an audio stream that starts late (an MKV whose audio starts 3.95 s after the video)
with silence and fills timestamp gaps, so that positions in the decoded samples are presentation times.
"""

from __future__ import annotations

import collections
import json
import signal
import subprocess
import threading
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from assistant.audio import tool_path
from assistant.audio.level import frame_levels
from assistant.errors import AudioDecodeError
from assistant.messages import SAMPLE_RATE, Audio

_BYTES_PER_SAMPLE = 4  # float32
_STDERR_LINES_KEPT = 20
PLAYER_CLOCK = "aresample=async=1:first_pts=0"  # pad a late start, fill gaps: sample positions = presentation times
EXCERPT_S = 20.0  # length of each excerpt listened to when choosing a track or channel
EXCERPTS = 3  # excerpts per track: the start, the middle and the end of the file
MAX_CHANNELS_COMPARED = 8
SAME_CHANNELS_CORRELATION = 0.98  # channels this alike are one signal: the mix is the speech
SPEECH_SHARE = 0.8  # candidates holding at least this share of the most speech found are compared by contrast
MIX_PREFERENCE_DB = 3.0  # a single channel is used only when it is this much clearer than the mix


@dataclass(frozen=True)
class AudioTrack:
    """One audio stream of a file. ``index`` counts audio streams only (ffmpeg's ``0:a:N``, ``--audio-track N``);
    ``start_s`` is when it starts playing, in seconds from the file's start."""

    index: int
    codec: str
    source_rate: int
    channels: int
    start_s: float
    duration_s: float | None = None  # what the container declares for this stream, when it does


@dataclass(frozen=True)
class AudioInfo:
    path: Path
    duration_s: float | None  # None when the container does not say
    tracks: tuple[AudioTrack, ...]

    @property
    def declared_s(self) -> float:
        """Seconds of audio the container declares: the end of its longest track (0.0 when it declares none)."""
        ends = (t.start_s + (t.duration_s or 0.0) for t in self.tracks)
        return max(max(ends, default=0.0), self.duration_s or 0.0)


@dataclass(frozen=True)
class AudioSource:
    """What is decoded: an audio track, and either its mix (``channel`` None) or one channel. ``others`` says whether
    the file has other tracks or channels that differ (an empty transcript then names them)."""

    track: int = 0
    channel: int | None = None
    others: str = ""

    @property
    def label(self) -> str:
        return f"track {self.track}" + (f", channel {self.channel}" if self.channel is not None else "")


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
    streams = info.get("streams", [])
    audio_streams = [s for s in streams if s.get("codec_type") == "audio"]
    if not audio_streams:
        kinds = sorted({s.get("codec_type", "unknown") for s in streams}) or ["no streams"]
        raise AudioDecodeError(f"'{path}' has no audio stream (it holds {', '.join(kinds)}); give a file with sound")
    file_start = _seconds(info.get("format", {}).get("start_time")) or 0.0
    tracks = tuple(_track(index, stream, file_start) for index, stream in enumerate(audio_streams))
    duration = _seconds(info.get("format", {}).get("duration")) or _seconds(audio_streams[0].get("duration"))
    return AudioInfo(path=path, duration_s=duration, tracks=tracks)


def _track(index: int, stream: dict, file_start: float) -> AudioTrack:
    return AudioTrack(
        index=index,
        codec=str(stream.get("codec_name", "unknown")),
        source_rate=int(stream.get("sample_rate", 0) or 0),
        channels=int(stream.get("channels", 0) or 0),
        start_s=round(max(0.0, (_seconds(stream.get("start_time")) or file_start) - file_start), 3),
        duration_s=_seconds(stream.get("duration")),
    )


def _seconds(value: object) -> float | None:
    try:
        return float(value) if value not in (None, "N/A") else None  # type: ignore[arg-type]
    except (TypeError, ValueError):
        return None


def _check_file(path: Path) -> None:
    if not path.exists():
        raise AudioDecodeError(f"cannot read '{path}': no such file")
    if not path.is_file():
        raise AudioDecodeError(f"cannot read '{path}': not a regular file")
    if path.stat().st_size == 0:
        raise AudioDecodeError(f"cannot read '{path}': the file is empty (0 bytes)")


@dataclass(frozen=True)
class Heard:
    """What listening to an excerpt found: seconds of speech (the VAD's) and how far its loud frames stand above its
    noise floor (dB): clean speech stands far above, noise or speech drowned in a noisy mix does not."""

    speech_s: float
    contrast_db: float


def choose_source(
    info: AudioInfo,
    speech_s: Callable[[Audio], float],
    *,
    track: int | None = None,
    channel: int | None = None,
) -> AudioSource:
    """The track and channel that hold the speech.

    Rule: with ``track`` given, that track; otherwise the track whose excerpts (the start, middle and end of the file,
    20 s each) hold the most speech by ``speech_s`` (seconds of speech in an Audio: the VAD), the first on a tie or
    when none holds any. Within the track, with ``channel`` given, that channel; otherwise, of the mix and each
    channel, those holding at least 80 % of the most speech found are compared by contrast (loud frames over the
    noise floor) and the clearest is used, the mix unless a channel is clearer by 3 dB: a microphone on the left and
    music or noise on the right gives the left channel, channels in opposite phase (which cancel in a mix) give one
    of them, two speakers on two channels give the mix. Channels that carry the same signal are simply mixed, and a
    mono file with one track is decoded as it is, without listening first.
    """
    _check_track(info, track)
    candidates = [info.tracks[track]] if track is not None else list(info.tracks)
    if len(candidates) == 1 and (candidates[0].channels <= 1 or channel is not None):
        only = candidates[0]
        _check_channel(info, only, channel)
        others = _other_tracks(info, only.index)
        if channel is not None:  # chosen by hand: the others are named without listening to them
            others = "; ".join(filter(None, [others, f"track {only.index} has {only.channels} channels"]))
        return AudioSource(only.index, channel, others)
    heard = [(candidate, _listen(info, candidate, speech_s)) for candidate in candidates]
    best, (found, differ) = max(heard, key=lambda item: (max(h.speech_s for h in item[1][0].values()),
                                                         -item[0].index))  # fmt: skip
    others = _other_tracks(info, best.index)
    if differ:
        others = "; ".join(filter(None, [others, f"the {best.channels} channels of track {best.index} differ"]))
    _check_channel(info, best, channel)
    return AudioSource(best.index, channel if channel is not None else _clearest(found), others)


def _check_track(info: AudioInfo, track: int | None) -> None:
    if track is not None and not 0 <= track < len(info.tracks):
        raise AudioDecodeError(
            f"'{info.path}' has {len(info.tracks)} audio track(s) (0 to {len(info.tracks) - 1}); "
            f"there is no audio track {track}: use --audio-track / transcribe.audio_track with one of those"
        )


def _check_channel(info: AudioInfo, track: AudioTrack, channel: int | None) -> None:
    if channel is not None and channel >= max(1, track.channels):
        raise AudioDecodeError(
            f"audio track {track.index} of '{info.path}' has {track.channels} channel(s); there is no channel "
            f"{channel}: use --audio-channel / transcribe.audio_channel from 0 to {max(1, track.channels) - 1}, or "
            "leave it out to pick the clearest"
        )


def _clearest(found: dict[int | None, Heard]) -> int | None:
    most = max(h.speech_s for h in found.values())
    if most <= 0:
        return None
    eligible = {key: h for key, h in found.items() if h.speech_s >= SPEECH_SHARE * most}
    return max(eligible, key=lambda key: eligible[key].contrast_db + (MIX_PREFERENCE_DB if key is None else 0.0))


def _other_tracks(info: AudioInfo, chosen: int) -> str:
    return f"the file has {len(info.tracks)} audio tracks (0 to {len(info.tracks) - 1})" if len(info.tracks) > 1 else ""


def _listen(
    info: AudioInfo, track: AudioTrack, speech_s: Callable[[Audio], float]
) -> tuple[dict[int | None, Heard], bool]:
    """What the excerpts of one track hold: its mix (key None) and each channel; and whether its channels differ."""
    frames = _excerpts(info, track)
    if frames.size == 0:
        return {None: Heard(0.0, 0.0)}, False
    found: dict[int | None, Heard] = {None: _hear(frames.mean(axis=1), speech_s)}
    channels = frames[:, :MAX_CHANNELS_COMPARED]
    if channels.shape[1] < 2 or _alike(channels):
        return found, False
    for channel in range(channels.shape[1]):
        found[channel] = _hear(np.ascontiguousarray(channels[:, channel]), speech_s)
    return found, True


def _hear(samples: np.ndarray, speech_s: Callable[[Audio], float]) -> Heard:
    levels = frame_levels(samples)
    contrast = float(np.percentile(levels, 95) - np.percentile(levels, 10)) if levels.size else 0.0
    return Heard(speech_s(Audio(samples)), contrast)


def _alike(channels: np.ndarray) -> bool:
    """Whether every channel carries the same signal (the usual stereo of a mono recording)."""
    first = channels[:, 0]
    for index in range(1, channels.shape[1]):
        other = channels[:, index]
        if not np.any(first) and not np.any(other):
            continue
        if not np.any(first) or not np.any(other):
            return False
        if np.corrcoef(first, other)[0, 1] < SAME_CHANNELS_CORRELATION:
            return False
    return True


def _excerpts(info: AudioInfo, track: AudioTrack) -> np.ndarray:
    """(samples, channels) float32 at 16 kHz: the excerpts of one track, one after another."""
    duration = info.duration_s or EXCERPT_S
    starts = sorted({max(0.0, round(at, 1)) for at in (0.0, duration / 2 - EXCERPT_S / 2, duration - EXCERPT_S)})
    starts = starts[:EXCERPTS] if duration > EXCERPT_S else [0.0]
    inputs: list[str] = []
    for start in starts:
        inputs += ["-ss", str(start), "-t", str(EXCERPT_S), "-i", str(info.path)]
    labels = "".join(f"[{n}:a:{track.index}]" for n in range(len(starts)))
    channels = max(1, track.channels)
    command = [
        tool_path("ffmpeg"), "-nostdin", "-hide_banner", "-loglevel", "error", *inputs,
        "-filter_complex", f"{labels}concat=n={len(starts)}:v=0:a=1[out]", "-map", "[out]",
        "-ac", str(channels), "-ar", str(SAMPLE_RATE), "-f", "f32le", "-",
    ]  # fmt: skip
    result = subprocess.run(command, capture_output=True, timeout=120, check=False)
    if result.returncode != 0:
        reason = _last_line(result.stderr) or f"ffmpeg exit code {result.returncode}"
        raise AudioDecodeError(f"cannot read audio track {track.index} of '{info.path}': {reason}")
    samples = np.frombuffer(result.stdout[: len(result.stdout) // (4 * channels) * 4 * channels], np.float32)
    return samples.reshape(-1, channels)


def stream_audio(
    path: str | Path,
    *,
    source: AudioSource | None = None,
    piece_s: float = 30.0,
    sample_rate: int = SAMPLE_RATE,
) -> Iterator[Audio]:
    """Yield one audio track (default: the first; its mix or one channel) as consecutive mono float32 pieces of
    ``piece_s`` seconds on the player's clock (see the module's docstring)."""
    path = Path(path)
    _check_file(path)
    source = source or AudioSource()
    pick = f"pan=mono|c0=c{source.channel}," if source.channel is not None else ""
    command = [
        tool_path("ffmpeg"), "-nostdin", "-hide_banner", "-loglevel", "error", "-threads", "0",
        "-i", str(path), "-map", f"0:a:{source.track}", "-vn", "-sn", "-dn", "-af", pick + PLAYER_CLOCK,
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


def load_audio(path: str | Path, *, sample_rate: int = SAMPLE_RATE, source: AudioSource | None = None) -> Audio:
    """The whole file at once (short clips; long recordings should go through ``stream_audio``)."""
    pieces = [piece.samples for piece in stream_audio(path, source=source, sample_rate=sample_rate)]
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
