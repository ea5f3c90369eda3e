"""The voice turn loop with fakes: turns, barge-in, noise, failing stages, a vanishing microphone."""

from __future__ import annotations

import importlib.util
import threading
import time
from collections.abc import Iterator, Sequence

import numpy as np
import pytest

from assistant.chat import ChatSession
from assistant.cli import _input_source
from assistant.config import Config, VadConfig, load_config
from assistant.conversation import Conversation
from assistant.endpointing import Endpointer
from assistant.errors import AudioSourceError
from assistant.messages import Audio, EndOfRecording, Message, Transcript, TurnMetrics
from assistant.voice import VoiceChat
from tests.conftest import silence, tone
from tests.test_endpointing import loudness
from tests.test_llm_stream import PARAMS, ScriptedModel


class ListTranscriber:
    """Hears each utterance as the next text of a list (an Exception item raises)."""

    description = "list"
    batch_size = 1

    def __init__(self, texts: Sequence[str | Exception]) -> None:
        self._texts = list(texts)

    def supports_language(self, language: str) -> bool:
        return True

    def transcribe_many(self, audios: Sequence[Audio], *, language: str | None, task: str = "transcribe",
                        timestamps: bool = True) -> list[Transcript]:  # fmt: skip
        item = self._texts.pop(0)
        if isinstance(item, Exception):
            raise item
        return [Transcript(item, "en", (), audios[0].duration_s)]


class Recorder:
    def __init__(self) -> None:
        self.events: list[tuple[str, object]] = []
        self.text_seen = threading.Event()  # some reply text reached the console

    def partial(self, text: str) -> None:
        self.events.append(("partial", text))

    def transcript(self, text: str) -> None:
        self.events.append(("transcript", text))

    def delta(self, text: str) -> None:
        self.text_seen.set()

    def audio(self, audio: Audio) -> None:
        self.events.append(("audio", audio))

    def interrupted(self) -> None:
        pass

    def turn_done(self, transcript: str, reply: str, metrics: TurnMetrics) -> None:
        self.events.append(("done", metrics))

    def error(self, message: str) -> None:
        self.events.append(("error", message))

    def notice(self, message: str) -> None:
        self.events.append(("notice", message))


class ScriptedSource:
    """Plays phrases; with ``wait_for`` set, the later phrases start only once a reply is streaming."""

    def __init__(self, phrases: int, *, live: bool = True, fail_after: int | None = None,
                 pause_s: float = 2.0) -> None:  # fmt: skip
        self.live = live
        self.wait_for: threading.Event | None = None
        self._phrases = phrases
        self._fail_after = fail_after
        self._pause_s = pause_s  # after each phrase: over session.RESUME_S, so the next one is a turn of its own

    def chunks(self) -> Iterator[np.ndarray | EndOfRecording | Exception]:
        for index in range(self._phrases):
            if index == self._fail_after:
                raise AudioSourceError("the microphone 'USB mic' stopped delivering audio")
            if index > 0 and self.wait_for is not None:
                assert self.wait_for.wait(10)
            yield np.concatenate([tone(0.6), silence(self._pause_s)])

    def close(self) -> None:
        pass


def voice(source: ScriptedSource, texts: Sequence[str | Exception], model: ScriptedModel) -> tuple[VoiceChat, Recorder]:
    recorder = Recorder()
    segmenter = Endpointer(loudness, VadConfig(min_silence_ms=500), max_utterance_s=30)
    chat = ChatSession(model, Conversation(), PARAMS)
    return VoiceChat(source, segmenter, ListTranscriber(texts), chat, [recorder], config=Config()), recorder


