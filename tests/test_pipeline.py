import numpy as np
import pytest

from assistant.config import AsrConfig, TranscribeConfig
from assistant.errors import ConfigError
from assistant.pipeline import TranscriptionPipeline
from tests.conftest import EnergyVad, FakeTranscriber, silence, tone, write_wav


def _pipeline(transcriber, vad=None, **asr):
    return TranscriptionPipeline(transcriber, vad, asr=AsrConfig(**asr), transcribe=TranscribeConfig(block_s=60))


def test_speech_windows_are_batched_placed_and_clipped(tmp_path):
    # speech at 2-4 s, 40-45 s, 80-81 s (the second block), and silence between
    samples = np.concatenate([silence(2), tone(2), silence(36), tone(5), silence(35), tone(1), silence(4)])
    path = write_wav(tmp_path / "a.wav", samples)
    fake = FakeTranscriber(batch_size=2)
    progress = []
    result = _pipeline(fake, EnergyVad()).transcribe_file(path, on_progress=progress.append)
    starts = [s.start_s for s in result.transcript.segments]
    assert starts == pytest.approx([2.0, 40.0, 80.0], abs=0.11)
    for segment, length in zip(result.transcript.segments, (2, 5, 1), strict=True):
        assert segment.end_s - segment.start_s == pytest.approx(length, abs=0.11), "clipped to its window"
    assert fake.detect_calls == 1, "language is detected once per file"
    assert result.transcript.language == "en"
    assert len(fake.calls[0]) == 2, "windows of one block go in one batch"
    assert progress == sorted(progress) and progress[-1] == pytest.approx(85.0, abs=0.01)
    assert result.transcript.audio_s == pytest.approx(85.0, abs=0.01)


def test_without_vad_the_whole_block_is_one_window(tmp_path):
    path = write_wav(tmp_path / "a.wav", tone(20))
    fake = FakeTranscriber()
    result = _pipeline(fake, None, language="de").transcribe_file(path)
    assert fake.calls == [[(0.0, 20.0)]]
    assert fake.detect_calls == 0, "a given language is not detected"
    assert result.transcript.language == "de"


def test_pure_silence_gives_an_empty_transcript_and_no_model_call(tmp_path):
    path = write_wav(tmp_path / "quiet.wav", silence(30))
    fake = FakeTranscriber()
    result = _pipeline(fake, EnergyVad()).transcribe_file(path)
    assert result.transcript.text == "" and result.transcript.segments == ()
    assert fake.calls == []


@pytest.mark.parametrize(
    "script,expected", [("simplified", "这是简体"), ("traditional", "這是簡體"), ("as-is", "這是简体")]
)
def test_chinese_script_is_made_uniform(tmp_path, script, expected):
    path = write_wav(tmp_path / "zh.wav", tone(3))
    fake = FakeTranscriber(language="zh", text="這是简体")
    result = _pipeline(fake, EnergyVad(), zh_script=script).transcribe_file(path)
    assert result.transcript.text == expected
    assert result.transcript.segments[0].text == expected


def test_unsupported_language_fails_before_any_work():
    with pytest.raises(ConfigError, match="does not know language 'yue'.*whisper-large-v3"):
        _pipeline(FakeTranscriber(), None, language="yue")


def test_auto_language_means_detect(tmp_path):
    path = write_wav(tmp_path / "a.wav", tone(3))
    fake = FakeTranscriber(language="zh")
    assert _pipeline(fake, None, language="auto").transcribe_file(path).transcript.language == "zh"
    assert fake.detect_calls == 1
