import dataclasses

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
    assert fake.detect_calls == 3, "each window detects its own language"
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
    assert fake.detect_calls == 1 and fake.languages == [None]


def _speech_at(*spans: tuple[float, float], length: float) -> np.ndarray:
    samples = silence(length)
    for start, end in spans:
        samples[int(start * 16000) : int(end * 16000)] = tone(end - start)
    return samples


def test_each_window_keeps_its_own_sure_language(tmp_path):
    # English 0.5-11.5 s, German 14-24 s (a pause over MAX_GAP_IN_WINDOW_S between them)
    path = write_wav(tmp_path / "mixed.wav", _speech_at((0.5, 11.5), (14, 24), length=26))
    fake = FakeTranscriber(detect=lambda audio: ("en", 0.95) if audio.start_s < 12 else ("de", 0.9))
    result = _pipeline(fake, EnergyVad()).transcribe_file(path)
    assert [s.language for s in result.transcript.segments] == ["en", "de"]
    assert result.transcript.language == "en", "the main language is the one with the most speech"
    assert fake.languages == [None], "sure windows are not redone"


def test_an_unsure_window_takes_its_neighbours_language(tmp_path):
    # a long German window, a short interjection detected as English, and a long unsure one
    path = write_wav(tmp_path / "de.wav", _speech_at((0.5, 12), (15, 16), (19, 30), length=31))

    def detect(audio):
        if audio.start_s < 13:
            return "de", 0.95
        return ("en", 0.9) if audio.start_s < 17 else ("en", 0.3)

    fake = FakeTranscriber(detect=detect)
    result = _pipeline(fake, EnergyVad()).transcribe_file(path)
    assert [s.language for s in result.transcript.segments] == ["de", "de", "de"]
    assert result.transcript.language == "de"
    assert fake.languages[-1] == "de" and fake.calls[-1] == [(15.0, 16.0), (19.0, 30.0)], "only unsure ones redone"


def test_a_given_language_is_forced_on_every_window(tmp_path):
    path = write_wav(tmp_path / "mixed.wav", _speech_at((0.5, 10), (14, 24), length=26))
    fake = FakeTranscriber(detect=lambda audio: ("de", 0.99))
    result = _pipeline(fake, EnergyVad(), language="en").transcribe_file(path)
    assert fake.detect_calls == 0 and {s.language for s in result.transcript.segments} == {"en"}


def test_word_times_are_placed_on_the_file_and_clipped(tmp_path):
    path = write_wav(tmp_path / "a.wav", _speech_at((3, 5), length=8))
    fake = FakeTranscriber()
    result = _pipeline(fake, EnergyVad(), word_timestamps=True).transcribe_file(path)
    (word,) = result.transcript.segments[0].words
    assert (word.start_s, word.end_s) == pytest.approx((3.1, 3.4), abs=0.11)


def test_a_file_over_the_audio_limit_is_refused_before_any_work(tmp_path):
    from assistant.errors import LimitError
    from assistant.pipeline import AudioLimit

    path = write_wav(tmp_path / "long.wav", tone(12))
    fake = FakeTranscriber()
    with pytest.raises(LimitError, match=r"holds 0 min.*over server\.max_upload_audio_s \(10 s\)"):
        _pipeline(fake, EnergyVad()).transcribe_file(path, limit=AudioLimit(10, "server.max_upload_audio_s"))
    assert fake.calls == []


def test_a_file_that_declares_no_duration_is_stopped_while_decoding(tmp_path, monkeypatch):
    """A stream without a declared length (or one that lies about it) is cut off once it decodes past the limit."""
    import assistant.pipeline as pipeline_module
    from assistant.audio.decode import AudioInfo
    from assistant.errors import LimitError
    from assistant.pipeline import AudioLimit

    path = write_wav(tmp_path / "long.wav", tone(70))
    real_probe = pipeline_module.probe

    def lying_probe(target):
        info = real_probe(target)
        tracks = tuple(dataclasses.replace(track, duration_s=None) for track in info.tracks)
        return AudioInfo(info.path, None, tracks)

    monkeypatch.setattr(pipeline_module, "probe", lying_probe)
    with pytest.raises(LimitError, match="found decoding"):
        _pipeline(FakeTranscriber(), EnergyVad()).transcribe_file(path, limit=AudioLimit(40, "x"))