def test_each_utterance_is_a_turn_with_metrics() -> None:
    chat, recorder = voice(ScriptedSource(2), ["hello", "how are you"], ScriptedModel("fine"))
    assert chat.run() == 0 and chat.turns == 2
    assert [e[1] for e in recorder.events if e[0] == "transcript"] == ["hello", "how are you"]
    metrics = [e[1] for e in recorder.events if e[0] == "done"]
    assert all(isinstance(m, TurnMetrics) and m.speech_end_to_first_char_ms >= m.speech_end_to_transcript_ms
               for m in metrics)  # fmt: skip
    assert 0.75 < metrics[0].audio_s < 0.9  # 0.6 s of speech + 200 ms of padding after it
    assert [m.role for m in chat.session.conversation.turns] == ["user", "assistant"] * 2


def test_speaking_over_a_reply_cuts_it_and_takes_the_new_turn() -> None:
    model = ScriptedModel("a long answer " * 40)
    model.on_token = lambda index: time.sleep(0.01)  # 560 tokens: several seconds if nobody interrupts
    source = ScriptedSource(2)
    chat, recorder = voice(source, ["tell me everything", "stop, what time is it"], model)
    source.wait_for = recorder.text_seen  # the user has seen the reply begin, then speaks
    started = time.monotonic()
    assert chat.run() == 0
    assert time.monotonic() - started < 4
    first, second = [e[1] for e in recorder.events if e[0] == "done"]
    assert first.cut and not second.cut
    turns = chat.session.conversation.turns
    assert turns[1].cut and turns[2] == Message("user", "stop, what time is it")


def test_files_played_fast_are_not_barge_ins() -> None:
    model = ScriptedModel("answer " * 20)
    model.on_token = lambda index: time.sleep(0.002)
    chat, recorder = voice(ScriptedSource(3, live=False), ["one", "two", "three"], model)
    assert chat.run() == 0
    assert [m.cut for kind, m in recorder.events if kind == "done"] == [False, False, False]


def test_noise_takes_no_turn_and_a_failing_stage_fails_only_its_turn() -> None:
    texts = ["", RuntimeError("CUDA error: device-side assert"), "still here"]
    chat, recorder = voice(ScriptedSource(3), texts, ScriptedModel("yes"))
    assert chat.run() == 1
    kinds = [kind for kind, _ in recorder.events]
    assert kinds == ["notice", "error", "transcript", "done"]
    assert "asr-failed: transcription failed: RuntimeError" in str(recorder.events[1][1])
    assert [m.content for m in chat.session.conversation.turns] == ["still here", "yes"]


def test_a_backend_failing_mid_reply_fails_that_turn_only() -> None:
    # not live: the second phrase must not barge in on the first reply before it fails
    model = ScriptedModel("broken reply", fail_after=3)
    chat, recorder = voice(ScriptedSource(2, live=False), ["first", "second"], model)
    assert chat.run() == 2
    assert [kind for kind, _ in recorder.events] == ["transcript", "error", "transcript", "error"]
    assert chat.session.conversation.turns == []


def test_a_vanishing_microphone_ends_listening_with_a_clear_error() -> None:
    chat, recorder = voice(ScriptedSource(3, fail_after=1), ["one"], ScriptedModel("ok"))
    chat.run()
    assert chat.turns == 1 and chat.source_error is not None
    # reported at once; the turn already heard is still answered
    assert ("error", "audio-source: the microphone 'USB mic' stopped delivering audio") in recorder.events
    assert recorder.events[-1][0] == "done"


def test_auto_source_falls_back_to_typing_without_a_microphone(capsys: pytest.CaptureFixture[str]) -> None:
    if importlib.util.find_spec("sounddevice") is None:
        pytest.skip("sounddevice is not installed")
    config = load_config(overrides=["input.device=no-such-microphone"])
    assert _input_source(config, None, interactive=True) == "text"
    assert "audio-source: no microphone: 'no-such-microphone' not found" in capsys.readouterr().err
    assert _input_source(load_config(), None, interactive=False) == "text"  # piped stdin: scripts type
    assert _input_source(load_config(overrides=["input.source=file"]), ["a.wav"], interactive=True) == "file"
