"""Subtitle cues (assistant/asr/cues.py): the broadcast rules checked on fixed and random segments, and the SRT/VTT
files read back by parsers nobody here wrote (pysubs2, ffmpeg)."""

from __future__ import annotations

import html
import random
import re
import subprocess
from collections import Counter
from collections.abc import Sequence
from itertools import pairwise
from pathlib import Path

import pytest

from assistant.asr.cues import Cue, CueOptions, build_cues, is_cjk_text
from assistant.asr.writers import WRITERS
from assistant.config import TranscribeConfig
from assistant.messages import Segment, Transcript, Word
from tests.conftest import require_tool

pysubs2 = pytest.importorskip("pysubs2")

OPTIONS = CueOptions()
HAN_OR_KANA = re.compile(r"[\u3040-\u30ff\u3400-\u4dbf\u4e00-\u9fff]")  # text without spaces: may break anywhere

ENGLISH = (
    "So the thing about subtitles is that nobody reads a wall of text, and the broadcast rules exist for a reason. "
    "They keep lines short, two at most, and they change the picture often enough that the eye can follow along "
    "without rewinding. I was walking down the street the other day when I noticed that all of the shops had closed "
    "early because of the holiday and nobody had told me about it which was a little annoying to be honest"
)
CHINESE = (
    "今天我们来讨论一下字幕的问题，因为很多人觉得一整段文字放在屏幕上很难阅读。"
    "广播电视的规则是每行不超过十六个字，每条字幕最多两行，而且显示时间不能太长。"
)
URL = "https://example.com/a/very/long/path/that/goes/on/and/on/forever/index.html"


def normalized(segments: Sequence[Segment]) -> str:
    """The segments' text as the cues must show it: whitespace runs as one space, "-->" as "->"."""
    return " ".join(re.sub(r"-{2,}>", "->", " ".join(s.text.split())) for s in segments if s.text.strip())


def check_rules(cues: Sequence[Cue], options: CueOptions = OPTIONS) -> None:
    """Time order, no overlap, end > start, at most max_cue_s, 1 or 2 non-empty lines within the cue's limit (only a
    word that cannot be cut may be longer than a line, alone on it)."""
    for cue in cues:
        assert cue.end_ms > cue.start_ms >= 0, cue
        assert cue.end_ms - cue.start_ms <= round(options.max_cue_s * 1000), cue
        assert 1 <= len(cue.lines) <= 2, cue
        limit = min(16, options.max_line_chars) if is_cjk_text(cue.text) else options.max_line_chars
        for line in cue.lines:
            assert line and line == line.strip() and "-->" not in line, cue
            assert len(line) <= limit or (" " not in line and not HAN_OR_KANA.search(line)), (limit, cue)
    for before, after in pairwise(cues):
        assert before.end_ms <= after.start_ms, (before, after)


def check_text_kept(cues: Sequence[Cue], segments: Sequence[Segment]) -> None:
    """The lines, in order, are the segments' text, cut only at spaces or next to a Han/kana character."""
    original, position = normalized(segments), 0
    for line in (line for cue in cues for line in cue.lines):
        assert original.startswith(line, position), (original[position:], line)
        position += len(line)
        if position < len(original) and original[position] != " ":
            left = original[:position].rstrip("，。、；：！？」』）》“”‘’\"'.,;:!?)]-")[-1:]
            right = original[position:].lstrip("「『（《“‘\"'([")[:1]
            assert HAN_OR_KANA.match(left) or HAN_OR_KANA.match(right), f"cut inside a word: {original[:position]!r}"
        position += original[position : position + 1] == " "
    assert position == len(original)


def words_of(text: str, start_s: float, *, rate_s: float = 0.3, pause_s: float = 0.8) -> tuple[Word, ...]:
    """Whisper-like words for ``text`` (leading spaces kept), a pause after each sentence, times in whole ms."""
    words, now = [], start_s
    for piece in re.findall(r"\s*\S+", text):
        duration = rate_s * max(1, len(piece.strip())) / 5
        words.append(Word(piece, round(now, 3), round(now + duration, 3), 0.9))
        now += duration + (pause_s if piece.rstrip()[-1] in ".?!" else 0.05)
    return tuple(words)


def srt_and_vtt(tmp_path: Path, transcript: Transcript, options: CueOptions = OPTIONS) -> tuple[Path, Path]:
    srt, vtt = tmp_path / "out.srt", tmp_path / "out.vtt"
    srt.write_text(WRITERS["srt"](transcript, {}, options), encoding="utf-8")
    vtt.write_text(WRITERS["vtt"](transcript, {}, options), encoding="utf-8")
    return srt, vtt


