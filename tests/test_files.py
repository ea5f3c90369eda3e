"""Real files as people have them: any name the OS allows, write failures, folders of camcorder media, file modes.

The command runs in-process with the fake recogniser of conftest (real decoding, no model), so each case takes about
a second; the files are built with ffmpeg at test time.
"""

from __future__ import annotations

import json
import os
import stat
import subprocess
import sys
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any
from urllib.parse import unquote_to_bytes

import pytest

from assistant import cli
from assistant.config import Config
from assistant.conversation import Conversation
from assistant.errors import ConversationError, OutputError
from assistant.files import atomic_write_text, name_fields, printable
from assistant.messages import Audio, Transcript
from assistant.pipeline import TranscriptionPipeline
from tests.conftest import EnergyVad, FakeTranscriber, ffmpeg_generate

LATIN1_NAME = os.fsdecode(b"caf\xe9.wav")  # "café.wav" in Latin-1: not UTF-8, a lone surrogate to Python


class NameAgnosticFake(FakeTranscriber):
    """conftest's fake, taking whatever options the pipeline passes (these tests are about files, not decoding)."""

    def transcribe_many(self, audios: Sequence[Audio], **options: Any) -> list[Transcript]:
        return super().transcribe_many(audios, language=options.get("language"), task=options.get("task", "transcribe"))


@pytest.fixture
def fake_pipeline(monkeypatch: pytest.MonkeyPatch) -> None:
    """``assistant transcribe`` builds the fake recogniser and the energy VAD instead of loading Whisper and Silero."""

    def build(cls: type[TranscriptionPipeline], config: Config) -> TranscriptionPipeline:
        return cls(NameAgnosticFake(text="hello"), EnergyVad(), asr=config.asr, transcribe=config.transcribe)

    monkeypatch.setattr(TranscriptionPipeline, "from_config", classmethod(build))


@pytest.fixture
def umask_022() -> Iterator[None]:
    previous = os.umask(0o022)
    try:
        yield
    finally:
        os.umask(previous)


def sine(target: Path, *args: str, seconds: float = 1.5) -> Path:
    """A short tone in whatever container ``target`` and ``args`` ask for."""
    return ffmpeg_generate(target, "-f", "lavfi", "-i", f"sine=frequency=440:duration={seconds}", *args)


def camcorder_clip(target: Path, *args: str) -> Path:
    """Black video with a tone, like a camcorder or screen recording (video first, audio second)."""
    return ffmpeg_generate(
        target, "-f", "lavfi", "-i", "color=c=black:s=64x48:r=10:d=1.5", "-f", "lavfi",
        "-i", "sine=frequency=440:duration=1.5", "-map", "0:v", "-map", "1:a", *args,
    )  # fmt: skip


def transcribe(*args: str) -> int:
    return cli.main(["transcribe", *args, "--quiet"])


def leftovers(folder: Path) -> list[bytes]:
    return [name for name in os.listdir(os.fsencode(folder)) if name.endswith(b".partial")]


# --- any name the OS allows -------------------------------------------------------------------------------------------


def test_a_name_that_is_not_utf8_gives_every_output(tmp_path, fake_pipeline, capsys):
    source = sine(tmp_path / LATIN1_NAME)
    assert transcribe(str(tmp_path), "--format", "txt,srt,json") == 0, capsys.readouterr().err
    names = set(os.listdir(os.fsencode(tmp_path)))
    assert {b"caf\xe9.txt", b"caf\xe9.srt", b"caf\xe9.json"} <= names  # the same bytes as the input's name
    assert leftovers(tmp_path) == []
    document = json.loads((tmp_path / os.fsdecode(b"caf\xe9.json")).read_bytes().decode("utf-8"))  # strict UTF-8
    assert document["source"] == str(tmp_path) + "/caf\\xe9.wav"  # readable: the odd byte as \xNN
    assert unquote_to_bytes(document["source_bytes"]) == os.fsencode(source)  # exact: percent-encoded bytes
    err = capsys.readouterr().err
    assert "caf\\xe9.wav: " in err and "asr-failed" not in err


