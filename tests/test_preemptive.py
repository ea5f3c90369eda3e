"""Preemptive turns (``assistant.session``, ``assistant.turn``): the reply starts in the pause before the turn is
known to be over, held back until it is; the silence that ends a turn follows what was said. Driven with scripted
audio (a tone is speech, zeros are silence), scripted transcribers and a scripted chat model: nothing speculative
may reach the events, the history or the saved conversation, and a pause that resumes never splits a turn."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable, Sequence

import numpy as np
import pytest

from assistant.messages import (
    Audio,
    ItemAdded,
    Message,
    ReplyDone,
    ReplyTextDelta,
    SessionEvent,
    SpeculationDone,
    SpeechStopped,
    Transcript,
    TranscriptFinal,
)
from assistant.session import TurnDetection, VoiceSession
from assistant.turn import COMPLETE, INCOMPLETE, UNSURE, RuleTurnDetector, TurnWindows
from tests.conftest import silence, tone
from tests.test_llm_stream import ScriptedModel
from tests.test_session import WordsTranscriber, kinds, make

SEMANTIC = TurnDetection(type="semantic_vad", complete_silence_ms=250, incomplete_silence_ms=1200)


class SaysTranscriber(WordsTranscriber):
    """Hears the same words in any audio."""

    def __init__(self, text: str) -> None:
        super().__init__()
        self._text = text

    def transcribe_many(self, audios: Sequence[Audio], *, language: str | None, task: str = "transcribe",
                        timestamps: bool = True) -> list[Transcript]:  # fmt: skip
        self.calls.extend(audio.duration_s for audio in audios)
        return [Transcript(self._text, "en", (), audio.duration_s) for audio in audios]


async def feed(session: VoiceSession, samples: np.ndarray) -> None:
    """Push ``samples`` in 100 ms pieces, letting the event loop run between them."""
    for start in range(0, len(samples), 1600):
        await session.push_audio(samples[start : start + 1600])
        await asyncio.sleep(0)


async def until(condition: Callable[[], bool], timeout_s: float = 10.0) -> None:
    deadline = time.monotonic() + timeout_s
    while not condition():
        assert time.monotonic() < deadline, "timed out"
        await asyncio.sleep(0.005)


def slow(model: ScriptedModel, seconds: float = 0.002) -> ScriptedModel:
    model.on_token = lambda index: time.sleep(seconds)
    return model


async def reply_started_in_a_pause(model: ScriptedModel) -> tuple[VoiceSession, list[SessionEvent]]:
    """A second of speech, then 0.3 s of pause: the reply is being generated, before the 500 ms window ended."""
    session, events = make(model)
    await feed(session, np.concatenate([silence(0.3), tone(1.0), silence(0.3)]))
    await until(lambda: len(model.prompts) == 1)
    return session, events


def outcomes(events: list[SessionEvent]) -> list[str]:
    return [event.outcome for event in events if isinstance(event, SpeculationDone)]


def test_the_reply_starts_in_the_pause_and_streams_only_once_the_turn_ends() -> None:
    model = slow(ScriptedModel("Paris is the capital of France."))

    async def scenario() -> tuple[VoiceSession, list[SessionEvent], list[str]]:
        session, events = await reply_started_in_a_pause(model)
        await asyncio.sleep(0.2)  # and held: nothing of it is sent
        before = kinds(events)
        await feed(session, silence(0.5))
        await session.drain()
        return session, events, before

    session, events, before = asyncio.run(scenario())
    assert before == ["SpeechStarted"], "a reply started in the pause sends nothing before the turn ends"
    order = kinds(events)
    assert order[:5] == ["SpeechStarted", "SpeechStopped", "TranscriptFinal", "ItemAdded", "SpeculationDone"]
    assert outcomes(events) == ["used"] and len(model.prompts) == 1  # one generation, no second prefill
    assert "".join(e.delta for e in events if isinstance(e, ReplyTextDelta)) == "Paris is the capital of France."
    done = events[-1]
    assert isinstance(done, ReplyDone) and done.status == "completed" and done.metrics is not None
    assert done.metrics.preemptive and done.metrics.asr_start_ms is not None and done.metrics.asr_start_ms < 0.5e3
    assert session.chat.conversation.turns == [Message("user", "one two"),
                                               Message("assistant", "Paris is the capital of France.")]  # fmt: skip


def test_a_pause_that_resumes_is_one_turn_and_its_speculation_leaves_no_trace() -> None:
    model = slow(ScriptedModel("Four words, heard."))

    async def scenario() -> tuple[VoiceSession, list[SessionEvent]]:
        session, events = await reply_started_in_a_pause(model)
        await feed(session, np.concatenate([tone(1.0), silence(0.8)]))  # the user goes on, then stops
        await session.drain()
        return session, events

    session, events = asyncio.run(scenario())
    finals = [e for e in events if isinstance(e, TranscriptFinal)]
    assert [e.text for e in finals] == ["one two three four"], "a mid-sentence pause never splits a turn"
    assert kinds(events).count("SpeechStopped") == 1 and kinds(events).count("ReplyStarted") == 1
    assert outcomes(events)[0] == "cancelled" and set(outcomes(events)[1:]) <= {"used"}
    assert "one two<" in model.prompts[0].replace("<|im_end|>", "<")  # the speculation answered the first half
    added = [e.message for e in events if isinstance(e, ItemAdded)]
    assert added == [Message("user", "one two three four"), Message("assistant", "Four words, heard.")]
    assert session.chat.conversation.turns == added


def test_a_change_to_the_conversation_in_the_pause_wastes_the_speculation() -> None:
    model = slow(ScriptedModel("Arr."))

    async def scenario() -> tuple[VoiceSession, list[SessionEvent]]:
        session, events = await reply_started_in_a_pause(model)
        session.chat.conversation.system = "You are a pirate."  # what session.update instructions does
        await feed(session, silence(0.5))
        await session.drain()
        return session, events

    session, events = asyncio.run(scenario())
    assert outcomes(events) == ["wasted"] and len(model.prompts) == 2 and "pirate" in model.prompts[1]
    assert kinds(events).count("ReplyStarted") == 1
    assert session.chat.conversation.turns == [Message("user", "one two"), Message("assistant", "Arr.")]


def test_barge_in_cancels_an_adopted_reply_at_once() -> None:
    model = slow(ScriptedModel("word " * 400), 0.05)

    async def scenario() -> tuple[VoiceSession, list[SessionEvent]]:
        session, events = make(model)
        await feed(session, np.concatenate([silence(0.3), tone(1.0), silence(0.8)]))
        await until(lambda: any(isinstance(e, ReplyTextDelta) for e in events))
        await asyncio.sleep(1.6)  # the reply has been read for a while: new speech is a new turn (RESUME_S)
        await feed(session, np.concatenate([tone(0.6), silence(0.8)]))
        await session.drain()
        return session, events

    session, events = asyncio.run(scenario())
    first = next(e for e in events if isinstance(e, ReplyDone))
    assert first.status == "cancelled" and first.reason == "turn_detected"
    assert session.chat.conversation.turns[1].cut and session.chat.conversation.turns[2].role == "user"


@pytest.mark.parametrize(("said", "silence_s", "ends"), [
    ("What time is it?", 0.35, True),  # finished: 250 ms of silence ends it
    ("I would like to order a pizza and", 0.9, False),  # unfinished: 1200 ms
    ("I would like to order a pizza and", 1.5, True),
])  # fmt: skip
def test_the_silence_that_ends_a_turn_follows_what_was_said(said: str, silence_s: float, ends: bool) -> None:
    model = ScriptedModel("Noted.")

    async def scenario() -> bool:
        session, events = make(model, transcriber=SaysTranscriber(said), turn_detection=SEMANTIC)
        session._services.turn_detector = RuleTurnDetector()
        await feed(session, np.concatenate([silence(0.3), tone(1.0), silence(0.25)]))
        await until(lambda: bool(model.prompts) or any(isinstance(e, SpeechStopped) for e in events))
        await feed(session, silence(silence_s - 0.25))
        await asyncio.sleep(0.2)
        ended = any(isinstance(e, SpeechStopped) for e in events)
        await session.close()
        return ended

    assert asyncio.run(scenario()) == ends


def test_server_vad_keeps_its_fixed_window_whatever_was_said() -> None:
    async def scenario() -> list[SessionEvent]:
        session, events = make(ScriptedModel("Noted."), transcriber=SaysTranscriber("What time is it?"))
        session._services.turn_detector = RuleTurnDetector()
        await feed(session, np.concatenate([silence(0.3), tone(1.0), silence(0.35)]))
        await asyncio.sleep(0.3)
        await session.close()
        return events

    assert not any(isinstance(e, SpeechStopped) for e in asyncio.run(scenario()))


@pytest.mark.parametrize(("text", "verdict"), [
    ("What is the capital of France?", COMPLETE), ("Tell me a joke.", COMPLETE), ("Where are you from?", COMPLETE),
    ("Yes I can.", COMPLETE), ("I went to the shop and", INCOMPLETE), ("I went out and.", INCOMPLETE),
    ("Tell me about", INCOMPLETE), ("Well, um...", INCOMPLETE), ("So the thing is,", INCOMPLETE),
    ("今天天气怎么样？", COMPLETE), ("我想去北京因为", INCOMPLETE), ("我明天要去，", INCOMPLETE), ("今天天气", UNSURE),
    ("", UNSURE), ("I would like to know", INCOMPLETE), ("123", UNSURE),
])  # fmt: skip
def test_rule_detector_reads_english_and_chinese(text: str, verdict: float) -> None:
    assert RuleTurnDetector().end_probability(text, None) == verdict


def test_windows_map_the_verdict_to_silence_and_never_below_or_above_the_plain_window() -> None:
    windows = TurnWindows(complete_ms=250, base_ms=500, incomplete_ms=1200)
    assert [windows.silence_ms(p) for p in (COMPLETE, UNSURE, INCOMPLETE)] == [250, 500, 1200]
    assert TurnWindows(800, 500, 300).silence_ms(COMPLETE) == 500 and TurnWindows(800, 500, 300).silence_ms(0.0) == 500
    high = dataclasses_replace(SEMANTIC, eagerness="high").windows()
    assert high is not None and high.complete_ms < 250 and SEMANTIC.windows() == windows
    assert TurnDetection().windows() is None  # server_vad: fixed


def dataclasses_replace(detection: TurnDetection, **changes: object) -> TurnDetection:
    import dataclasses

    return dataclasses.replace(detection, **changes)  # type: ignore[arg-type]


def test_the_first_clause_of_a_long_first_sentence_is_spoken_before_the_sentence_ends() -> None:
    from tests.test_session import FakeSpeech

    speech = FakeSpeech()

    async def scenario() -> list[SessionEvent]:
        session, events = make(ScriptedModel("The capital of France, as you know, is Paris. It is big."),
                               speech=speech)  # fmt: skip
        await session.add_message(Message("user", "Capital of France?"))
        await session.respond()
        await session.drain()
        return events

    events = asyncio.run(scenario())
    assert speech.sentences == ["The capital of France,", "as you know, is Paris.", "It is big."]
    done = events[-1]
    assert isinstance(done, ReplyDone) and done.text == "The capital of France, as you know, is Paris. It is big."


@pytest.mark.parametrize(("text", "clause"), [
    ("The capital of France, which is Paris", "The capital of France,"), ("Well, I", None),
    ("The number 1,000 is big", None), ("北京是中国的首都，也是", "北京是中国的首都，"), ("好的，", None),
])  # fmt: skip
def test_first_clause(text: str, clause: str | None) -> None:
    from assistant.tts.base import first_clause

    found = first_clause(text)
    assert (found[0] if found else None) == clause


def test_speech_resumed_before_the_reply_was_heard_joins_the_turn_it_continues() -> None:
    """The end of turn took a hesitation for the end: the user goes on before any of the reply was heard. The reply
    to the fragment is cancelled and leaves the history; the two utterances are one user message, answered once."""
    from tests.test_session import FakeSpeech

    model = slow(ScriptedModel("Both halves, heard."), 0.01)

    async def scenario() -> tuple[VoiceSession, list[SessionEvent]]:
        session, events = make(model, speech=FakeSpeech())
        await feed(session, np.concatenate([silence(0.3), tone(1.0), silence(0.7)]))  # over the 500 ms window
        await until(lambda: any(isinstance(e, ReplyTextDelta) for e in events))
        await feed(session, np.concatenate([tone(1.0), silence(0.8)]))
        await session.drain()
        return session, events

    session, events = asyncio.run(scenario())
    dones = [e for e in events if isinstance(e, ReplyDone)]
    assert [d.status for d in dones] == ["cancelled", "completed"]
    assert session.chat.conversation.turns == [Message("user", "one two one two"),
                                               Message("assistant", "Both halves, heard.")]  # fmt: skip
    assert dones[0].item_id not in session.items and len(session.items) == 2


def test_speech_after_the_reply_was_heard_is_a_new_turn() -> None:
    from tests.test_session import Clock, FakeSpeech

    clock = Clock()
    model = ScriptedModel("Heard.")

    async def scenario() -> VoiceSession:
        session, events = make(model, speech=FakeSpeech(), clock=clock)
        await feed(session, np.concatenate([silence(0.3), tone(1.0), silence(0.7)]))
        await until(lambda: any(isinstance(e, ReplyDone) for e in events))
        clock.now += 1.0  # the reply has played for a second
        await feed(session, np.concatenate([tone(1.0), silence(0.8)]))
        await session.drain()
        return session

    turns = asyncio.run(scenario()).chat.conversation.turns
    assert [t.role for t in turns] == ["user", "assistant", "user", "assistant"] and turns[0].content == "one two"


class ListedTranscriber(WordsTranscriber):
    """Hears the given texts, one per final recognition, slowly (the turn is still being recognised when the user
    goes on)."""

    def __init__(self, texts: list[str], delay_s: float = 0.4) -> None:
        super().__init__()
        self._texts, self._delay_s = texts, delay_s

    def transcribe_many(self, audios: Sequence[Audio], *, language: str | None, task: str = "transcribe",
                        timestamps: bool = True) -> list[Transcript]:  # fmt: skip
        time.sleep(self._delay_s)
        return [Transcript(self._texts.pop(0), "en", (), audio.duration_s) for audio in audios]


@pytest.mark.parametrize(("heard", "asked"), [
    (["I would like to know", "the capital of France."], "I would like to know the capital of France."),
    (["I would like to know", ""], "I would like to know"),  # the rest was noise: the first part is answered
])  # fmt: skip
def test_speech_that_resumes_before_the_turn_is_answered_joins_it(heard: list[str], asked: str) -> None:
    model = ScriptedModel("Paris.")

    async def scenario() -> VoiceSession:
        session, _ = make(model, transcriber=ListedTranscriber(list(heard)), preemptive=False)
        await feed(session, np.concatenate([silence(0.3), tone(1.0), silence(0.6), tone(1.0), silence(0.8)]))
        await session.drain()
        return session

    session = asyncio.run(scenario())
    assert session.chat.conversation.turns == [Message("user", asked), Message("assistant", "Paris.")]
    assert len(model.prompts) == 1  # answered once
