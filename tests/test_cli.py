"""The `assistant` command as users run it: a subprocess, real files, the offline model."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from assistant.cli import expand_inputs
from assistant.models import OFFLINE_BUNDLES, bundle_status
from tests.conftest import ffmpeg_generate, require, speak


def run(*args: str, cwd=None) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "assistant", *args], capture_output=True, text=True, timeout=300, cwd=cwd
    )


def test_expand_inputs_directories_globs_and_missing(tmp_path):
    (tmp_path / "sub").mkdir()
    for name in ("a.wav", "b.MP3", "sub/c.m4a", "notes.txt"):
        (tmp_path / name).write_bytes(b"x")
    found, problems = expand_inputs([str(tmp_path), str(tmp_path / "*.wav"), str(tmp_path / "nothing*.flac")])
    assert sorted(p.name for p in found) == ["a.wav", "b.MP3", "c.m4a"]
    assert problems == [f"audio-decode: cannot read '{tmp_path / 'nothing*.flac'}': no such file, directory or "
                        "matching pattern"]  # fmt: skip


def test_unknown_config_key_is_one_line_and_exit_2(tmp_path):
    config = tmp_path / "c.yaml"
    config.write_text("asr:\n  beam: 5\n")
    result = run("transcribe", "x.wav", "--config", str(config))
    assert result.returncode == 2
    assert result.stderr.strip().splitlines() == [
        "config: unknown key asr.beam; valid keys in asr: " + result.stderr.split("valid keys in asr: ")[1].strip()
    ]


def test_print_config_shows_overrides():
    result = run("transcribe", "x.wav", "--language", "zh", "--set", "asr.beam_size=5", "--print-config")
    config = json.loads(result.stdout)
    assert config["asr"]["language"] == "zh" and config["asr"]["beam_size"] == 5


def test_unknown_local_model_is_one_line(tmp_path):
    (tmp_path / "a.wav").write_bytes(b"RIFF")
    result = run("transcribe", str(tmp_path / "a.wav"), "--model", "./no/such/model")
    assert result.returncode == 2
    assert "model path './no/such/model' does not exist" in result.stderr


@pytest.mark.real_model
def test_batch_with_bad_files_completes_the_rest(tmp_path):
    require(bundle_status(OFFLINE_BUNDLES["whisper-base"]) != "not installed", "offline whisper-base not installed")
    good_wav = speak("Please send the report to the finance team by Friday.", tmp_path / "good.wav")
    good_m4a = ffmpeg_generate(tmp_path / "voice.m4a", "-i", str(good_wav), "-c:a", "aac")
    (tmp_path / "empty.wav").write_bytes(b"")
    (tmp_path / "text.wav").write_text("not audio at all\n" * 20)
    ffmpeg_generate(tmp_path / "mute.mp4", "-f", "lavfi", "-i", "testsrc=duration=1:size=64x64:rate=5")
    out = tmp_path / "out"
    result = run(
        "transcribe", str(good_m4a), str(tmp_path / "empty.wav"), str(tmp_path / "text.wav"),
        str(tmp_path / "mute.mp4"), str(tmp_path / "missing.ogg"),
        "--format", "txt,srt,vtt,json,tsv", "--output-dir", str(out), "--quiet",
    )  # fmt: skip
    assert result.returncode == 1, result.stderr
    errors = [line for line in result.stderr.splitlines() if line.startswith("audio-decode:")]
    assert len(errors) == 4, result.stderr
    for name, reason in [("empty.wav", "empty"), ("text.wav", "does not recognise"), ("mute.mp4", "no audio stream"),
                         ("missing.ogg", "no such file")]:  # fmt: skip
        assert any(name in line and reason in line for line in errors), (name, result.stderr)
    assert "4 of 5 inputs failed" in result.stderr
    assert sorted(p.name for p in out.iterdir()) == [f"voice.{f}" for f in sorted(["txt", "srt", "vtt", "json", "tsv"])]
    document = json.loads((out / "voice.json").read_text())
    assert document["language"] == "en"
    assert "finance team" in document["text"].lower()
    assert document["model"].startswith("faster-whisper whisper-base")
    assert set(document["timings"]) == {"decode_s", "vad_s", "asr_s", "total_s"}
    assert (out / "voice.srt").read_text().startswith("1\n00:00:0")


@pytest.mark.real_model
def test_outputs_land_next_to_the_input_by_default(tmp_path):
    require(bundle_status(OFFLINE_BUNDLES["whisper-base"]) != "not installed", "offline whisper-base not installed")
    clip = speak("Thank you all for coming to this meeting.", tmp_path / "meeting.wav")
    result = run("transcribe", str(clip), "--language", "en", "--quiet")
    assert result.returncode == 0, result.stderr
    assert "meeting" in (tmp_path / "meeting.txt").read_text().lower()
    assert (tmp_path / "meeting.srt").is_file()


def test_models_lists_the_offline_bundles():
    result = run("models")
    assert result.returncode == 0
    assert result.stdout.startswith("whisper-base")


@pytest.mark.parametrize(
    ("backend", "model"), [("faster-whisper", "large-v3"), ("whisper-hf", "openai/whisper-large-v3")]
)
def test_unreachable_hub_model_is_one_line_naming_the_offline_default(tmp_path, backend, model):
    clip = tmp_path / "a.wav"
    clip.write_bytes(b"RIFF")
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_HOME": str(tmp_path / "hf")}  # never touch the network
    result = subprocess.run(
        [sys.executable, "-m", "assistant", "transcribe", str(clip), "--backend", backend, "--model", model],
        capture_output=True, text=True, timeout=120, env=env,
    )  # fmt: skip
    assert result.returncode == 2
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith(f"model-not-found: cannot fetch model '{model}'")
    assert "--model whisper-base" in lines[0]
