"""The voice session core with fakes: typed and spoken turns, voice out, partial transcripts, barge-in and truncation
to what was heard, failures that fail one turn, item edits. No models, no sockets: the real ModelWorker threads."""

from __future__ import annotations

import asyncio
import threading
import time
from collections.abc import Sequence

import numpy as np
import pytest

from assistant.asr.base import Transcriber
from assistant.chat import ChatSession
from assistant.config import VadConfig
from assistant.conversation import Conversation
from assistant.errors import ConfigError, ConversationError
from assistant.messages import (
    Audio,
    ItemAdded,
    ItemDeleted,
    ItemTruncated,
    Message,
    ReplyAudio,
    ReplyDone,
    ReplyStarted,
    ReplyTextDelta,
    SessionError,
    SessionEvent,
    SpeechStarted,
    SpeechStopped,
    Transcript,
    TranscriptFinal,
    TranscriptPartial,
)
from assistant.session import ResponseOptions, Services, SessionOptions, TurnDetection, VoiceSession
from assistant.worker import ModelWorker
from tests.conftest import silence, tone
from tests.test_endpointing import loudness
from tests.test_llm_stream import PARAMS, ScriptedModel

SENTENCE_S = 1.0  # each fake sentence is spoken in this long


class WordsTranscriber:
    """Hears one word per 0.5 s of sound: 'one two three ...' (partials grow as the utterance grows)."""

    description = "words"
    batch_size = 1
    WORDS = "one two three four five six seven eight nine ten".split()

    def __init__(self, *, delay_s: float = 0.0) -> None:
        self.calls: list[float] = []
        self._delay_s = delay_s

    def supports_language(self, language: str) -> bool:
        return True

    def transcribe_many(self, audios: Sequence[Audio], *, language: str | None, task: str = "transcribe",
                        timestamps: bool = True) -> list[Transcript]:  # fmt: skip
        time.sleep(self._delay_s)
        results = []
        for audio in audios:
            self.calls.append(audio.duration_s)
            windows = audio.samples[: len(audio.samples) // 160 * 160].reshape(-1, 160)  # 10 ms each
            loud = float(np.sum(np.abs(windows).max(axis=1) > 0.05)) / 100
            results.append(Transcript(" ".join(self.WORDS[: int(loud / 0.5)]), "en", (), audio.duration_s))
        return results


class FakeSpeech:
    """One second of tone per sentence; may fail."""

    def __init__(self, *, fail: bool = False) -> None:
        self.sentences: list[str] = []
        self._fail = fail

    def synthesize(self, text: str, *, voice: str | None = None, speed: float | None = None) -> Audio:
        if self._fail:
            raise RuntimeError("the voice model is gone")
        self.sentences.append(text)
        return Audio(tone(SENTENCE_S), 16_000)


class Clock:
    """A clock the test moves by hand (heard audio is measured on it)."""

    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def make(model: ScriptedModel, *, speech: FakeSpeech | None = None, transcriber: WordsTranscriber | None = None,
         clock: Clock | None = None, **options: object) -> tuple[VoiceSession, list[SessionEvent]]:  # fmt: skip
    events: list[SessionEvent] = []

    async def emit(event: SessionEvent) -> None:
        events.append(event)

    services = Services(transcriber or WordsTranscriber(), ModelWorker(16), speech, ModelWorker(16),
                        probability=lambda: loudness)  # fmt: skip
    base = {"modalities": ("audio",) if speech else ("text",), "partial_interval_s": 0.0}
    session_options = SessionOptions(**(base | options))  # type: ignore[arg-type]
    chat = ChatSession(model, Conversation("sys"), PARAMS)
    session = VoiceSession(chat, services, session_options, emit, vad=VadConfig(min_silence_ms=500),
                           clock=clock or time.monotonic)  # fmt: skip
    return session, events


def kinds(events: list[SessionEvent]) -> list[str]:
    return [type(event).__name__ for event in events]


async def speak(session: VoiceSession, seconds: float, *, pause_s: float = 0.8) -> None:
    samples = np.concatenate([silence(0.3), tone(seconds), silence(pause_s)])
    for start in range(0, len(samples), 1600):
        await session.push_audio(samples[start : start + 1600])


def test_typed_turn_streams_a_reply_with_items_in_order() -> None:
    async def scenario() -> tuple[VoiceSession, list[SessionEvent]]:
        session, events = make(ScriptedModel("Paris."))
        user = await session.add_message(Message("user", "Capital of France?"))
        await session.respond()
        await session.drain()
        assert session.items[0] == user
        return session, events

    session, events = asyncio.run(scenario())
    assert kinds(events)[:2] == ["ItemAdded", "ReplyStarted"]
    assert "".join(e.delta for e in events if isinstance(e, ReplyTextDelta)) == "Paris."
    done = events[-1]
    assert isinstance(done, ReplyDone) and done.status == "completed" and done.text == "Paris."
    added = [e for e in events if isinstance(e, ItemAdded)]
    assert [e.message.role for e in added] == ["user", "assistant"] and added[1].previous_item_id == added[0].item_id
    assert session.chat.conversation.turns == [Message("user", "Capital of France?"), Message("assistant", "Paris.")]


def test_spoken_turn_from_server_vad_to_spoken_reply() -> None:
    speech = FakeSpeech()

    async def scenario() -> list[SessionEvent]:
        session, events = make(ScriptedModel("First sentence. Second one! And the rest"), speech=speech)
        await speak(session, 1.6)
        await session.drain()
        return events

    events = asyncio.run(scenario())
    order = kinds(events)
    assert order[:4] == ["SpeechStarted", "SpeechStopped", "TranscriptFinal", "ItemAdded"]
    started, stopped = events[0], events[1]
    assert isinstance(started, SpeechStarted) and isinstance(stopped, SpeechStopped)
    assert started.item_id == stopped.item_id and 0.05 < started.at_s < 0.35
    final = events[2]
    assert isinstance(final, TranscriptFinal) and final.text == "one two three"
    assert speech.sentences == ["First sentence.", "Second one!", "And the rest"]
    assert sum(isinstance(e, ReplyAudio) for e in events) == 3
    done = events[-1]
    assert isinstance(done, ReplyDone) and done.status == "completed" and done.audio_s == pytest.approx(3.0)
    assert done.metrics is not None and done.metrics.speech_end_to_first_audio_ms is not None
    assert done.metrics.speech_end_to_first_audio_ms >= done.metrics.speech_end_to_first_char_ms


def test_barge_in_keeps_only_what_was_heard_of_a_spoken_reply() -> None:
    """The reply is done generating but still playing when the user speaks: the history keeps the sentences heard
    (1.5 of 3 seconds: the first sentence and half of the second, by characters)."""
    clock = Clock()

    async def scenario() -> tuple[VoiceSession, list[SessionEvent]]:
        session, events = make(ScriptedModel("Aaaa aaaa. Bbbb bbbb. Cccc cccc."), speech=FakeSpeech(), clock=clock)
        await session.add_message(Message("user", "talk"))
        await session.respond()
        while not any(isinstance(e, ReplyDone) for e in events):
            await asyncio.sleep(0.01)
        clock.now += 1.5  # the client has played 1.5 s of the 3 s
        await speak(session, 0.6)
        await session.drain()
        return session, events

    session, events = asyncio.run(scenario())
    truncated = [e for e in events if isinstance(e, ItemTruncated)]
    assert len(truncated) == 1 and truncated[0].audio_end_ms == 1500
    reply = session.chat.conversation.turns[1]
    assert reply == Message("assistant", "Aaaa aaaa. Bbbb", cut=True)
    assert session.chat.conversation.turns[2].role == "user"


def test_cancel_mid_generation_stops_the_text_and_the_speech() -> None:
    model = ScriptedModel("One. Two. Three. " * 30)
    model.on_token = lambda index: time.sleep(0.005)
    speech = FakeSpeech()
    clock = Clock()

    async def scenario() -> tuple[VoiceSession, list[SessionEvent]]:
        session, events = make(model, speech=speech, clock=clock)
        await session.add_message(Message("user", "count"))
        await session.respond()
        while sum(isinstance(e, ReplyAudio) for e in events) < 2:
            await asyncio.sleep(0.01)
        clock.now += 1.0  # the first sentence has been heard
        assert session.cancel()
        await session.drain()
        return session, events

    session, events = asyncio.run(scenario())
    done = next(e for e in events if isinstance(e, ReplyDone))
    assert done.status == "cancelled" and done.reason == "client_cancelled"
    assert len(speech.sentences) < 30
    reply = session.chat.conversation.turns[-1]
    assert reply == Message("assistant", "One.", cut=True)
    assert not any(isinstance(e, ReplyAudio) for e in events[events.index(done) :])


def test_truncate_by_the_client_and_its_bad_values() -> None:
    clock = Clock()

    async def scenario() -> tuple[VoiceSession, list[SessionEvent]]:
        session, events = make(ScriptedModel("Aaaa. Bbbb."), speech=FakeSpeech(), clock=clock)
        await session.add_message(Message("user", "talk"))
        await session.respond()
        await session.drain()
        reply_id = session.items[1]
        with pytest.raises(ConfigError, match="beyond the 2000 ms"):
            await session.truncate(reply_id, 5000)
        with pytest.raises(ConfigError, match="is not a spoken reply"):
            await session.truncate(session.items[0], 0)
        with pytest.raises(ConfigError, match="no conversation item 'nope'"):
            await session.truncate("nope", 0)
        await session.truncate(reply_id, 1000)
        return session, events

    session, events = asyncio.run(scenario())
    assert isinstance(events[-1], ItemTruncated) and events[-1].audio_end_ms == 1000
    assert session.chat.conversation.turns[1] == Message("assistant", "Aaaa.", cut=True)


def test_a_failing_voice_still_completes_the_text_reply() -> None:
    async def scenario() -> list[SessionEvent]:
        session, events = make(ScriptedModel("Hello there. Bye."), speech=FakeSpeech(fail=True))
        await session.add_message(Message("user", "hi"))
        await session.respond()
        await session.drain()
        return events

    events = asyncio.run(scenario())
    errors = [e for e in events if isinstance(e, SessionError)]
    assert len(errors) == 1 and "tts: the reply cannot be spoken" in str(errors[0].error)
    done = events[-1]
    assert isinstance(done, ReplyDone) and done.status == "completed" and done.text == "Hello there. Bye."


def test_a_failing_reply_takes_its_user_message_back_out() -> None:
    async def scenario() -> tuple[VoiceSession, list[SessionEvent]]:
        session, events = make(ScriptedModel("broken reply", fail_after=3))
        await session.add_message(Message("user", "hi"))
        await session.respond()
        await session.drain()
        return session, events

    session, events = asyncio.run(scenario())
    user = next(e for e in events if isinstance(e, ItemAdded))
    assert any(isinstance(e, ItemDeleted) and e.item_id == user.item_id for e in events)
    done = events[-1]
    assert isinstance(done, ReplyDone) and done.status == "failed" and "out of memory" in str(done.error)
    assert session.chat.conversation.turns == [] and session.items == [] and session.failures == 1


def spoken_at_pace(transcriber: Transcriber, speech_s: float) -> list[SessionEvent]:
    """A tone of ``speech_s`` between short silences, pushed in 100 ms pieces at about speaking pace (the worker has
    time for partials), with partials every 0.5 s; the session's events."""

    async def scenario() -> list[SessionEvent]:
        session, events = make(ScriptedModel("ok"), transcriber=transcriber, partial_interval_s=0.5)
        samples = np.concatenate([silence(0.3), tone(speech_s), silence(0.8)])
        for start in range(0, len(samples), 1600):
            await session.push_audio(samples[start : start + 1600])
            await asyncio.sleep(0.02)
        await session.drain()
        return events

    return asyncio.run(scenario())


def test_partial_transcripts_grow_without_taking_words_back_and_the_last_one_is_final() -> None:
    transcriber = WordsTranscriber()

    events = spoken_at_pace(transcriber, 3.2)
    partials = [e for e in events if isinstance(e, TranscriptPartial)]
    assert len(partials) >= 4
    said = "".join(p.delta for p in partials)
    final = next(e for e in events if isinstance(e, TranscriptFinal))
    assert final.text == "one two three four five six"
    assert final.text.startswith(said.strip()) and said.strip()  # agreed words only, never taken back
    assert all(p.text == " ".join(WordsTranscriber.WORDS[: len(p.text.split())]) for p in partials)
    assert len(transcriber.calls) == len(partials) + 1 or len(transcriber.calls) == len(partials)


def test_no_partials_while_the_worker_is_busy() -> None:
    transcriber = WordsTranscriber()

    async def scenario() -> list[SessionEvent]:
        session, events = make(ScriptedModel("ok"), transcriber=transcriber, partial_interval_s=0.5)
        busy = threading.Event()
        session._services.worker.submit(lambda: busy.wait(10))  # another session's long job
        await speak(session, 2.0)
        busy.set()
        await session.drain()
        return events

    events = asyncio.run(scenario())
    assert not any(isinstance(e, TranscriptPartial) for e in events)
    assert len(transcriber.calls) == 1


def test_manual_commits_noise_and_response_create() -> None:
    async def scenario() -> tuple[VoiceSession, list[SessionEvent]]:
        session, events = make(ScriptedModel("ok"), turn_detection=None)
        with pytest.raises(ConfigError, match="the buffer is empty"):
            await session.commit()
        await session.push_audio(silence(1.0))
        await session.commit()  # noise: a transcript of nothing, no turn
        await session.push_audio(tone(1.1))
        await session.commit()
        await session.drain()
        assert not any(isinstance(e, ReplyStarted) for e in events)  # manual turns wait for response.create
        await session.respond()
        await session.drain()
        return session, events

    session, events = asyncio.run(scenario())
    finals = [e.text for e in events if isinstance(e, TranscriptFinal)]
    assert finals == ["", "one two"]
    assert [m.content for m in session.chat.conversation.turns] == ["one two", "ok"]


def test_items_can_be_deleted_and_create_response_off_waits_for_response_create() -> None:
    async def scenario() -> tuple[VoiceSession, list[SessionEvent]]:
        detection = TurnDetection(create_response=False)
        session, events = make(ScriptedModel("ok"), turn_detection=detection)
        await speak(session, 1.1)
        await session.drain()
        assert not any(isinstance(e, ReplyStarted) for e in events)
        await session.respond(ResponseOptions(max_output_tokens=1))
        await session.drain()
        await session.delete(session.items[0])
        with pytest.raises(ConfigError, match="no conversation item"):
            await session.delete("item_gone")
        return session, events

    session, events = asyncio.run(scenario())
    done = next(e for e in events if isinstance(e, ReplyDone))
    assert done.status == "incomplete" and done.reason == "max_output_tokens"
    assert isinstance(events[-1], ItemDeleted)
    assert [m.role for m in session.chat.conversation.turns] == ["assistant"]


def test_truncate_of_the_reply_in_progress_stops_it_where_the_client_stopped_playing() -> None:
    model = ScriptedModel("Aaaa. Bbbb. " * 40)
    model.on_token = lambda index: time.sleep(0.005)
    clock = Clock()

    async def scenario() -> tuple[VoiceSession, list[SessionEvent]]:
        session, events = make(model, speech=FakeSpeech(), clock=clock)
        await session.add_message(Message("user", "talk"))
        await session.respond()
        started = next(e for e in await _until(events, ReplyAudio) if isinstance(e, ReplyStarted))
        await session.truncate(started.item_id, 500)  # the client played half of the first sentence, then stopped
        await session.drain()
        return session, events

    session, events = asyncio.run(scenario())
    done = next(e for e in events if isinstance(e, ReplyDone))
    assert done.status == "cancelled"
    assert [e.audio_end_ms for e in events if isinstance(e, ItemTruncated)][-1] == 500
    assert session.chat.conversation.turns[-1] == Message("assistant", "Aa", cut=True)


def test_a_full_speech_worker_leaves_the_reply_as_text() -> None:
    async def scenario() -> list[SessionEvent]:
        session, events = make(ScriptedModel("One. Two. Three."), speech=FakeSpeech())
        full = ModelWorker(1)
        blocker, running = threading.Event(), threading.Event()
        full.submit(lambda: (running.set(), blocker.wait(10)))
        assert running.wait(5)
        full.submit(lambda: None)  # waiting: the queue is full
        session._services.speech_worker = full
        await session.add_message(Message("user", "count"))
        await session.respond()
        await session.drain()
        blocker.set()
        return events

    events = asyncio.run(scenario())
    errors = [e for e in events if isinstance(e, SessionError)]
    assert len(errors) == 1 and "busy" in str(errors[0].error)
    done = events[-1]
    assert isinstance(done, ReplyDone) and done.status == "completed" and done.text == "One. Two. Three."


def test_vad_times_count_from_the_start_of_the_session_after_a_clear() -> None:
    async def scenario() -> list[SessionEvent]:
        session, events = make(ScriptedModel("ok"))
        await session.push_audio(silence(2.0))
        session.clear_audio()
        await speak(session, 0.6)
        await session.drain()
        return events

    events = asyncio.run(scenario())
    started = next(e for e in events if isinstance(e, SpeechStarted))
    assert 2.05 < started.at_s < 2.35


async def _until(events: list[SessionEvent], kind: type, timeout: float = 10) -> list[SessionEvent]:
    async with asyncio.timeout(timeout):
        while not any(isinstance(e, kind) for e in events):
            await asyncio.sleep(0.01)
    return events


def test_the_pause_that_ends_a_turn_is_used_to_recognise_it() -> None:
    """Once the pause has settled the utterance (speech_pad_ms into it), its recognition starts: when the silence
    window closes the transcript is (nearly) ready, and the recogniser ran once."""
    transcriber = WordsTranscriber(delay_s=0.3)

    async def scenario() -> list[SessionEvent]:
        session, events = make(ScriptedModel("ok"), transcriber=transcriber)
        samples = np.concatenate([silence(0.3), tone(1.1), silence(1.0)])
        for start in range(0, len(samples), 1600):  # at speaking pace
            await session.push_audio(samples[start : start + 1600])
            await asyncio.sleep(0.1)
        await session.drain()
        return events

    events = asyncio.run(scenario())
    final = next(e for e in events if isinstance(e, TranscriptFinal))
    assert final.text == "one two" and len(transcriber.calls) == 1
    assert final.latency_ms < 500 + 250  # silence window + scheduling; without it: window + 300 ms of recognition


def test_a_refused_truncate_leaves_the_reply_in_progress_alone() -> None:
    model = ScriptedModel("Aaaa. Bbbb. " * 20)
    model.on_token = lambda index: time.sleep(0.005)

    async def scenario() -> list[SessionEvent]:
        session, events = make(model, speech=FakeSpeech())
        await session.add_message(Message("user", "talk"))
        await session.respond()
        started = next(e for e in await _until(events, ReplyAudio) if isinstance(e, ReplyStarted))
        with pytest.raises(ConfigError, match="ms of audio so far"):
            await session.truncate(started.item_id, 60_000)
        await session.drain()
        return events

    events = asyncio.run(scenario())
    assert next(e for e in events if isinstance(e, ReplyDone)).status == "incomplete"  # max tokens, not cancelled


def test_a_huge_max_output_tokens_is_bounded_by_the_context() -> None:
    """Clients send 4096 or "inf": the reply ends at the context's end instead of failing as prompt-too-long."""

    async def scenario() -> list[SessionEvent]:
        session, events = make(ScriptedModel("Fine."))
        await session.add_message(Message("user", "hi"))
        await session.respond(ResponseOptions(max_output_tokens=1_000_000_000))
        await session.drain()
        return events

    done = asyncio.run(scenario())[-1]
    assert isinstance(done, ReplyDone) and done.status == "completed" and done.text == "Fine."


class QuickWordsTranscriber(WordsTranscriber):
    """With a quick pass for partials (the PartialTranscriber protocol), like faster-whisper's."""

    def __init__(self) -> None:
        super().__init__()
        self.quick: list[float] = []

    def transcribe_partial(self, audio: Audio, *, language: str | None) -> Transcript:
        self.quick.append(audio.duration_s)
        return self.transcribe_many([audio], language=language)[0]


def test_partials_use_the_quick_pass_and_the_final_never_does() -> None:
    transcriber = QuickWordsTranscriber()

    events = spoken_at_pace(transcriber, 2.6)
    partials = [e for e in events if isinstance(e, TranscriptPartial)]
    assert len(partials) >= 3 and len(transcriber.quick) >= len(partials)
    assert len(transcriber.calls) - len(transcriber.quick) == 1  # one full pass: the final (or its settled pause)
    assert next(e for e in events if isinstance(e, TranscriptFinal)).text == "one two three four five"


def test_a_cut_reply_is_continued_in_its_own_item() -> None:
    """response.continue (this server's addition): the deltas extend the last reply's item; nothing to continue
    when the last message is not a reply."""

    async def scenario() -> tuple[VoiceSession, list[SessionEvent]]:
        session, events = make(ScriptedModel(" and more."))
        with pytest.raises(ConversationError, match="nothing to continue"):
            await session.respond(ResponseOptions(extend=True))
        await session.add_message(Message("user", "Tell me."))
        await session.add_message(Message("assistant", "Once upon a time", cut=True))
        await session.respond(ResponseOptions(extend=True))
        await session.drain()
        return session, events

    session, events = asyncio.run(scenario())
    reply_item = session.items[-1]
    started = next(e for e in events if isinstance(e, ReplyStarted))
    assert started.item_id == reply_item and len(session.items) == 2  # no new item
    done = events[-1]
    assert isinstance(done, ReplyDone) and done.status == "completed" and done.text == "Once upon a time and more."
    assert session.chat.conversation.turns[-1] == Message("assistant", "Once upon a time and more.")
    assert not [e for e in events if isinstance(e, ItemAdded) and e.item_id == reply_item and e.message.content
                == "Once upon a time and more."]  # fmt: skip
