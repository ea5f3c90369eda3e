"""Subtitle cues from transcript segments: readable SRT/VTT instead of one wall of text per Whisper segment.

The rules are the broadcast ones:

- at most 2 lines per cue and ``max_line_chars`` (42) characters per line: the Netflix Timed Text Style Guide
  (English: 42 characters per line, 2 lines); the BBC Subtitle Guidelines also ask for 2 lines (a line of at most 68%
  of a 16:9 picture's width, about 37 characters) and one sentence per subtitle where possible;
- CJK text: 16 characters per line, a CJK character counting as one: Netflix's rule for Simplified and Traditional
  Chinese (also its Korean one; its Japanese guide asks for 13). The limit is chosen per cue from the cue's own text
  (see ``is_cjk_text``), not from ``Segment.language``: files mix languages and the code may be wrong or missing;
- at most ``max_cue_s`` (7 s) on screen: the Netflix guide's maximum duration;
- break at sentence punctuation first, then at clause punctuation or a pause between words, never inside a word (text
  without spaces, Chinese and Japanese, may break between any two characters; Korean breaks at its spaces); lines
  balanced rather than 42 + 3 characters, a bottom line longer than the top one when there is a choice (it covers
  less of the picture);
- cues in time order and never overlapping; every cue has end > start.

Choosing the breaks is a small dynamic programme over the places where a segment may break (the line-breaking idea of
Knuth and Plass, "Breaking paragraphs into lines", 1981, here with cues instead of lines): each cue costs a constant,
each break costs according to what precedes it (sentence end < clause end or pause < plain word boundary < inside
a recognised CJK word), a cue that leaves much of its two lines empty costs a little more, so the text is spread
evenly, and so does a sentence that ends inside a cue anywhere but at its line break (a new sentence mid-line). Inside
a cue the line break is chosen the same way, weighing balance against the break's cost. Cues never cross segments.
Last, times are made safe (``_settle``): where cues would overlap (segments that overlap, odd word times) the earlier
one ends when the next starts; a single word longer than ``max_cue_s`` is shown for ``max_cue_s``.

Times: with word timestamps (``Segment.words``) a cue starts at its first word's start and ends at its last word's
end. Without them, times are interpolated inside the segment in proportion to characters (spaces carry no time): an
estimate, the usual one of tools that split text they have no alignment for (openai/whisper instead refuses
``--max_line_width`` without ``--word_timestamps``). The text shown is always ``Segment.text`` (after clean-up); word
times are mapped onto it character by character, proportionally when the two differ in length (a script conversion
that changes nothing else keeps every time exact).

Sources: BBC Subtitle Guidelines (bbc.github.io/subtitle-guidelines, "Line breaks"); Netflix Partner Help Center,
"Timed Text Style Guide: General Requirements" (7 s), "English (USA) Timed Text Style Guide" (42 characters, 2 lines)
and "Chinese (Simplified) Timed Text Style Guide" (16 characters).
"""

from __future__ import annotations

import re
from bisect import bisect_left, bisect_right
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

from assistant.messages import Segment

if TYPE_CHECKING:
    from assistant.config import TranscribeConfig

MAX_LINES = 2  # lines per cue (BBC, Netflix)
CJK_LINE_CHARS = 16  # characters per line in CJK text (Netflix, Chinese and Korean)

