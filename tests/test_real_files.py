"""Files as people have them (issue "Real files as people have them"): each built at test time with ffmpeg and
espeak-ng the way ``shared/cases/real-files.sh`` builds it, transcribed by the real whisper-base through the default
pipeline, with the right value asserted."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import numpy as np
import pytest

from assistant.audio.decode import AudioSource, choose_source, load_audio, probe
from assistant.cli import main
from assistant.config import AsrConfig, TranscribeConfig, VadConfig
from assistant.models import OFFLINE_BUNDLES, bundle_status
from assistant.pipeline import TranscriptionPipeline
from tests.conftest import require, require_tool, speak, write_wav
from tests.test_real_asr import similarity

pytestmark = pytest.mark.real_model
FOX = "The quick brown fox jumps over the lazy dog."
CALL = "Please call me back tomorrow morning."


def ffmpeg(*args: str) -> None:
    subprocess.run([require_tool("ffmpeg"), "-y", "-loglevel", "error", *args], check=True)


@pytest.fixture(scope="module")
def kit(tmp_path_factory) -> Path:
    require(bundle_status(OFFLINE_BUNDLES["whisper-base"]) != "not installed", "offline whisper-base not installed")
    folder = tmp_path_factory.mktemp("real")
    fox, call = speak(FOX, folder / "fox.wav"), speak(CALL, folder / "call.wav")
    ffmpeg("-f", "lavfi", "-i", "color=c=black:s=160x120:r=25:d=8", "-itsoffset", "4", "-i", str(fox),
           "-map", "0:v", "-map", "1:a", "-c:v", "libx264", "-c:a", "aac", str(folder / "late-audio.mkv"))  # fmt: skip
    ffmpeg("-f", "lavfi", "-i", "anullsrc=r=48000:cl=stereo", "-i", str(fox), "-map", "0:a", "-map", "1:a",
           "-t", "3", "-c:a", "aac", str(folder / "two-tracks.mkv"))  # fmt: skip
    ffmpeg("-i", str(fox), "-f", "lavfi", "-i", "anullsrc=r=16000:cl=mono:d=15", "-i", str(call), "-filter_complex",
           "[0:a][1:a][2:a]concat=n=3:v=0:a=1", str(folder / "long-pause.wav"))  # fmt: skip
    for db in (40, 50):
        ffmpeg("-i", str(fox), "-af", f"volume=-{db}dB", str(folder / f"quiet-{db}db.wav"))
    speech = load_audio(fox).samples
    opposite = np.stack([speech, -speech], axis=1)  # a mix of these channels is silence
    write_wav(folder / "opposite-phase.wav", opposite)
    noise = np.random.default_rng(0).normal(0, 0.3, len(speech)).astype(np.float32)
    write_wav(folder / "speech-left-noise-right.wav", np.stack([speech, np.clip(noise, -1, 1)], axis=1))
    ffmpeg("-i", str(fox), "-c:a", "aac", "-movflags", "+faststart", str(folder / "whole.m4a"))
    data = (folder / "whole.m4a").read_bytes()
    (folder / "truncated.m4a").write_bytes(data[: len(data) // 2])  # an interrupted download
    return folder


@pytest.fixture(scope="module")
def pipeline(kit) -> TranscriptionPipeline:
    return TranscriptionPipeline.from_config_parts(AsrConfig(), VadConfig(), TranscribeConfig())


def test_times_are_the_players_when_the_audio_starts_late(kit, pipeline):
    assert probe(kit / "late-audio.mkv").tracks[0].start_s == pytest.approx(3.95, abs=0.05)
    samples = load_audio(kit / "late-audio.mkv").samples
    assert not np.any(samples[: int(3.9 * 16000)]), "the decoded audio is silent until the player plays sound"
    result = pipeline.transcribe_file(kit / "late-audio.mkv")
    first = result.transcript.segments[0]
    assert 3.6 <= first.start_s <= 4.3, first
    assert similarity(result.transcript.text, FOX) >= 0.75


def test_the_track_that_holds_the_speech_is_chosen_and_recorded(kit, pipeline, tmp_path, capsys):
    result = pipeline.transcribe_file(kit / "two-tracks.mkv")
    assert result.source.track == 1 and similarity(result.transcript.text, FOX) >= 0.75
    code = main(["transcribe", str(kit / "two-tracks.mkv"), "--format", "json", "--output-dir", str(tmp_path),
                 "--quiet"])  # fmt: skip
    assert code == 0 and json.loads((tmp_path / "two-tracks.json").read_text())["audio_track"] == 1


def test_an_empty_track_chosen_by_hand_says_there_are_others(kit, tmp_path, capsys):
    code = main(["transcribe", str(kit / "two-tracks.mkv"), "--audio-track", "0", "--output-dir", str(tmp_path),
                 "--quiet"])  # fmt: skip
    err = capsys.readouterr().err
    assert code == 0 and "no speech was recognised in track 0" in err and "2 audio tracks" in err
    assert main(["transcribe", str(kit / "two-tracks.mkv"), "--audio-track", "7", "--quiet"]) == 1
    assert "there is no audio track 7" in capsys.readouterr().err


def test_channels_that_cancel_in_a_mix_are_not_mixed(kit, pipeline):
    info = probe(kit / "opposite-phase.wav")
    assert choose_source(info, pipeline._speech_seconds).channel is not None
    result = pipeline.transcribe_file(kit / "opposite-phase.wav")
    assert similarity(result.transcript.text, FOX) >= 0.75


def test_no_cue_over_a_long_pause(kit, pipeline):
    segments = pipeline.transcribe_file(kit / "long-pause.wav").transcript.segments
    fox, call = load_audio(kit / "fox.wav").samples, load_audio(kit / "call.wav").samples
    fox_end = len(fox) / 16000 - float(np.argmax(np.abs(fox[::-1]) > 0.02)) / 16000
    call_onset = len(fox) / 16000 + 15 + float(np.argmax(np.abs(call) > 0.02)) / 16000
    assert segments[0].end_s <= fox_end + 0.5, segments
    second = next(s for s in segments if "call" in s.text.lower())
    assert call_onset - 0.5 <= second.start_s <= call_onset + 0.3, (call_onset, segments)
    assert all(not (s.start_s < 10 < s.end_s) for s in segments), "nothing on screen in the middle of the pause"


@pytest.mark.parametrize("db,least", [(40, 0.85), (50, 5 / 7)])
def test_quiet_recordings_are_heard(kit, pipeline, db, least):
    content = {"quick", "brown", "fox", "jumps", "over", "lazy", "dog"}
    heard = set(pipeline.transcribe_file(kit / f"quiet-{db}db.wav").transcript.text.lower().replace(".", "").split())
    assert len(content & heard) / len(content) >= least, heard


def test_a_mono_single_track_file_is_decoded_without_listening_first(kit):
    calls = []
    source = choose_source(probe(kit / "fox.wav"), lambda audio: calls.append(audio) or 0.0)
    assert source == AudioSource() and calls == []


def test_no_cue_over_a_long_pause_without_the_vad(kit):
    """Without a VAD, Whisper's own segment runs over the pause (0 -> 18 s); its words say where the speech ends."""
    pipeline = TranscriptionPipeline.from_config_parts(AsrConfig(), VadConfig(enabled=False), TranscribeConfig())
    segments = pipeline.transcribe_file(kit / "long-pause.wav").transcript.segments
    fox = load_audio(kit / "fox.wav").samples
    assert segments and segments[0].end_s <= len(fox) / 16000 + 0.5, segments
    assert all(not segment.words for segment in segments), "words were only used to place the segments"