def test_name_fields_are_lossless_and_only_add_bytes_when_needed():
    assert name_fields("/talks/会议.m4a", "source") == {"source": "/talks/会议.m4a"}
    odd = os.fsdecode(b"/x/caf\xe9 50%.wav")
    fields = name_fields(odd, "source")
    assert fields == {"source": "/x/caf\\xe9 50%.wav", "source_bytes": "/x/caf%E9%2050%25.wav"}
    assert unquote_to_bytes(fields["source_bytes"]) == b"/x/caf\xe9 50%.wav"
    json.dumps(fields, ensure_ascii=False).encode("utf-8")  # valid UTF-8 JSON


def test_printable_escapes_only_the_bytes_that_are_not_utf8():
    assert printable("plain é 会") == "plain é 会"
    assert printable(LATIN1_NAME) == "caf\\xe9.wav"
    assert printable("lone \ud800") == "lone \\ud800"  # a surrogate no byte stands for still prints


def test_printable_keeps_a_message_on_one_line():
    assert printable("new\nline\r.wav") == "new\\x0aline\\x0d.wav"


def test_progress_lines_survive_a_c_locale_pipe(tmp_path):
    """stderr may be a pipe under LANG=C: the folder message names the odd folder without crashing."""
    folder = tmp_path / os.fsdecode(b"d\xe9mo")
    folder.mkdir()
    (folder / "notes.txt").write_text("not audio\n")
    env = {**os.environ, "LANG": "C", "LC_ALL": "C"}
    env.pop("PYTHONIOENCODING", None)
    result = subprocess.run(
        [sys.executable, "-m", "assistant", "transcribe", os.fsencode(folder), "--quiet"],
        capture_output=True, timeout=120, env=env,
    )  # fmt: skip
    assert result.returncode == 1, result.stderr
    assert b"d\\xe9mo" in result.stderr and b"Traceback" not in result.stderr


# --- a failure while writing is a write failure ---------------------------------------------------------------------


def test_an_output_folder_that_is_a_file_is_an_output_error(tmp_path, fake_pipeline, capsys):
    source = sine(tmp_path / "a.wav")
    (tmp_path / "blocked").write_text("a file where the folder should be\n")
    assert transcribe(str(source), "--output-dir", str(tmp_path / "blocked" / "out")) == 1
    err = capsys.readouterr().err
    assert err.startswith("output: ") and "asr-failed" not in err, err
    assert leftovers(tmp_path) == []


def test_a_writer_that_raises_is_an_output_error_and_leaves_no_temporary_file(
    tmp_path, fake_pipeline, capsys, monkeypatch
):
    from assistant.asr import writers

    def broken(*args: Any) -> str:
        raise RuntimeError("disk on fire")

    monkeypatch.setitem(writers.WRITERS, "json", broken)
    source = sine(tmp_path / "a.wav")
    assert transcribe(str(source), "--format", "txt,json") == 1
    err = capsys.readouterr().err
    assert "output: " in err and "RuntimeError: disk on fire" in err and "asr-failed" not in err, err
    assert leftovers(tmp_path) == []


def test_a_failed_rename_keeps_the_previous_file_and_removes_the_temporary(tmp_path, monkeypatch):
    target = tmp_path / "a.srt"
    target.write_text("previous\n")

    def refuse(*args):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(os, "replace", refuse)
    with pytest.raises(OutputError, match="No space left on device; the previous file is unchanged"):
        atomic_write_text(target, "new\n", what="output", error=OutputError, private=False)
    assert target.read_text() == "previous\n"
    assert leftovers(tmp_path) == []


