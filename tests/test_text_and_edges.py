"""Console text in any encoding (assistant.io.encoding) and the silence around recogniser windows
(assistant.asr.edges), without models."""

from __future__ import annotations

import io

import numpy as np
import pytest

from assistant.asr import edges
from assistant.asr.edges import Edges, silent_edges_many
from assistant.errors import InputEncodingError
from assistant.io.encoding import LineDecoder, tolerant_output
from assistant.messages import SAMPLE_RATE, Audio, Segment, Transcript, Word


@pytest.mark.parametrize(
    ("text", "encoding"),
    [("北京是哪个国家的首都？", "gbk"), ("你好", "gbk"), ("它有多少人口？", "gb18030"), ("北京是哪家的首都？", "big5"),
     ("日本語のテキストです", "shift_jis"), ("café au lait, à la été", "cp1252"), ("привет мир", "cp1251"),
     ("你好 hello 世界", "utf-8")],
)  # fmt: skip
def test_a_line_is_decoded_when_its_encoding_can_be_told(text: str, encoding: str) -> None:
    assert LineDecoder().decode(text.encode(encoding)) == text


def test_a_line_that_is_no_text_is_one_clear_error() -> None:
    with pytest.raises(InputEncodingError, match=r"input-encoding: cannot tell the text encoding of the line b'\\x1f"):
        LineDecoder().decode(b"\x1f\x8b\x08\x00\xe2\x9cze\x00\x03")


def test_the_locale_encoding_comes_first_and_a_found_one_is_kept() -> None:
    assert LineDecoder("big5").decode("你好".encode("big5")) == "你好"  # GB18030 would read it too, differently
    assert LineDecoder().decode("中文".encode("big5")) == "いゅ"  # alone, GB18030's reading (kana) is as common
    decoder = LineDecoder()
    assert decoder.decode("你好".encode("big5")) == "你好"  # Big5 found (GB18030 gives private-use characters)
    assert decoder.decode("中文".encode("big5")) == "中文"  # and tried first on the stream's next line


def test_output_a_console_cannot_show_is_replaced() -> None:
    raw = io.BytesIO()
    stream = io.TextIOWrapper(raw, encoding="ascii")
    tolerant_output(stream)
    stream.write("北京 ok")
    stream.flush()
    assert raw.getvalue() == b"?? ok"


def test_every_window_gets_silence_around_it_within_whispers_window() -> None:
    short = Edges.around(Audio(np.ones(SAMPLE_RATE, np.float32)))
    assert (short.lead_s, short.tail_s) == (edges.LEAD_S, edges.TAIL_S)
    padded = short.pad(Audio(np.ones(SAMPLE_RATE, np.float32)))
    lead = round(edges.LEAD_S * SAMPLE_RATE)
    assert not padded.samples[:lead].any() and padded.samples[lead] == 1
    almost_full = Edges.around(Audio(np.ones(int(29.8 * SAMPLE_RATE), np.float32)))
    assert almost_full.lead_s == pytest.approx(0.2) and almost_full.tail_s == pytest.approx(0.0)  # stays <= 30 s


def test_times_come_back_on_the_callers_audio_clamped_to_it() -> None:
    seen: list[float] = []

    class Backend:
        @silent_edges_many
        def transcribe_many(self, audios: list[Audio], *, language: str | None) -> list[Transcript]:
            seen.extend(audio.duration_s for audio in audios)
            words = (Word(" Hi", 0.1, 0.5, 0.9), Word(" there", 0.5, 2.9, 0.9))
            return [Transcript("Hi there", language, (Segment(0.0, 2.9, "Hi there", words, seek=0),), 2.6)]

    result = Backend().transcribe_many([Audio(np.zeros(2 * SAMPLE_RATE, np.float32))], language="en")[0]
    assert seen == [pytest.approx(2 + edges.LEAD_S + edges.TAIL_S)]
    segment = result.segments[0]
    assert (segment.start_s, segment.end_s, segment.seek, result.audio_s) == (0.0, 2.0, 0, 2.0)
    assert [(w.start_s, w.end_s) for w in segment.words] == [(0.0, pytest.approx(0.2)), (pytest.approx(0.2), 2.0)]


def test_byte_order_marks_and_control_characters_never_reach_the_model(monkeypatch: pytest.MonkeyPatch) -> None:
    import sys

    from assistant.io.encoding import piped_reader

    decoder = LineDecoder("utf-8")
    assert decoder.decode(b"\xef\xbb\xbfhello") == "hello"  # saved as "UTF-8 with BOM"
    assert decoder.decode(b"hello\x00world\x1b[0m\tend") == "helloworld[0m\tend"
    utf16 = "hello\n2+2?\n你好\n".encode("utf-16")  # Notepad's "Unicode", PowerShell's Out-File
    monkeypatch.setattr(sys, "stdin", io.TextIOWrapper(io.BufferedReader(io.BytesIO(utf16))))
    read = piped_reader(LineDecoder("utf-8"))
    assert [read(""), read(""), read(""), read("")] == ["hello", "2+2?", "你好", None]