def check_files(tmp_path: Path, segments: Sequence[Segment], options: CueOptions = OPTIONS) -> tuple[Cue, ...]:
    """Write SRT and VTT; pysubs2 must read back the same cues (times and lines), ffmpeg the same number of cues."""
    cues = build_cues(segments, options)
    srt, vtt = srt_and_vtt(tmp_path, Transcript("", None, tuple(segments), 0.0), options)
    for path, fmt in ((srt, "srt"), (vtt, "vtt")):
        parsed = pysubs2.load(str(path), encoding="utf-8", format_=fmt)
        assert [(e.start, e.end) for e in parsed] == [(c.start_ms, c.end_ms) for c in cues], fmt
        assert [html.unescape(e.plaintext) for e in parsed] == [c.text for c in cues], fmt
        ffmpeg = require_tool("ffmpeg")
        out = subprocess.run([ffmpeg, "-v", "error", "-i", str(path), "-f", "srt", "-"], capture_output=True,
                             text=True, check=True).stdout  # fmt: skip
        assert out.count(" --> ") == len(cues), (fmt, out)
    return cues


def test_long_english_segment_without_words(tmp_path: Path) -> None:
    segment = Segment(10.0, 40.0, ENGLISH)
    cues = check_files(tmp_path, [segment])
    check_rules(cues)
    check_text_kept(cues, [segment])
    assert len(cues) >= 5
    assert any(cue.text.endswith("reason.") for cue in cues)  # sentence ends are preferred places to cut
    for cue in cues:
        if len(cue.lines) == 2:  # balanced, not 42 + 3
            assert min(map(len, cue.lines)) >= 0.4 * max(map(len, cue.lines)), cue
    # no words: times interpolated by characters, cues back to back from the segment's start to its end
    assert cues[0].start_ms == 10_000 and cues[-1].end_ms == 40_000
    assert all(a.end_ms == b.start_ms for a, b in pairwise(cues))
    per_char_ms = 30_000 / sum(not c.isspace() for c in ENGLISH)
    for cue in cues:
        chars = sum(not c.isspace() for c in cue.text)
        assert abs((cue.end_ms - cue.start_ms) - chars * per_char_ms) <= 1.0, cue


def test_long_english_segment_with_words(tmp_path: Path) -> None:
    words = words_of(ENGLISH, 5.0)
    segment = Segment(words[0].start_s, words[-1].end_s, ENGLISH, words)
    cues = check_files(tmp_path, [segment])
    check_rules(cues)
    check_text_kept(cues, [segment])
    starts = {round(w.start_s * 1000) for w in words}
    ends = {round(w.end_s * 1000) for w in words}
    assert all(cue.start_ms in starts and cue.end_ms in ends for cue in cues)  # times are the words' times
    assert cues[0].start_ms == 5000 and cues[-1].end_ms == round(words[-1].end_s * 1000)
    # a cue never runs over a sentence end followed by a pause when it could stop there
    assert any(cue.text.endswith("rewinding.") for cue in cues)


def test_chinese_segment_lines_of_16_cut_at_punctuation(tmp_path: Path) -> None:
    assert len(CHINESE) >= 40
    segment = Segment(0.0, 15.0, CHINESE, language="zh")
    cues = check_files(tmp_path, [segment])
    check_rules(cues)
    check_text_kept(cues, [segment])
    assert all(len(line) <= 16 for cue in cues for line in cue.lines)
    assert all(cue.text[-1] in "，。" for cue in cues), [cue.text for cue in cues]
    assert max(len(cue.text.replace("\n", "")) for cue in cues) > 16  # two lines are used, not one line a cue


def test_chinese_with_character_words_takes_word_times(tmp_path: Path) -> None:
    words, now = [], 1.0
    for char in CHINESE:
        words.append(Word(char, round(now, 3), round(now + 0.2, 3), 0.9))
        now += 0.25 if char not in "，。" else 0.6
    cues = check_files(tmp_path, [Segment(1.0, words[-1].end_s, CHINESE, tuple(words), "zh")])
    check_rules(cues)
    starts = {round(w.start_s * 1000) for w in words}
    assert all(cue.start_ms in starts for cue in cues)
    assert all(cue.text[-1] in "，。" for cue in cues), [cue.text for cue in cues]


