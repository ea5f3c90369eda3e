"""Streaming: whole characters only, stop strings, and how a chat session commits replies to the history."""

from __future__ import annotations

import threading
from collections.abc import Iterator

import pytest

from assistant.chat import ChatSession
from assistant.config import SamplingConfig
from assistant.conversation import Conversation
from assistant.errors import LlmError, PromptTooLongError
from assistant.llm.base import REPLACEMENT, IncrementalDetokenizer, Reply, StopMatcher, TokenChatModel
from assistant.llm.templates import BUILTIN_TEMPLATES
from assistant.messages import Message
from tests.conftest import byte_level_tokenizer

TEXT = "你好，世界！Hello 北京 🌏 ok"


def test_detokenizer_never_splits_a_character() -> None:
    tokenizer = byte_level_tokenizer()
    ids = tokenizer(TEXT, add_special_tokens=False)["input_ids"]
    assert len(ids) > len(TEXT)  # the CJK characters and the emoji really are split into byte tokens
    detokenizer = IncrementalDetokenizer(lambda chunk: tokenizer.decode(chunk))
    deltas = [detokenizer.push(token) for token in ids] + [detokenizer.flush()]
    assert "".join(deltas) == TEXT
    assert not any(REPLACEMENT in delta for delta in deltas)
    assert "你" in deltas and "🌏" in deltas  # emitted whole, as soon as their last byte arrived


def test_detokenizer_drops_bytes_that_never_become_a_character() -> None:
    tokenizer = byte_level_tokenizer()
    broken = (
        tokenizer("好", add_special_tokens=False)["input_ids"][:2]
        + tokenizer("a", add_special_tokens=False)["input_ids"]
    )
    detokenizer = IncrementalDetokenizer(lambda chunk: tokenizer.decode(chunk))
    text = "".join(detokenizer.push(token) for token in broken) + detokenizer.flush()
    assert text == "a"


@pytest.mark.parametrize(
    ("pieces", "expected"),
    [
        (["Hello", " wor", "ld<|im", "_end|>more"], "Hello world"),
        (["a<", "b"], "a<b"),  # a held-back prefix that turned out not to be a stop string is released
        (["x###", " Instruction:"], "x"),
    ],
)
def test_stop_matcher(pieces: list[str], expected: str) -> None:
    matcher = StopMatcher(["<|im_end|>", "### Instruction:"])
    out = "".join(matcher.feed(piece) for piece in pieces) + matcher.flush()
    assert out == expected


class ScriptedModel(TokenChatModel):
    """A TokenChatModel whose 'sampler' replays the byte tokens of a fixed reply (then the end token)."""

    description = "scripted"

    def __init__(self, reply: str, *, context_tokens: int = 4096, fail_after: int | None = None) -> None:
        self._tokenizer = byte_level_tokenizer()
        self._reply_ids = self._tokenizer(reply, add_special_tokens=False)["input_ids"]
        self._end = self._tokenizer.convert_tokens_to_ids("<|im_end|>")
        self._fail_after = fail_after
        self.context_tokens = context_tokens
        self.template = BUILTIN_TEMPLATES["chatml"]
        self.prompts: list[str] = []
        self.on_token = lambda index: None

    def tokenize(self, text: str) -> list[int]:
        return list(self._tokenizer(text, add_special_tokens=False)["input_ids"])

    def decode(self, ids: list[int]) -> str:
        return str(self._tokenizer.decode(ids, skip_special_tokens=True))

    def is_end(self, token: int) -> bool:
        return token == self._end

    def sample(self, prompt_ids: list[int], params: SamplingConfig, output: object = None) -> Iterator[int]:
        self.prompts.append(self._tokenizer.decode(prompt_ids))
        for index, token in enumerate(self._reply_ids):
            if self._fail_after is not None and index == self._fail_after:
                raise RuntimeError("CUDA out of memory (simulated)")
            self.on_token(index)
            yield token
        while True:
            yield self._end


PARAMS = SamplingConfig(max_new_tokens=64)


def session(model: ScriptedModel) -> ChatSession:
    return ChatSession(model, Conversation("sys"), PARAMS)


def test_reply_streams_and_is_committed() -> None:
    chat = session(ScriptedModel("北京是中国的首都。"))
    reply = chat.send("北京？")
    deltas = list(reply)
    assert "".join(deltas) == "北京是中国的首都。" and not any(REPLACEMENT in d for d in deltas)
    assert reply.stats.finish_reason == "stop" and reply.stats.completion_tokens == len("北京是中国的首都。".encode())
    assert chat.conversation.turns == [Message("user", "北京？"), Message("assistant", "北京是中国的首都。")]