# Characters that may stand alone: a break between two of them is not inside a word (Han and kana: no spaces).
_SPLITTABLE = "\u3040-\u30ff\u31f0-\u31ff\u3400-\u4dbf\u4e00-\u9fff\uf900-\ufaff\uff66-\uff9f\U00020000-\U0003134f"
# Characters that make text "CJK" for the line limit: the above, Hangul, bopomofo, CJK and full-width punctuation.
_CJK = _SPLITTABLE + "\u1100-\u11ff\u3000-\u303f\u3100-\u318f\uac00-\ud7af\uff00-\uffef"
_OPENERS = "「『（《〈【〔〖“‘([{"  # kept with the character after them
_CLOSERS = "」』）》〉】〕〗”’)]}\"'"  # looked through when asking how a token ends
_TOKEN = re.compile(
    rf"(?P<lead>\s*)(?P<body>[{_OPENERS}]*[{_SPLITTABLE}][^\s\w{_OPENERS}]*"  # one CJK character and its punctuation
    rf"|\S+?(?=\s|$|[{_OPENERS}]*[{_SPLITTABLE}]))"  # a run of other text: a word, up to a space or CJK character
)
_CJK_CHAR = re.compile(f"[{_CJK}]")
_ARROW = re.compile(r"-{2,}>")
_SENTENCE_END = frozenset(".?!…。？！‼⁇⁈⁉")
_CLAUSE_END = frozenset(",;:，、；：")

# Costs of a break after a token (a cue end or a line end), in arbitrary units; lower is better.
BREAK_SENTENCE = 0.0
BREAK_CLAUSE = 1.0  # also a pause of PAUSE_S or more
BREAK_WORD = 3.0
BREAK_INSIDE_WORD = 4.0  # between two CJK characters of one recognised word
PAUSE_S = 0.5  # a silence between words at least this long is a good place to break, seconds
LONG_PAUSE_S = 1.0  # ... and at least this long, as good as a sentence end, seconds
CUE_COST = 0.5  # each cue: fewer, fuller cues win when the breaks are equally good
FILL_WEIGHT = 2.0  # times (empty share of the cue's two lines) squared: spreads text evenly over cues
SENTENCE_INSIDE = 2.0  # a sentence that ends inside a cue other than at its line break (a new one starts mid-line)
BALANCE_WEIGHT = 5.0  # times |top - bottom| / line limit: two lines of similar length
TOP_HEAVY = 0.5  # a top line longer than the bottom one
OVERFLOW = 100.0  # per character over the limit, only when a word longer than a line leaves no other choice


@dataclass(frozen=True)
class CueOptions:
    """How subtitle cues are cut; the one options type the SRT and VTT writers take.

    ``max_line_chars``: characters per line (Latin text); ``max_cjk_line_chars``: characters per line when the cue's
    text is CJK (``is_cjk_text``), never more than ``max_line_chars``; ``max_cue_s``: longest time on screen, seconds.
    Raises ValueError for a limit below 1.
    """

    max_line_chars: int = 42
    max_cjk_line_chars: int = CJK_LINE_CHARS
    max_cue_s: float = 7.0

    def __post_init__(self) -> None:
        if self.max_line_chars < 1 or self.max_cjk_line_chars < 1:
            raise ValueError(f"line limits must be >= 1, got {self.max_line_chars}, {self.max_cjk_line_chars}")
        if self.max_cue_s < 0.001:
            raise ValueError(f"max_cue_s must be at least 1 ms, got {self.max_cue_s}")

    @classmethod
    def from_config(cls, config: TranscribeConfig) -> CueOptions:
        return cls(max_line_chars=config.max_line_chars, max_cue_s=config.max_cue_s)

    def line_limit(self, text: str) -> int:
        """Characters allowed per line for a cue showing ``text`` (``is_cjk_text`` decides which limit)."""
        return self.line_chars(is_cjk_text(text))

    def line_chars(self, cjk: bool) -> int:
        """Characters allowed per line in CJK text (``cjk``) or other text."""
        return min(self.max_cjk_line_chars, self.max_line_chars) if cjk else self.max_line_chars


@dataclass(frozen=True)
class Cue:
    """One subtitle on screen: times in whole milliseconds from the start of the source, 1 or 2 lines of text."""

    start_ms: int
    end_ms: int
    lines: tuple[str, ...]

    @property
    def text(self) -> str:
        return "\n".join(self.lines)