def test_words_in_another_script_still_give_the_times() -> None:
    """Text clean-up (traditional -> simplified) changes the text but not the words: the text shown is the segment's,
    the times the words'."""
    words = tuple(Word(char, k * 0.5, k * 0.5 + 0.4, 0.9) for k, char in enumerate("我們說話。"))
    cues = build_cues([Segment(0.0, 2.4, "我们说话。", words)], OPTIONS)
    assert [(c.start_ms, c.end_ms, c.text) for c in cues] == [(0, 2400, "我们说话。")]


def test_a_word_longer_than_a_line_is_never_cut(tmp_path: Path) -> None:
    text = f"For the full report please visit {URL} and read the summary at the end of the page."
    assert len(URL) > 42
    segment = Segment(0.0, 9.0, text)
    cues = check_files(tmp_path, [segment])
    check_rules(cues)
    check_text_kept(cues, [segment])
    assert [line for cue in cues for line in cue.lines if len(line) > 42] == [URL]


def test_empty_segments_give_no_cue(tmp_path: Path) -> None:
    segments = [Segment(0.0, 1.0, "First."), Segment(1.0, 2.0, ""), Segment(2.0, 3.0, "  \n "), Segment(3, 4, "Last.")]
    cues = check_files(tmp_path, segments)
    assert [c.text for c in cues] == ["First.", "Last."]
    assert WRITERS["srt"](Transcript("", None, tuple(segments), 4.0), {}).startswith("1\n00:00:00,000 --> ")
    assert "\n2\n00:00:03,000 --> 00:00:04,000\nLast.\n" in WRITERS["srt"](Transcript("", None, tuple(segments)), {})


def test_segments_close_together_never_overlap(tmp_path: Path) -> None:
    segments = [
        Segment(0.0, 2.0, "Right at the edge."),
        Segment(2.0, 4.0, "Starts where the last one ended."),
        Segment(3.9, 6.0, "Starts before the last one ended."),
        Segment(3.9, 3.9, "Same start, no length."),
        Segment(5.0, 4.0, "Ends before it starts."),
    ]
    cues = check_files(tmp_path, segments)
    check_rules(cues)
    assert len(cues) == 5
    assert cues[0].end_ms == cues[1].start_ms == 2000


def test_one_word_longer_than_max_cue_s_is_cut_short() -> None:
    cues = build_cues([Segment(0.0, 30.0, "Hello.")], OPTIONS)
    assert [(c.start_ms, c.end_ms) for c in cues] == [(0, 7000)]


def test_options_from_config_are_followed(tmp_path: Path) -> None:
    options = CueOptions.from_config(TranscribeConfig(max_line_chars=20, max_cue_s=3.0))
    assert (options.max_line_chars, options.max_cue_s, options.line_chars(True)) == (20, 3.0, 16)
    assert CueOptions(max_line_chars=12).line_chars(True) == 12  # CJK never allowed more than the Latin limit
    segment = Segment(0.0, 30.0, ENGLISH)
    cues = check_files(tmp_path, [segment], options)
    check_rules(cues, options)
    check_text_kept(cues, [segment])
    assert max(c.end_ms - c.start_ms for c in cues) <= 3000
    with pytest.raises(ValueError):
        CueOptions(max_line_chars=0)


def test_cjk_is_decided_per_cue_from_its_text() -> None:
    assert is_cjk_text("我们用Python写代码") and is_cjk_text("你好，世界。") and is_cjk_text("안녕하세요 여러분")
    assert not is_cjk_text("I love 北京") and not is_cjk_text("") and not is_cjk_text("   ")
    assert OPTIONS.line_limit("こんにちは") == 16 and OPTIONS.line_limit("hello") == 42
    mixed = [Segment(0.0, 6.0, "This part is English and long enough to need two lines of text.", language="zh"),
             Segment(6.0, 12.0, "这一部分是中文，而且长度足够需要两行字幕来显示。", language="en")]  # fmt: skip
    cues = build_cues(mixed, OPTIONS)
    check_rules(cues)
    check_text_kept(cues, mixed)
    assert max(len(line) for line in cues[0].lines) > 16  # the language code is not what decides
    assert all(len(line) <= 16 for cue in cues[1:] for line in cue.lines)


def test_korean_breaks_only_at_spaces() -> None:
    text = "안녕하세요 여러분 오늘은 자막을 읽기 쉽게 만드는 방법에 대해서 이야기해 보겠습니다 감사합니다"
    cues = build_cues([Segment(0.0, 8.0, text)], OPTIONS)
    check_rules(cues)
    check_text_kept(cues, [Segment(0.0, 8.0, text)])  # Hangul is not in HAN_OR_KANA: every cut at a space