def test_the_clearest_channel_is_used_when_the_other_is_noise(kit, pipeline):
    """A microphone on the left, loud noise on the right: the mix still sounds like speech to the VAD, but Whisper
    cannot read it; the channel that stands clear of its noise floor is used."""
    result = pipeline.transcribe_file(kit / "speech-left-noise-right.wav")
    assert result.source.channel == 0 and similarity(result.transcript.text, FOX) >= 0.75


def test_a_channel_can_be_chosen_and_a_missing_one_is_named(kit, tmp_path, capsys):
    args = ["transcribe", str(kit / "speech-left-noise-right.wav"), "--format", "json", "--output-dir", str(tmp_path),
            "--quiet"]  # fmt: skip
    assert main([*args, "--audio-channel", "1"]) == 0
    assert json.loads((tmp_path / "speech-left-noise-right.json").read_text())["audio_channel"] == 1
    assert "track 0 has 2 channels: choose another" in capsys.readouterr().err, "the noise channel held nothing"
    assert main([*args, "--audio-track", "0", "--audio-channel", "5"]) == 1
    assert "there is no channel 5" in capsys.readouterr().err
    assert main(["transcribe", str(kit / "fox.wav"), "--audio-channel", "1", "--quiet"]) == 1
    assert "has 1 channel(s); there is no channel 1" in capsys.readouterr().err


def test_a_truncated_file_says_so(kit, pipeline):
    result = pipeline.transcribe_file(kit / "truncated.m4a")
    assert any("truncated" in warning for warning in result.warnings), result.warnings
    assert not pipeline.transcribe_file(kit / "whole.m4a").warnings
