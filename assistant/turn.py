"""End of turn: how much silence ends the user's turn, judged from what was said so far.

A fixed silence window (``vad.min_silence_ms``) is either too short for someone who pauses mid-sentence ("I'd like
to book a table for ... um ... four") or too long for a finished question, which then waits out the whole window
before anything happens. Here a ``TurnDetector`` reads the transcript of the speech before the pause and says how
likely the turn is over; the engine (``assistant.session``) turns that into the silence it waits for
(``TurnWindows``): a finished sentence ends after ``turn.complete_silence_ms``, a trailing "and ..." or "因为 ..."
waits ``turn.incomplete_silence_ms``, anything else the plain window. The idea is LiveKit agents' turn detector and
pipecat's smart-turn (a model scores end of utterance, the endpointing delay follows); the built-in detector is a
small rule set for English and Chinese, and ``turn.detector`` names any other registered detector (a model).
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Protocol

from assistant.config import TurnConfig
from assistant.tts.base import has_cjk


class TurnDetector(Protocol):
    """Scores whether a transcript is a finished turn. Called on the event loop: keep it fast, or run a model in a
    thread of its own."""

    def end_probability(self, text: str, language: str | None) -> float:
        """0.0 (surely unfinished) .. 1.0 (surely finished); 0.5 when there is no telling."""
        ...


COMPLETE, UNSURE, INCOMPLETE = 0.9, 0.5, 0.1

# words after which an English sentence goes on, whatever Whisper's punctuation: conjunctions, articles,
# possessives, fillers ("I went out and." is Whisper closing a sentence that was not over)
_EN_CONNECTORS = frozenset(
    "and but or nor because although though unless whereas plus the a an my your our their his her its um uh er "
    "erm hmm".split()
)
# prepositions go on only without a question or exclamation mark ("Where are you from?" is finished)
_EN_PREPOSITIONS = frozenset("of to for from with without into onto about between through than".split())
# the same for Chinese: a clause ends with these when more is coming
_ZH_CONTINUES = ("然后", "但是", "可是", "因为", "所以", "而且", "还有", "或者", "还是", "如果", "虽然", "就是",
                 "那个", "这个", "比如", "以及", "并且", "和", "跟", "与", "的话", "嗯", "呃", "就", "但", "而", "或",
                 "把", "被", "给", "从", "向")  # fmt: skip
_EN_WORD = re.compile(r"[A-Za-z']+")
_TRAILING_OPEN = ("...", "…", ",", "，", "、", ";", "；", ":", "：", "-", "—")
_FINISHED = (".", "?", "!", "。", "？", "！", '"', "”", ")", "）")


class RuleTurnDetector:
    """English and Chinese rules: a turn ending in a conjunction, preposition, article, filler, comma or ellipsis
    goes on; one ending in ``. ? !`` (Whisper punctuates what it hears as finished) is over; English with no mark
    at its end goes on; Chinese with none is unsure."""

    def __init__(self, config: TurnConfig | None = None) -> None:
        del config  # nothing to set: the rules are fixed

    def end_probability(self, text: str, language: str | None) -> float:
        stripped = text.strip()
        if not stripped:
            return UNSURE
        if stripped.endswith(_TRAILING_OPEN):
            return INCOMPLETE
        body = stripped.rstrip('.?!。？！"”)） ')
        words = _EN_WORD.findall(body[-40:])
        last = words[-1].lower() if words and not has_cjk(body[-1:]) else ""
        if last in _EN_CONNECTORS or (last in _EN_PREPOSITIONS and not stripped.endswith(("?", "!"))):
            return INCOMPLETE
        if has_cjk(body[-1:]) and body.endswith(_ZH_CONTINUES):
            return INCOMPLETE
        if stripped.endswith(_FINISHED):
            return COMPLETE
        # Whisper closes an English sentence it heard finish with a mark; without one, the speaker is mid-clause.
        # Chinese transcripts often have no marks at all: there the rules cannot tell.
        return UNSURE if has_cjk(body[-1:]) or not last else INCOMPLETE


class FixedTurnDetector:
    """No judgement: every turn waits the plain silence window (``vad.min_silence_ms``), as a fixed-window VAD."""

    def __init__(self, config: TurnConfig | None = None) -> None:
        del config

    def end_probability(self, text: str, language: str | None) -> float:
        return UNSURE


@dataclass(frozen=True)
class TurnWindows:
    """Silence (ms) that ends a turn, by the detector's verdict. ``base_ms`` is the plain window."""

    complete_ms: int
    base_ms: int
    incomplete_ms: int

    def silence_ms(self, probability: float) -> int:
        """Finished (p >= 0.75): the short window; unfinished (p <= 0.25): the long one; else the plain window."""
        if probability >= 0.75:
            return min(self.complete_ms, self.base_ms)
        if probability <= 0.25:
            return max(self.incomplete_ms, self.base_ms)
        return self.base_ms


# semantic_vad's eagerness scales the windows: high ends turns sooner, low lets the user pause longer
EAGERNESS_SCALE = {"low": 2.0, "medium": 1.0, "high": 0.6, "auto": 1.0}