@dataclass(frozen=True)
class _Token:
    """The smallest piece a cue or line may hold: a word, or one CJK character with the punctuation around it."""

    text: str  # no whitespace
    spaced: bool  # whitespace came before it in the segment text
    start_s: float
    end_s: float
    cjk: int  # CJK characters in text (for the line limit)
    inside_word: bool  # a recognised word goes on after this token (CJK characters of one word)


def is_cjk_text(text: str) -> bool:
    """True when at least half of the non-space characters of ``text`` are CJK (Han, kana, Hangul, CJK and full-width
    punctuation): "我们用Python写代码" is CJK (6 of 12), "I love 北京" is not (2 of 7)."""
    return _mostly_cjk(len(_CJK_CHAR.findall(text)), sum(not char.isspace() for char in text))


def _mostly_cjk(cjk: int, visible: int) -> bool:
    return visible > 0 and 2 * cjk >= visible


def build_cues(segments: Iterable[Segment], options: CueOptions) -> tuple[Cue, ...]:
    """Cut ``segments`` into subtitle cues following ``options``: at most 2 lines, each within its line limit unless
    one word is longer than a line (it gets a line of its own and is never cut), at most ``max_cue_s`` on screen, in
    time order, never overlapping, end > start. Segments with no text give no cue. Pure; never raises."""
    cues: list[Cue] = []
    for segment in segments:
        tokens = _tokens(segment)
        for first, stop in _cue_spans(tokens, options):
            piece = tokens[first:stop]
            lines = _layout(piece, options.line_limit(_join(piece)))
            cues.append(Cue(round(piece[0].start_s * 1000), round(piece[-1].end_s * 1000), lines))
    return _settle(cues, max(1, int(options.max_cue_s * 1000)))


def _split_text(text: str) -> list[tuple[str, bool, int]]:
    """``text`` as (body, spaced, index of the body's first non-space character among all non-space characters)."""
    pieces, seen = [], 0
    for match in _TOKEN.finditer(_ARROW.sub("->", text)):  # "-->" starts an SRT/VTT timing line: never in a cue
        pieces.append((match["body"], bool(match["lead"]) and seen > 0, seen))
        seen += len(match["body"])
    return pieces


