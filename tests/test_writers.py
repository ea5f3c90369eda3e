import json

from assistant.asr.cues import CueOptions
from assistant.asr.writers import WRITERS
from assistant.messages import Segment, Transcript

TRANSCRIPT = Transcript(
    text="Hello there. 你好 --> world",
    language="en",
    segments=(Segment(0.0, 1.5, "Hello there."), Segment(3661.25, 3662.0, "你好 --> world\n\nsecond line")),
    audio_s=3700.0,
)


LONG = Transcript(
    text="",
    language="en",
    segments=(
        Segment(
            0.0,
            12.0,
            "Subtitles are easier to read when every cue holds at most two short lines, and when it leaves the "
            "screen before the next thought begins.",
        ),
    ),
    audio_s=12.0,
)


def test_srt_cues():
    # the text's own line breaks are not kept: cue lines are cut by the rules (assistant/asr/cues.py)
    text = WRITERS["srt"](TRANSCRIPT, {})
    assert text == (
        "1\n00:00:00,000 --> 00:00:01,500\nHello there.\n\n"
        "2\n01:01:01,250 --> 01:01:02,000\n你好 -> world second line\n"
    )


def test_vtt_header_dot_decimals_and_escapes():
    text = WRITERS["vtt"](TRANSCRIPT, {})
    assert text.startswith("WEBVTT\n\n00:00:00.000 --> 00:00:01.500\nHello there.\n\n")
    assert "01:01:01.250 --> 01:01:02.000\n你好 -&gt; world second line\n" in text
    assert "a &lt;b&gt; &amp; c" in WRITERS["vtt"](Transcript("", None, (Segment(0, 1, "a <b> & c"),)), {})


def test_srt_and_vtt_split_a_long_segment_into_readable_cues():
    for fmt in ("srt", "vtt"):
        lines = [line for line in WRITERS[fmt](LONG, {}).splitlines() if line and "-->" not in line]
        lines = [line for line in lines if not line.isdigit() and line != "WEBVTT"]
        assert len(lines) >= 3 and all(len(line) <= 42 for line in lines), lines
    narrow = WRITERS["srt"](LONG, {}, CueOptions(max_line_chars=20, max_cue_s=2.0))
    assert all(len(line) <= 20 for line in narrow.splitlines() if "-->" not in line)
    assert narrow.count(" --> ") > WRITERS["srt"](LONG, {}).count(" --> ")


def test_txt_tsv_json_keep_whole_segments():
    segment = LONG.segments[0]
    assert WRITERS["txt"](LONG, {}) == segment.text + "\n"
    assert WRITERS["tsv"](LONG, {}).splitlines()[1] == f"0\t12000\t{segment.text}"
    assert json.loads(WRITERS["json"](LONG, {}))["segments"][0]["text"] == segment.text


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
