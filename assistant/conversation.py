"""A conversation: system prompt, turns, personas, the window sent to the model, and its file.

No models and no I/O besides the conversation's own file. Token counts come from the caller (``count_tokens``), so the
window can be tested with a fake counter and used with any backend.
"""

from __future__ import annotations

import copy
import json
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from assistant.errors import ConversationError, PromptTooLongError
from assistant.files import atomic_write_text
from assistant.messages import ROLES, Message, ToolCall

FILE_FORMAT = "assistant-conversation"
FILE_VERSION = 1
TRIM_SLACK = 0.25  # when history must be dropped, drop this share of the budget more, so the prefix (and the
#                    model's KV cache of it) stays the same for the next few turns instead of shifting every turn

TokenCounter = Callable[[Sequence[Message]], int]


@dataclass(frozen=True)
class Persona:
    """A character: its name, the line it opens with, and the system prompt that makes it."""

    name: str
    system: str
    greeting: str | None = None


def load_persona(path: str | Path) -> Persona:
    """Read a YAML character file with ``name``, ``system`` and optional ``greeting``."""
    where = Path(path)
    try:
        data = yaml.safe_load(where.read_text(encoding="utf-8"))
    except OSError as exc:
        raise ConversationError(f"cannot read persona file '{where}': {exc.strerror}; check llm.persona") from None
    except yaml.YAMLError as exc:
        raise ConversationError(f"persona file '{where}' is not valid YAML: {exc}") from None
    if not isinstance(data, dict) or not isinstance(data.get("system"), str) or not data["system"].strip():
        raise ConversationError(
            f"persona file '{where}' needs at least 'system: <the character's instructions>' "
            "(and optionally 'name:' and 'greeting:')"
        )
    unknown = sorted(set(data) - {"name", "system", "greeting"})
    if unknown:
        raise ConversationError(
            f"persona file '{where}': unknown key {unknown[0]!r}; valid keys: name, system, greeting"
        )
    greeting = data.get("greeting")
    return Persona(name=str(data.get("name") or where.stem), system=data["system"], greeting=greeting and str(greeting))