def test_max_new_tokens_ends_with_length() -> None:
    model = ScriptedModel("abcdefghij")
    chat = ChatSession(model, Conversation(), SamplingConfig(max_new_tokens=4))
    reply = chat.send("go")
    assert "".join(reply) == "abcd" and reply.stats.finish_reason == "length"


def test_cancel_event_stops_within_a_token_and_marks_the_reply_cut() -> None:
    model = ScriptedModel("one two three four five six")
    cancel = threading.Event()
    model.on_token = lambda index: cancel.set() if index == 5 else None
    chat = session(model)
    reply = chat.send("count", cancel=cancel)
    text = "".join(reply)
    assert text == "one tw" and reply.stats.finish_reason == "cancelled"  # the token in flight is the last one
    assert chat.conversation.turns[-1] == Message("assistant", "one tw", cut=True)


def test_closing_the_stream_keeps_the_partial_reply_marked_cut() -> None:
    chat = session(ScriptedModel("一二三四五"))
    reply = chat.send("数数")
    assert next(reply) == "一" and next(reply) == "二"
    reply.close()
    assert chat.conversation.turns[-1] == Message("assistant", "一二", cut=True)


def test_ctrl_c_mid_reply_keeps_the_partial_reply_marked_cut() -> None:
    model = ScriptedModel("abcdef")

    def interrupt(index: int) -> None:
        if index == 3:
            raise KeyboardInterrupt

    model.on_token = interrupt
    chat = session(model)
    with pytest.raises(KeyboardInterrupt):
        list(chat.send("go"))
    assert chat.conversation.turns[-1] == Message("assistant", "abc", cut=True)


def test_a_backend_failing_mid_stream_leaves_history_as_before() -> None:
    chat = session(ScriptedModel("first reply"))
    list(chat.send("hello"))
    before = list(chat.conversation.turns)
    chat.model = ScriptedModel("this will break", fail_after=4)
    with pytest.raises(LlmError, match="out of memory"):
        list(chat.send("again"))
    assert chat.conversation.turns == before


def test_prompt_longer_than_the_context_is_refused_before_generating() -> None:
    chat = ChatSession(ScriptedModel("x", context_tokens=100), Conversation(), SamplingConfig(max_new_tokens=10))
    with pytest.raises(PromptTooLongError, match="shorten the message"):
        chat.send("long " * 100)
    assert chat.conversation.turns == []


def test_regenerate_replaces_and_continue_extends() -> None:
    model = ScriptedModel("abc")
    chat = session(model)
    list(chat.send("q"))
    model._reply_ids = model.tokenize("xyz")
    assert "".join(chat.regenerate()) == "xyz"
    assert [m.content for m in chat.conversation.turns] == ["q", "xyz"]
    model._reply_ids = model.tokenize(" more")
    assert "".join(chat.continue_reply()) == " more"
    assert chat.conversation.turns[-1] == Message("assistant", "xyz more")
    assert model.prompts[-1].endswith("<|im_start|>assistant\nxyz")  # continued from where the reply stopped


def test_regenerate_failure_restores_the_previous_reply() -> None:
    chat = session(ScriptedModel("good"))
    list(chat.send("q"))
    chat.model = ScriptedModel("bad", fail_after=0)
    with pytest.raises(LlmError):
        list(chat.regenerate())
    assert chat.conversation.turns[-1] == Message("assistant", "good")


def test_reply_object_collects_text() -> None:
    def produce(reply: Reply) -> Iterator[str]:
        yield from ("a", "b")

    reply = Reply(produce)
    assert list(reply) == ["a", "b"] and reply.text == "ab"


def test_console_ctrl_c_cuts_the_reply_and_the_session_goes_on() -> None:
    import io

    from assistant.io.console import ConsoleChat, ConsoleOptions

    model = ScriptedModel("abcdef")

    def interrupt_once(index: int) -> None:
        if index == 3:
            model.on_token = lambda index: None
            raise KeyboardInterrupt

    model.on_token = interrupt_once
    chat = session(model)
    out, err = io.StringIO(), io.StringIO()
    lines = iter(["go", "/continue", "/nonsense", None])
    failures = ConsoleChat(chat, ConsoleOptions(verbose=True), out=out, err=err).run(lambda: next(lines))
    assert out.getvalue().splitlines()[:2] == ["abc [cut]", "abcdef"]
    assert chat.conversation.turns[-1] == Message("assistant", "abcabcdef")
    assert failures == 1 and "command: unknown command /nonsense" in err.getvalue()
    assert err.getvalue().count("tok/s") == 2