# ---- property-style: many random segments, every invariant ----------------------------------------------------

VOCABULARY = ("the a to of and we it is was subtitle reading screen broadcast rules example "
              "extraordinarily internationalisation ok I").split()  # fmt: skip
HAN = "我们你他是的了在有这个中国人说话字幕时间问题很多读写看听今天明天"
PUNCTUATION = ("", "", "", "", ",", ".", "?", "!", ";")


def random_words(rng: random.Random, start_s: float, chaotic: bool) -> tuple[list[Word], bool]:
    chinese = rng.random() < 0.4
    words, now = [], start_s
    for _ in range(rng.randint(1, 80)):
        if chinese:
            text = "".join(rng.choice(HAN) for _ in range(rng.randint(1, 3))) + rng.choice(("", "", "，", "。", "、"))
        elif rng.random() < 0.03:
            text = " " + "".join(rng.choice("abcdefghij/.:") for _ in range(rng.randint(43, 70)))
        else:
            text = " " + rng.choice(VOCABULARY) + rng.choice(PUNCTUATION)
        duration = rng.choice((0.0, 0.05, 0.2, 0.4, 1.0, 8.0)) if chaotic else rng.uniform(0.05, 0.8)
        if chaotic:
            start = max(0.0, now + rng.uniform(-2.0, 2.0))
            words.append(Word(text, round(start, 3), round(start + rng.uniform(-0.5, 1.0) * duration, 3), 0.5))
        else:
            words.append(Word(text, round(now, 3), round(now + duration, 3), 0.9))
        now += duration + (rng.choice((0.0, 0.05, 0.3, 0.7, 1.5)) if not chaotic else rng.uniform(-1, 1))
    return words, chinese


def random_transcript(rng: random.Random, chaotic: bool) -> list[Segment]:
    segments, now = [], rng.uniform(0, 5)
    for _ in range(rng.randint(1, 6)):
        words, _ = random_words(rng, now, chaotic)
        text = "".join(w.word for w in words)
        start, end = words[0].start_s, max(w.end_s for w in words)
        if chaotic:
            start, end = rng.uniform(0, 60), rng.uniform(0, 60)
        kept = tuple(words) if rng.random() < 0.5 else ()
        segments.append(Segment(start, end, text.strip() if rng.random() < 0.5 else text, kept))
        now = end + rng.uniform(0.0, 2.0)
    return segments


@pytest.mark.parametrize("chaotic", [False, True], ids=["ordered", "chaotic-times"])
def test_random_segments_keep_every_rule(chaotic: bool) -> None:
    rng = random.Random(20261130 + chaotic)
    for _ in range(150):
        options = rng.choice((OPTIONS, CueOptions(max_line_chars=20, max_cue_s=2.5), CueOptions(max_cue_s=1.0)))
        segments = random_transcript(rng, chaotic)
        cues = build_cues(segments, options)
        check_rules(cues, options)
        shown = Counter(c for cue in cues for c in cue.text if not c.isspace())
        assert shown == Counter(c for c in normalized(segments) if not c.isspace())
        if not chaotic:
            check_text_kept(cues, segments)
            for segment in segments:
                check_times(cues, segment, options)


def check_times(cues: Sequence[Cue], segment: Segment, options: CueOptions) -> None:
    """A segment's cues start at a word's start and end at a word's end (or inside a CJK word, which may be cut
    between its characters); without words they run back to back from the segment's start to its end (the last one
    cut short when one word alone is longer than max_cue_s)."""
    low, high = round(segment.start_s * 1000), round(segment.end_s * 1000)
    mine = [c for c in cues if low <= c.start_ms < high]
    assert mine
    if segment.words:
        starts, ends = {round(w.start_s * 1000) for w in segment.words}, {round(w.end_s * 1000) for w in segment.words}
        assert all(c.start_ms in starts or HAN_OR_KANA.search(c.text[:2]) for c in mine)
        assert all(c.end_ms in ends or HAN_OR_KANA.search(c.text[-2:]) for c in mine)
    else:
        assert mine[0].start_ms == low
        assert mine[-1].end_ms == high or mine[-1].end_ms - mine[-1].start_ms == round(options.max_cue_s * 1000)


def test_random_files_read_back_by_pysubs2_and_ffmpeg(tmp_path: Path) -> None:
    rng = random.Random(7)
    for chaotic in (False, True, False):
        check_files(tmp_path, random_transcript(rng, chaotic))