class Conversation:
    """The history of one chat. Turns alternate user / assistant; a reply may be cut (stopped before its end)."""

    def __init__(self, system: str | None = None, *, persona: Persona | None = None) -> None:
        self.persona = persona
        self.system = persona.system if persona else system
        self.turns: list[Message] = []
        self.title: str | None = None  # a name people gave it (None: its first words stand for it)
        self.created_at = int(time.time())  # Unix seconds, kept in the file
        self._first_in_window = 0  # index of the oldest turn still sent to the model

    # --- editing -------------------------------------------------------------------------------------------------

    def add_user(self, text: str) -> None:
        if self.turns and self.turns[-1].role == "user":
            raise ConversationError("the last message has no reply yet; regenerate it or undo it first")
        self.turns.append(Message("user", text))

    def add_reply(self, text: str, *, cut: bool = False) -> None:
        """Record a reply to the last user turn, or extend the last reply when it is being continued."""
        if self.turns and self.turns[-1].role == "assistant":
            self.turns[-1] = Message("assistant", self.turns[-1].content + text, cut=cut)
        elif self.turns:
            self.turns.append(Message("assistant", text, cut=cut))
        else:
            raise ConversationError("a reply needs a user message before it")

    def drop_last_reply(self) -> Message:
        """Remove the last reply (to regenerate it); the user turn it answered stays."""
        if not self.turns or self.turns[-1].role != "assistant":
            raise ConversationError("there is no reply to regenerate; send a message first")
        return self.turns.pop()

    def drop_last_user(self) -> Message:
        """Remove a user turn that got no reply (its generation failed), leaving the history as it was before."""
        if not self.turns or self.turns[-1].role != "user":
            raise ConversationError("the last message is not an unanswered user message")
        return self.turns.pop()

    def undo(self) -> list[Message]:
        """Remove the last exchange: the last reply and the user turn it answered."""
        if not self.turns:
            raise ConversationError("nothing to undo: the conversation is empty")
        removed = [self.turns.pop()]
        if removed[0].role == "assistant" and self.turns and self.turns[-1].role == "user":
            removed.insert(0, self.turns.pop())
        self._first_in_window = min(self._first_in_window, len(self.turns))
        return removed

    def remove(self, index: int) -> Message:
        """Remove the message at ``index`` of ``turns`` (a Realtime client deleting an item)."""
        removed = self.turns.pop(index)
        if index < self._first_in_window:
            self._first_in_window -= 1
        return removed

    def replace(self, index: int, message: Message) -> None:
        """Put ``message`` in place of ``turns[index]`` (a reply truncated to what was heard of it)."""
        if message.role != self.turns[index].role:
            raise ConversationError(f"message {index} is a {self.turns[index].role} message, not {message.role}")
        self.turns[index] = message

    def reset(self) -> None:
        """Forget every turn; the system prompt and persona stay."""
        self.turns.clear()
        self._first_in_window = 0

    def fork(self) -> Conversation:
        """A copy to try a turn on (a reply started before the user's turn is over) without touching this one."""
        forked = copy.copy(self)
        forked.turns = list(self.turns)
        return forked

    def last_reply(self) -> Message | None:
        return self.turns[-1] if self.turns and self.turns[-1].role == "assistant" else None

    # --- what the model sees -------------------------------------------------------------------------------------

    def messages(self) -> list[Message]:
        """The whole conversation as messages, system prompt first."""
        head = [Message("system", self.system)] if self.system else []
        return head + self.turns

    def window(self, count_tokens: TokenCounter, budget: int) -> list[Message]:
        """The messages to send: the system prompt, as many recent turns as fit in ``budget`` tokens, the last turn.

        Oldest exchanges are dropped first. When dropping is needed, enough is dropped to get ``TRIM_SLACK`` under
        the budget, and the window start is remembered: the next turns then share the same prefix, so backends that
        keep the KV cache of the previous prompt do not have to encode the whole history again every turn.
        """
        head = [Message("system", self.system)] if self.system else []
        last_start = self._last_exchange_start()
        start = min(self._first_in_window, last_start)
        candidate = head + self.turns[start:]
        if count_tokens(candidate) <= budget:
            return candidate
        target = int(budget * (1 - TRIM_SLACK))
        # the earliest later exchange whose window fits the target, by bisection (a window is shorter the later it
        # starts): a resumed conversation of thousands of turns costs a dozen counts, not thousands
        starts = [i for i in range(start + 1, last_start + 1) if self.turns[i].role == "user"] or [last_start]
        low, high = 0, len(starts) - 1
        while low < high:
            middle = (low + high) // 2
            if count_tokens(head + self.turns[starts[middle] :]) <= target:
                high = middle
            else:
                low = middle + 1
        start = starts[low]
        candidate = head + self.turns[start:]
        size = count_tokens(candidate)
        if size > budget:
            raise PromptTooLongError(
                f"the system prompt and the last message need {size} tokens but only {budget} fit (context minus "
                "llm.sampling.max_new_tokens); shorten the message, the system prompt or max_new_tokens, or raise "
                "llm.context_tokens"
            )
        self._first_in_window = start
        return candidate

    def _last_exchange_start(self) -> int:
        """Index of the last user turn (the window always keeps it and anything after it)."""
        for index in range(len(self.turns) - 1, -1, -1):
            if self.turns[index].role == "user":
                return index
        return 0

    # --- file ----------------------------------------------------------------------------------------------------

    def to_json(self) -> dict[str, Any]:
        return {
            "format": FILE_FORMAT,
            "version": FILE_VERSION,
            "system": self.system,
            "persona": self.persona.name if self.persona else None,
            "title": self.title,
            "created_at": self.created_at,
            "messages": [_message_to_json(m) for m in self.turns],
        }

    def to_markdown(self) -> str:
        """The conversation as Markdown for people: a heading per message, the text as it was (a cut reply marked)."""
        lines = [f"# {self.title or self.summary()}", ""]
        if self.system:
            lines += ["**System**", "", self.system, ""]
        for message in self.turns:
            lines += [f"**{message.role.capitalize()}**" + (" (cut)" if message.cut else ""), ""]
            lines += [message.content, ""] if message.content else []
            lines += [f"Called `{call.name}({call.arguments})`" for call in message.tool_calls]
            lines += [""] if message.tool_calls else []
        return "\n".join(lines)

    def summary(self, chars: int = 60) -> str:
        """The title, else the first user message's first ``chars`` characters, else "New conversation"."""
        if self.title:
            return self.title
        first = next((m.content for m in self.turns if m.role == "user"), "")
        text = " ".join(first.split())
        return (text[: chars - 1] + "…" if len(text) > chars else text) or "New conversation"

    def save(self, path: str | Path) -> Path:
        """Write the conversation atomically: a crash mid-save leaves the previous file whole."""
        target = Path(path).expanduser()
        text = json.dumps(self.to_json(), ensure_ascii=False, indent=2) + "\n"
        atomic_write_text(target, text, what="conversation", error=ConversationError, private=True)  # people's words
        return target

    @classmethod
    def load(cls, path: str | Path, *, persona: Persona | None = None) -> Conversation:
        """Read a file written by ``save`` (or a plain OpenAI-style list of {role, content} messages)."""
        source = Path(path).expanduser()
        try:
            data = json.loads(source.read_text(encoding="utf-8"))
        except OSError as exc:
            raise ConversationError(f"cannot read conversation '{source}': {exc.strerror}; check the path") from None
        except ValueError as exc:
            raise ConversationError(f"'{source}' is not a conversation file (invalid JSON: {exc})") from None
        return cls.from_json(data, where=str(source), persona=persona)

    @classmethod
    def from_json(cls, data: Any, *, where: str = "conversation", persona: Persona | None = None) -> Conversation:
        if isinstance(data, list):
            data = {"messages": data}
        if not isinstance(data, dict) or not isinstance(data.get("messages"), list):
            raise ConversationError(f"'{where}' is not a conversation file: it needs a 'messages' list")
        if data.get("version", FILE_VERSION) != FILE_VERSION:
            raise ConversationError(f"'{where}' has version {data['version']!r}; this assistant reads {FILE_VERSION}")
        system = data.get("system")
        turns = [_message_from_json(item, where, index) for index, item in enumerate(data["messages"])]
        system_messages = [m.content for m in turns if m.role == "system"]
        conversation = cls(system if system is not None else "\n\n".join(system_messages) or None)
        conversation.persona = persona
        conversation.turns = [m for m in turns if m.role != "system"]
        title, created = data.get("title"), data.get("created_at")
        conversation.title = title if isinstance(title, str) and title.strip() else None
        if isinstance(created, int) and not isinstance(created, bool) and created > 0:
            conversation.created_at = created
        return conversation


