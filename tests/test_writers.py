import json

from assistant.asr.writers import WRITERS
from assistant.messages import Segment, Transcript

TRANSCRIPT = Transcript(
    text="Hello there. 你好 --> world",
    language="en",
    segments=(Segment(0.0, 1.5, "Hello there."), Segment(3661.25, 3662.0, "你好 --> world\n\nsecond line")),
    audio_s=3700.0,
)


def test_srt_cues():
    text = WRITERS["srt"](TRANSCRIPT, {})
    assert text == (
        "1\n00:00:00,000 --> 00:00:01,500\nHello there.\n\n"
        "2\n01:01:01,250 --> 01:01:02,000\n你好 -> world\nsecond line\n"
    )


def test_vtt_header_and_dot_decimals():
    text = WRITERS["vtt"](TRANSCRIPT, {})
    assert text.startswith("WEBVTT\n\n00:00:00.000 --> 00:00:01.500\nHello there.\n\n")
    assert "01:01:01.250 --> 01:01:02.000\n你好 -> world\nsecond line\n" in text


def test_tsv_in_milliseconds():
    assert WRITERS["tsv"](TRANSCRIPT, {}).splitlines() == [
        "start\tend\ttext",
        "0\t1500\tHello there.",
        "3661250\t3662000\t你好 --> world second line",
    ]


def test_json_has_segments_language_duration_and_meta():
    document = json.loads(WRITERS["json"](TRANSCRIPT, {"model": "m", "timings": {"total_s": 1.0}}))
    assert document["language"] == "en"
    assert document["duration"] == 3700.0
    assert document["segments"][1] == {"id": 1, "start": 3661.25, "end": 3662.0, "text": TRANSCRIPT.segments[1].text}
    assert document["model"] == "m" and document["timings"] == {"total_s": 1.0}


def test_txt_one_line_per_segment():
    assert WRITERS["txt"](TRANSCRIPT, {}).splitlines()[0] == "Hello there."


def test_empty_transcript_gives_valid_empty_outputs():
    empty = Transcript("", None, (), 5.0)
    assert WRITERS["srt"](empty, {}) == ""
    assert WRITERS["vtt"](empty, {}) == "WEBVTT\n\n"
    assert json.loads(WRITERS["json"](empty, {}))["segments"] == []