def _char_times(segment: Segment, count: int) -> list[tuple[float, float, bool]]:
    """(start_s, end_s, last character of a recognised word) for each of the ``count`` non-space characters of the
    segment's text: from the words' times when there are words (each word's time shared evenly by its characters,
    mapped proportionally when the words hold a different number of characters), else shared evenly by the segment."""
    spans: list[tuple[float, float, bool]] = []
    for word in segment.words:
        chars = sum(not char.isspace() for char in word.word)
        step = max(0.0, word.end_s - word.start_s) / max(chars, 1)
        spans += [(word.start_s + k * step, word.start_s + (k + 1) * step, k == chars - 1) for k in range(chars)]
    if not spans:
        step = max(0.0, segment.end_s - segment.start_s) / max(count, 1)
        return [(segment.start_s + k * step, segment.start_s + (k + 1) * step, True) for k in range(count)]
    if len(spans) == count:
        return spans
    return [spans[min(len(spans) - 1, k * len(spans) // count)] for k in range(count)]


def _tokens(segment: Segment) -> list[_Token]:
    pieces = _split_text(segment.text)
    times = _char_times(segment, sum(len(body) for body, _, _ in pieces))
    tokens = []
    for body, spaced, first in pieces:
        last = first + len(body) - 1
        cjk = len(_CJK_CHAR.findall(body))
        inside = not times[last][2] and cjk > 0
        tokens.append(_Token(body, spaced, times[first][0], times[last][1], cjk, inside))
    return tokens


def _break_cost(token: _Token, after: _Token | None) -> float:
    """Cost of ending a line or cue after ``token`` (``after``: the token that follows; None at the segment end)."""
    if after is None:
        return BREAK_SENTENCE
    ending = token.text.rstrip(_CLOSERS)[-1:]
    if ending in _SENTENCE_END:
        cost = BREAK_SENTENCE
    elif ending in _CLAUSE_END:
        cost = BREAK_CLAUSE
    else:
        cost = BREAK_INSIDE_WORD if token.inside_word else BREAK_WORD
    pause_s = after.start_s - token.end_s
    if pause_s >= LONG_PAUSE_S:
        return min(cost, BREAK_SENTENCE)
    return min(cost, BREAK_CLAUSE) if pause_s >= PAUSE_S else cost


def _join(tokens: Sequence[_Token]) -> str:
    return "".join((" " if t.spaced and k else "") + t.text for k, t in enumerate(tokens))


@dataclass(frozen=True)
class _Run:
    """Prefix sums over one segment's tokens, so that any candidate cue tokens[first:stop] is measured in O(1)."""

    widths: tuple[int, ...]  # characters, with one space where the text had whitespace between tokens
    chars: tuple[int, ...]  # characters without spaces
    cjk: tuple[int, ...]  # CJK characters
    latin_lead: tuple[int, ...]  # sum of max(0, non-CJK - CJK characters) per token: how far a cue may turn non-CJK
    sentence_ends: tuple[int, ...]  # indices of tokens after which a sentence ends (or a long pause falls)
    ends_before: tuple[int, ...]  # how many of those come before each token

    @classmethod
    def of(cls, tokens: Sequence[_Token], breaks: Sequence[float]) -> _Run:
        widths, chars, cjk, lead, ends_before = [0], [0], [0], [0], [0]
        for k, token in enumerate(tokens):
            widths.append(widths[-1] + token.spaced + len(token.text))
            chars.append(chars[-1] + len(token.text))
            cjk.append(cjk[-1] + token.cjk)
            lead.append(lead[-1] + max(0, len(token.text) - 2 * token.cjk))
            ends_before.append(ends_before[-1] + (k < len(tokens) - 1 and breaks[k] <= BREAK_SENTENCE))
        ends = tuple(k for k in range(len(tokens)) if ends_before[k + 1] > ends_before[k])
        return cls(tuple(widths), tuple(chars), tuple(cjk), tuple(lead), ends, tuple(ends_before))

    def width(self, tokens: Sequence[_Token], first: int, stop: int) -> int:
        return self.widths[stop] - self.widths[first] - tokens[first].spaced

    def fits(self, tokens: Sequence[_Token], first: int, stop: int, limit: int) -> bool:
        """Whether tokens[first:stop] fill at most MAX_LINES lines of ``limit`` characters, filling greedily (which
        uses the fewest lines); a token longer than a line takes a line of its own."""
        for _ in range(MAX_LINES):
            if first >= stop:
                return True
            reach = bisect_right(self.widths, self.widths[first] + tokens[first].spaced + limit, lo=first + 1) - 1
            first = max(reach, first + 1)
        return first >= stop

    def is_cjk(self, first: int, stop: int) -> bool:
        """``is_cjk_text`` of tokens[first:stop]'s text."""
        return _mostly_cjk(self.cjk[stop] - self.cjk[first], self.chars[stop] - self.chars[first])

    def may_turn_latin(self, first: int, stop: int, lowest: int) -> bool:
        """Whether some cue tokens[earlier:stop], lowest <= earlier <= first, could be non-CJK text."""
        latin_excess = (self.chars[stop] - self.chars[first]) - 2 * (self.cjk[stop] - self.cjk[first])
        return latin_excess + self.latin_lead[first] - self.latin_lead[lowest] > 0

    def sentences_inside(self, tokens: Sequence[_Token], first: int, stop: int, limit: int) -> int:
        """Sentence ends inside tokens[first:stop] that cannot be its line break (a new sentence mid-line)."""
        if self.ends_before[stop - 1] == self.ends_before[first]:
            return 0
        inside = self.sentence_ends[bisect_left(self.sentence_ends, first) : bisect_left(self.sentence_ends, stop - 1)]
        at_line_break = any(
            self.width(tokens, first, k + 1) <= limit and self.width(tokens, k + 1, stop) <= limit for k in inside
        )
        return len(inside) - at_line_break


def _cue_spans(tokens: Sequence[_Token], options: CueOptions) -> list[tuple[int, int]]:
    """Best split of one segment's tokens into cues, as (first, stop) index pairs; O(tokens x tokens per cue)."""
    count = len(tokens)
    breaks = [_break_cost(token, tokens[k + 1] if k + 1 < count else None) for k, token in enumerate(tokens)]
    run = _Run.of(tokens, breaks)
    latin, cjk = options.line_chars(False), options.line_chars(True)
    lowest = dict.fromkeys((latin, cjk), 0)  # per line limit: first token of the longest fitting run ending at `stop`
    best, back = [0.0] + [float("inf")] * count, [0] * (count + 1)
    for stop in range(1, count + 1):
        for limit in lowest:
            while not run.fits(tokens, lowest[limit], stop, limit):
                lowest[limit] += 1
        for first in range(stop - 1, min(lowest.values()) - 1, -1):
            if first < lowest[cjk] and not run.may_turn_latin(first, stop, lowest[latin]):
                break
            limit = cjk if run.is_cjk(first, stop) else latin
            too_long = tokens[stop - 1].end_s - tokens[first].start_s > options.max_cue_s
            if first < lowest[limit] or (too_long and stop - first > 1):
                continue
            fill = min(1.0, run.width(tokens, first, stop) / (MAX_LINES * limit))
            cost = (
                best[first]
                + CUE_COST
                + FILL_WEIGHT * (1.0 - fill) ** 2
                + SENTENCE_INSIDE * run.sentences_inside(tokens, first, stop, limit)
                + breaks[stop - 1]
            )
            if cost < best[stop]:
                best[stop], back[stop] = cost, first
    spans, stop = [], count
    while stop > 0:
        spans.append((back[stop], stop))
        stop = back[stop]
    return spans[::-1]


def _layout(tokens: Sequence[_Token], limit: int) -> tuple[str, ...]:
    """The cue's text as one line when it fits in ``limit`` characters, else as the best two lines: both within the
    limit (a word longer than a line alone on its own), balanced, broken at punctuation where that costs little."""
    if len(_join(tokens)) <= limit or len(tokens) == 1:
        return (_join(tokens),)

    def cost(split: int) -> float:
        top, bottom = len(_join(tokens[:split])), len(_join(tokens[split:]))
        over = (top - limit if top > limit and split > 1 else 0) + (
            bottom - limit if bottom > limit and len(tokens) - split > 1 else 0
        )
        return (
            OVERFLOW * over
            + BALANCE_WEIGHT * abs(top - bottom) / limit
            + _break_cost(tokens[split - 1], tokens[split])
            + (TOP_HEAVY if top > bottom else 0.0)
        )

    split = min(range(1, len(tokens)), key=cost)
    return _join(tokens[:split]), _join(tokens[split:])


def _settle(cues: list[Cue], max_cue_ms: int) -> tuple[Cue, ...]:
    """Cues in time order, none overlapping the next, none longer than ``max_cue_ms``, each with end > start: an end
    past the next cue's start is cut back to it; a start before the previous end (or before 0) moves up to it."""
    ordered = sorted(cues, key=lambda cue: cue.start_ms)
    settled, floor_ms = [], 0
    for k, cue in enumerate(ordered):
        start_ms = max(cue.start_ms, floor_ms)
        end_ms = max(min(cue.end_ms, start_ms + max_cue_ms), start_ms + 1)
        if k + 1 < len(ordered) and ordered[k + 1].start_ms > start_ms:
            end_ms = min(end_ms, ordered[k + 1].start_ms)
        settled.append(Cue(start_ms, end_ms, cue.lines))
        floor_ms = end_ms
    return tuple(settled)