def _message_to_json(message: Message) -> dict[str, Any]:
    """One message as saved: OpenAI's fields (tool calls and the call a tool result answers included) and ``cut``."""
    saved: dict[str, Any] = {"role": message.role, "content": message.content, "cut": message.cut}
    if message.tool_calls:
        saved["tool_calls"] = [call.to_openai() for call in message.tool_calls]
    if message.tool_call_id is not None:
        saved["tool_call_id"] = message.tool_call_id
    return saved


def _message_from_json(item: Any, where: str, index: int) -> Message:
    calls = _tool_calls_from_json(item.get("tool_calls") if isinstance(item, dict) else None)
    content = item.get("content") if isinstance(item, dict) else None
    if content is None and calls:
        content = ""
    call_id = item.get("tool_call_id") if isinstance(item, dict) else None
    if (
        not isinstance(item, dict)
        or item.get("role") not in ROLES
        or not isinstance(content, str)
        or not isinstance(item.get("cut", False), bool)
        or calls is None
        or (item["role"] == "tool") != isinstance(call_id, str)
    ):
        raise ConversationError(
            f"'{where}': message {index} must be {{'role': system|user|assistant|tool, 'content': text}} (a tool "
            f"message with its tool_call_id, tool_calls as OpenAI writes them), got {item!r:.80}"
        )
    return Message(item["role"], content, cut=item.get("cut", False), tool_calls=calls, tool_call_id=call_id)


def _tool_calls_from_json(value: Any) -> tuple[ToolCall, ...] | None:
    """Saved tool calls; None when they are malformed."""
    if value is None:
        return ()
    if not isinstance(value, list):
        return None
    calls = []
    for call in value:
        function = call.get("function") if isinstance(call, dict) else None
        if not isinstance(function, dict) or not all(
            isinstance(v, str) for v in (call.get("id"), function.get("name"), function.get("arguments"))
        ):
            return None
        calls.append(ToolCall(call["id"], function["name"], function["arguments"]))
    return tuple(calls)