@pytest.mark.parametrize("failure", [KeyboardInterrupt, UnicodeError, ValueError])
def test_no_temporary_file_outlives_any_exception(tmp_path, monkeypatch, failure):
    def interrupted(descriptor):
        raise failure("stop")

    monkeypatch.setattr(os, "fsync", interrupted)
    with pytest.raises(failure):
        atomic_write_text(tmp_path / "a.txt", "text\n", what="output", error=OutputError, private=False)
    assert os.listdir(tmp_path) == []


def test_text_utf8_cannot_hold_is_an_output_error_before_any_file(tmp_path):
    with pytest.raises(OutputError, match="which UTF-8 cannot encode"):
        atomic_write_text(tmp_path / "a.json", '{"x": "\udce9"}', what="output", error=OutputError, private=False)
    assert os.listdir(tmp_path) == []


# --- folders do not hide media --------------------------------------------------------------------------------------


def test_a_folder_of_camcorder_and_unlabelled_media_transcribes_all(tmp_path, fake_pipeline, capsys):
    folder = tmp_path / "camcorder"
    folder.mkdir()
    camcorder_clip(folder / "clip.MTS", "-c:v", "mpeg2video", "-c:a", "mp2", "-f", "mpegts")
    camcorder_clip(folder / "rec.flv", "-c:v", "flv1", "-c:a", "mp3")
    sine(folder / "voice.dat", "-f", "wav")  # audio behind an extension nobody lists: found by probing
    (folder / "clip.THM").write_bytes(b"\xff\xd8\xff thumbnail")  # camcorder sidecar: skipped by its extension
    (folder / "._clip.MTS").write_bytes(b"\x00\x05\x16\x07 AppleDouble")  # macOS resource fork: hidden
    assert transcribe(str(folder), "--format", "txt,srt,json") == 0, capsys.readouterr().err
    for stem in ("clip", "rec", "voice"):
        assert (folder / f"{stem}.srt").is_file(), stem
    found, problems = cli.expand_inputs([str(folder)])  # the outputs written beside the inputs are not inputs
    assert sorted(p.name for p in found) == ["clip.MTS", "rec.flv", "voice.dat"] and problems == []


def test_a_folder_without_media_says_what_was_skipped_and_exits_1(tmp_path, capsys):
    (tmp_path / "notes.txt").write_text("minutes\n")
    (tmp_path / "old.srt").write_text("1\n00:00:00,000 --> 00:00:01,000\nhi\n")
    (tmp_path / "photo.jpg").write_bytes(b"\xff\xd8\xff")
    (tmp_path / "README").write_text("plain text without an extension\n")
    (tmp_path / ".DS_Store").write_bytes(b"\x00\x00\x00\x01Bud1")
    assert transcribe(str(tmp_path)) == 1
    err = capsys.readouterr().err
    assert f"audio-decode: no audio or video files in folder '{tmp_path}': skipped 5 files: " in err, err
    for reason in ("1 .txt (not media)", "1 .srt (not media)", "1 .jpg (not media)", "1 hidden",
                   "1 not audio or video (ffprobe)"):  # fmt: skip
        assert reason in err, (reason, err)


# --- outputs are readable like any other file the user creates ------------------------------------------------------


def mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


def test_outputs_follow_the_umask(tmp_path, fake_pipeline, umask_022, capsys):
    source = sine(tmp_path / "a.wav")
    assert transcribe(str(source), "--format", "txt,srt,json") == 0, capsys.readouterr().err
    assert {name: mode(tmp_path / name) for name in ("a.txt", "a.srt", "a.json")} == dict.fromkeys(
        ("a.txt", "a.srt", "a.json"), 0o644
    )
    os.umask(0o027)
    atomic_write_text(tmp_path / "group.txt", "x\n", what="output", error=OutputError, private=False)
    assert mode(tmp_path / "group.txt") == 0o640


def test_conversation_saves_stay_private(tmp_path, umask_022):
    saved = Conversation(system="be brief").save(tmp_path / "talk.json")
    assert mode(saved) == 0o600
    atomic_write_text(saved, "{}\n", what="conversation", error=ConversationError, private=True)  # over an old one
    assert mode(saved) == 0o600
