"""Conversation history: editing, the token-budget window, personas, and the saved file."""

from __future__ import annotations

import json
import os
from collections.abc import Sequence
from pathlib import Path

import pytest

from assistant.conversation import TRIM_SLACK, Conversation, load_persona
from assistant.errors import ConversationError, PromptTooLongError
from assistant.messages import Message


def count_words(messages: Sequence[Message]) -> int:
    """A stand-in tokenizer: one token per word plus two per message."""
    return sum(len(m.content.split()) + 2 for m in messages)


def chat(turns: int, words: int = 8) -> Conversation:
    conversation = Conversation("be kind")
    for index in range(turns):
        conversation.add_user(f"question {index} " + "w " * (words - 2))
        conversation.add_reply(f"answer {index} " + "w " * (words - 2))
    return conversation


def test_undo_removes_the_last_exchange() -> None:
    conversation = chat(2)
    removed = conversation.undo()
    assert [m.role for m in removed] == ["user", "assistant"]
    assert len(conversation.turns) == 2 and conversation.system == "be kind"
    conversation.undo()
    with pytest.raises(ConversationError, match="nothing to undo"):
        conversation.undo()


def test_reply_rules() -> None:
    conversation = Conversation()
    with pytest.raises(ConversationError, match="needs a user message"):
        conversation.add_reply("hi")
    with pytest.raises(ConversationError, match="no reply to regenerate"):
        conversation.drop_last_reply()
    conversation.add_user("hello")
    with pytest.raises(ConversationError, match="has no reply yet"):
        conversation.add_user("hello again")
    conversation.add_reply("Hel", cut=True)
    conversation.add_reply("lo!")  # continuing extends the same reply
    assert conversation.turns[-1] == Message("assistant", "Hello!", cut=False)


def test_window_keeps_everything_that_fits() -> None:
    conversation = chat(3)
    assert conversation.window(count_words, budget=1000) == conversation.messages()


def test_window_drops_oldest_exchanges_and_keeps_system_and_last_turn() -> None:
    conversation = chat(10)
    conversation.add_user("final question")
    window = conversation.window(count_words, budget=60)
    assert window[0] == Message("system", "be kind")
    assert window[-1] == Message("user", "final question")
    assert count_words(window) <= 60
    kept_questions = [m.content.split()[1] for m in window if m.role == "user"][:-1]
    assert kept_questions == sorted(kept_questions, key=int) and "0" not in kept_questions
    assert window[1].role == "user"  # never starts with an orphaned reply


def test_window_start_is_stable_for_the_next_turns() -> None:
    """Dropping with slack keeps the same prefix for later turns (what lets a backend reuse its KV cache)."""
    conversation = chat(10)
    conversation.add_user("q")
    first = conversation.window(count_words, budget=100)
    conversation.add_reply("short")
    conversation.add_user("next")
    second = conversation.window(count_words, budget=100)
    assert second[: len(first)] == first


def test_prompt_too_long_names_the_fix_and_leaves_history_alone() -> None:
    conversation = chat(2)
    conversation.add_user("x " * 500)
    before = list(conversation.turns)
    with pytest.raises(PromptTooLongError, match="llm.context_tokens"):
        conversation.window(count_words, budget=100)
    assert conversation.turns == before


def test_save_and_load_round_trip(tmp_path: Path) -> None:
    conversation = chat(2)
    conversation.add_user("讲个故事")
    conversation.add_reply("从前", cut=True)
    path = conversation.save(tmp_path / "sub" / "chat.json")
    loaded = Conversation.load(path)
    assert loaded.system == "be kind" and loaded.turns == conversation.turns
    assert json.loads(path.read_text(encoding="utf-8"))["messages"][-1] == {
        "role": "assistant",
        "content": "从前",
        "cut": True,
    }


def test_load_accepts_a_plain_openai_message_list(tmp_path: Path) -> None:
    path = tmp_path / "openai.json"
    path.write_text(json.dumps([{"role": "system", "content": "s"}, {"role": "user", "content": "u"}]))
    loaded = Conversation.load(path)
    assert loaded.system == "s" and loaded.turns == [Message("user", "u")]


@pytest.mark.parametrize(
    ("content", "match"),
    [
        ("{not json", "invalid JSON"),
        ('{"messages": 3}', "needs a 'messages' list"),
        ('{"messages": [{"role": "robot", "content": "x"}]}', "message 0 must be"),
        ('{"version": 9, "messages": []}', "has version 9"),
    ],
)
def test_load_refuses_bad_files(tmp_path: Path, content: str, match: str) -> None:
    path = tmp_path / "bad.json"
    path.write_text(content)
    with pytest.raises(ConversationError, match=match):
        Conversation.load(path)
    with pytest.raises(ConversationError, match="cannot read"):
        Conversation.load(tmp_path / "missing.json")


