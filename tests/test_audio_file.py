import os
import tracemalloc

import numpy as np
import pytest

from assistant.audio.decode import load_audio, probe, stream_audio
from assistant.errors import AudioDecodeError
from tests.conftest import ffmpeg_generate, tone, write_wav

SINE = ["-f", "lavfi", "-i", "sine=frequency=440:sample_rate=44100:duration=3"]


@pytest.mark.parametrize(
    "suffix,codec",
    [(".wav", []), (".mp3", []), (".m4a", ["-c:a", "aac"]), (".flac", []), (".ogg", ["-c:a", "libvorbis"]),
     (".opus", ["-c:a", "libopus"]), (".webm", ["-c:a", "libopus"])],
)  # fmt: skip
def test_decodes_common_formats_to_16k_mono_float32(tmp_path, suffix, codec):
    path = ffmpeg_generate(tmp_path / f"a{suffix}", *SINE, "-ac", "2", *codec)
    audio = load_audio(path)
    assert audio.sample_rate == 16000
    assert audio.samples.dtype == np.float32 and audio.samples.ndim == 1
    assert abs(audio.duration_s - 3.0) < 0.1
    assert 0.05 < np.abs(audio.samples).max() <= 1.0


def test_video_file_audio_track(tmp_path):
    path = ffmpeg_generate(
        tmp_path / "v.mkv", "-f", "lavfi", "-i", "testsrc=duration=2:size=64x64:rate=5", *SINE, "-shortest"
    )
    assert abs(load_audio(path).duration_s - 2.0) < 0.2
    assert probe(path).duration_s is not None


def test_video_without_audio_says_so(tmp_path):
    path = ffmpeg_generate(tmp_path / "silent.mp4", "-f", "lavfi", "-i", "testsrc=duration=1:size=64x64:rate=5")
    with pytest.raises(AudioDecodeError, match="has no audio stream .*video"):
        probe(path)


def test_empty_file(tmp_path):
    path = tmp_path / "empty.wav"
    path.write_bytes(b"")
    with pytest.raises(AudioDecodeError, match="the file is empty"):
        probe(path)


def test_text_named_wav(tmp_path):
    path = tmp_path / "notes.wav"
    path.write_text("this is not audio\n" * 50)
    with pytest.raises(AudioDecodeError, match="does not recognise it as audio"):
        probe(path)


def test_corrupt_file(tmp_path):
    good = ffmpeg_generate(tmp_path / "good.mp3", *SINE)
    corrupt = tmp_path / "corrupt.mp3"
    corrupt.write_bytes(os.urandom(len(good.read_bytes())))
    with pytest.raises(AudioDecodeError, match="corrupt.mp3"):
        probe(corrupt)


def test_missing_file(tmp_path):
    with pytest.raises(AudioDecodeError, match="no such file"):
        probe(tmp_path / "nope.wav")


def test_ffmpeg_missing_names_the_fix(tmp_path, monkeypatch):
    path = write_wav(tmp_path / "a.wav", tone(1))
    monkeypatch.setenv("PATH", str(tmp_path))
    with pytest.raises(AudioDecodeError, match="ffmpeg not found; install it with 'apt-get install ffmpeg'"):
        load_audio(path)


def test_streaming_keeps_memory_bounded(tmp_path):
    """Ten minutes of 44.1 kHz stereo decode piece by piece: memory stays at a few pieces, not the file."""
    path = ffmpeg_generate(
        tmp_path / "long.flac", "-f", "lavfi", "-i", "sine=frequency=300:sample_rate=44100:duration=600", "-ac", "2"
    )
    tracemalloc.start()
    total = 0.0
    for piece in stream_audio(path, piece_s=30):
        assert piece.duration_s <= 30.0
        total += piece.duration_s
    _current, peak = tracemalloc.get_traced_memory()
    tracemalloc.stop()
    assert abs(total - 600) < 0.5
    whole_file = 600 * 16000 * 4
    assert peak < whole_file / 5, f"peak {peak / 1e6:.1f} MB while the decoded file is {whole_file / 1e6:.0f} MB"