def test_a_failed_save_leaves_the_previous_file_whole(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    path = chat(1).save(tmp_path / "chat.json")
    previous = path.read_text(encoding="utf-8")

    def disk_full(*_: object) -> None:
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(os, "replace", disk_full)
    with pytest.raises(ConversationError, match="previous file is unchanged"):
        chat(3).save(path)
    assert path.read_text(encoding="utf-8") == previous
    assert [p.name for p in tmp_path.iterdir()] == ["chat.json"]  # no temporary file left behind


@pytest.mark.skipif(os.geteuid() == 0, reason="root ignores directory permissions")
def test_save_into_a_read_only_directory_is_a_clear_error(tmp_path: Path) -> None:
    tmp_path.chmod(0o500)
    try:
        with pytest.raises(ConversationError, match="choose a writable path"):
            chat(1).save(tmp_path / "chat.json")
    finally:
        tmp_path.chmod(0o700)


def test_persona_file(tmp_path: Path) -> None:
    path = tmp_path / "teacher.yaml"
    path.write_text("name: 老师\ngreeting: 同学们好！\nsystem: 你是一位耐心的数学老师。\n", encoding="utf-8")
    persona = load_persona(path)
    conversation = Conversation("ignored", persona=persona)
    assert (persona.name, persona.greeting) == ("老师", "同学们好！")
    assert conversation.system == "你是一位耐心的数学老师。"


@pytest.mark.parametrize(
    ("content", "match"),
    [("name: x\n", "needs at least 'system:"), ("system: s\nvoice: x\n", "unknown key 'voice'"), (":\n- [", "YAML")],
)
def test_bad_persona_files(tmp_path: Path, content: str, match: str) -> None:
    path = tmp_path / "p.yaml"
    path.write_text(content)
    with pytest.raises(ConversationError, match=match):
        load_persona(path)


def test_window_of_a_very_long_conversation_needs_few_counts() -> None:
    """A resumed conversation of thousands of turns is windowed by bisection, with the same result as dropping the
    oldest exchanges one by one."""
    conversation = Conversation("sys")
    for turn in range(3000):
        conversation.add_user(f"q{turn} " + "x" * (turn % 7))
        conversation.add_reply(f"a{turn} " + "y" * (turn % 5))
    conversation.add_user("last")
    calls = []

    def count(messages: list[Message]) -> int:
        calls.append(len(messages))
        return sum(len(m.content) + 4 for m in messages)

    window = conversation.window(count, 1000)
    assert len(calls) <= 20
    target = int(1000 * (1 - TRIM_SLACK))
    one_exchange_more = [window[0], *conversation.turns[-(len(window) - 1) - 2 :]]
    assert count(window) <= target < count(one_exchange_more)
    assert window[0].role == "system" and window[1].role == "user" and window[-1].content == "last"


def test_tool_turns_are_saved_and_read_back(tmp_path: Path) -> None:
    """An assistant turn's tool calls and the tool results that answer them survive a save, as OpenAI writes them."""
    from assistant.messages import ToolCall

    conversation = Conversation("You help.")
    call = ToolCall("call_abc", "get_weather", '{"city": "Paris"}')
    conversation.turns = [Message("user", "Weather in Paris?"), Message("assistant", "", tool_calls=(call,)),
                          Message("tool", '{"celsius": 18}', tool_call_id="call_abc"),
                          Message("assistant", "18 °C in Paris.")]  # fmt: skip
    saved = json.loads(conversation.save(tmp_path / "c.json").read_text())
    function = saved["messages"][1]["tool_calls"][0]["function"]
    assert function == {"name": "get_weather", "arguments": '{"city": "Paris"}'}
    assert saved["messages"][2]["tool_call_id"] == "call_abc"
    assert Conversation.load(tmp_path / "c.json").turns == conversation.turns
    assert "Called `get_weather(" in conversation.to_markdown()
    with pytest.raises(ConversationError, match="tool_call_id"):
        Conversation.from_json({"messages": [{"role": "tool", "content": "18"}]})


def test_a_claim_waits_for_an_ending_session_and_refuses_an_open_one_at_once(tmp_path: Path) -> None:
    """A client that closes its WebSocket and renames the conversation at once must not get 409 for the server's
    own clean-up (the ending session's last save); a conversation still open is refused without waiting."""
    import asyncio
    import time

    from assistant.config import Config
    from assistant.errors import ConflictError
    from assistant.io.server import Services
    from assistant.worker import ModelWorker

    services = Services(Config(), None, None, ModelWorker(1), (), None, ModelWorker(1))  # type: ignore[arg-type]
    path = tmp_path / "abc.json"

    async def scenario() -> float:
        services.claim_conversation(path)
        started = time.monotonic()
        with pytest.raises(ConflictError, match="open in another session"):
            await services.claim_conversation_soon(path)
        assert time.monotonic() - started < 0.5, "an open conversation is refused at once"
        services.conversation_closing(path)
        asyncio.get_running_loop().call_later(0.3, services.release_conversation, path)
        started = time.monotonic()
        async with services.conversation_free(path):
            assert path in services.open_conversations
        return time.monotonic() - started

    assert 0.25 < asyncio.run(scenario()) < 5
    assert not services.open_conversations and not services.closing_conversations
