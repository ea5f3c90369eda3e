"""Structured replies from local models: JSON that obeys a schema, and function calls in the model's own format.

JSON output is a decoding constraint (``JsonOutput``): each backend masks the tokens that would break the JSON value
(llama.cpp grammars, llguidance for transformers). Tool calls follow the chat template: a template that documents
tools in the Hermes style (Qwen2.5 and its fine-tunes, Hermes, many others) has the model write::

    <tool_call>
    {"name": "get_weather", "arguments": {"city": "Paris"}}
    </tool_call>

``ToolPlan`` decides, for one reply, which tools the template shows, whether a call is forced (``tool_choice``
``required`` or a named function: the reply is opened with ``<tool_call>`` and its JSON constrained to the
functions' schemas, so the arguments always parse and obey them) and how the text is split into content and calls,
the way vLLM's ``hermes`` tool parser reads it. Templates without a tool format refuse tools by name: a prompt that
describes tools the model was never trained to call gives invented answers, not calls.
"""

from __future__ import annotations

import dataclasses
import json
import secrets
import string
from collections.abc import Iterator
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from assistant.errors import TemplateError
from assistant.messages import Tool, ToolCall, ToolUse

if TYPE_CHECKING:
    from assistant.llm.base import Reply
    from assistant.llm.templates import PromptFormat

CALL_START, CALL_END = "<tool_call>", "</tool_call>"


@dataclass(frozen=True)
class JsonOutput:
    """Constrained decoding: the reply is one JSON value that obeys ``schema`` (a JSON Schema); ``schema`` None means
    any JSON object (OpenAI's ``response_format: {"type": "json_object"}``). ``name`` and ``strict`` are OpenAI's
    ``json_schema`` fields, passed on as they are by the openai backend."""

    schema: dict[str, Any] | None = None
    name: str = "response"
    strict: bool = False


def supports_tools(template: PromptFormat) -> bool:
    """Whether the template has a tool-call format this module reads (Hermes ``<tool_call>`` tags)."""
    source = getattr(template, "source", None)
    return isinstance(source, str) and CALL_START in source and "tools" in source


def new_call_id() -> str:
    """An id in OpenAI's form: ``call_`` and 24 letters or digits."""
    alphabet = string.ascii_letters + string.digits
    return "call_" + "".join(secrets.choice(alphabet) for _ in range(24))


def call_schema(tools: tuple[Tool, ...]) -> dict[str, Any]:
    """The JSON Schema of one Hermes call to any of ``tools``: ``{"name": <const>, "arguments": <its parameters>}``."""
    options = [
        {
            "type": "object",
            "properties": {"name": {"const": tool.name}, "arguments": tool.parameters},
            "required": ["name", "arguments"],
            "additionalProperties": False,
        }
        for tool in tools
    ]
    return options[0] if len(options) == 1 else {"anyOf": options}


@dataclass(frozen=True)
class ToolPlan:
    """How one reply uses the tools offered: ``shown`` go into the prompt, ``prefill`` opens a forced call,
    ``constraint`` holds the call's JSON to the schemas, ``parses`` splits the text into content and calls."""

    shown: tuple[Tool, ...] = ()
    prefill: str = ""
    constraint: JsonOutput | None = None
    parses: bool = False
    parallel: bool = True

    @classmethod
    def of(cls, template: PromptFormat, tool_use: ToolUse | None) -> ToolPlan:
        if tool_use is None or not tool_use.tools or tool_use.choice == "none":
            return cls()
        if not supports_tools(template):
            raise TemplateError(
                f"tools: the chat template '{template.name}' has no tool-call format, so this model cannot call "
                "functions; use a model whose own template supports tools (Qwen2.5 and its fine-tunes do), or "
                "send no tools",
                param="tools",
            )
        if tool_use.choice == "auto":
            return cls(tool_use.tools, parses=True, parallel=tool_use.parallel)
        if tool_use.choice == "required":
            forced = tool_use.tools
        else:
            forced = tuple(tool for tool in tool_use.tools if tool.name == tool_use.choice)
            if not forced:
                raise TemplateError(f"tool_choice: no function named {tool_use.choice!r} in tools", param="tool_choice")
        # held to the functions' schemas as OpenAI holds them: a keyword the backend cannot enforce is refused only
        # when every forced function asks for strict schemas
        constraint = JsonOutput(call_schema(forced), name="tool_call", strict=all(tool.strict for tool in forced))
        return cls(tool_use.tools, f"{CALL_START}\n", constraint, parses=True, parallel=False)

    def calls(self, reply: Reply, deltas: Iterator[str]) -> Iterator[str | ToolCall]:
        """The reply's text split into content deltas and completed calls; finish_reason becomes ``tool_calls``
        when there is a call. With ``parallel`` off, generation ends after the first call."""
        parser = HermesParser(inside=bool(self.prefill), names=frozenset(tool.name for tool in self.shown))
        made = 0
        try:
            for delta in deltas:
                for item in parser.feed(delta):
                    made += isinstance(item, ToolCall)
                    yield item
                if made and not self.parallel:
                    break
            else:
                yield from parser.finish()
        finally:
            deltas.close()  # sets reply.stats
            if parser.calls_made:
                reply.stats = dataclasses.replace(reply.stats, finish_reason="tool_calls")


class HermesParser:
    """Splits streamed text into content and ``<tool_call>{json}</tool_call>`` calls. Text that might be the start of
    a tag is held back until it is not; a call whose JSON does not parse (an unconstrained model's slip) is given
    back as content, tags included, rather than lost.

    Small models often leave the tags out and answer with the bare call (``{"name": "get_weather", "arguments":
    {...}}``, one per line): a reply that starts with ``{`` is held to its end and taken as calls when every line of
    it is a call to one of ``names``, as content otherwise."""

    def __init__(self, *, inside: bool = False, names: frozenset[str] = frozenset()) -> None:
        self._inside = inside
        self._opened = inside  # the call's opening tag was in the prompt, not the reply
        self._names = names
        self._bare: bool | None = None if names and not inside else False  # None: not known yet
        self._held = ""
        self.calls_made = 0

    def feed(self, text: str) -> Iterator[str | ToolCall]:
        self._held += text
        if self._bare is None and self._held.strip():
            self._bare = self._held.lstrip().startswith("{")
        if self._bare is not False:
            return  # held to the end (or until the reply shows what it is)
        while True:
            tag = CALL_END if self._inside else CALL_START
            position = self._held.find(tag)
            if position < 0:
                break
            before, self._held = self._held[:position], self._held[position + len(tag) :]
            if self._inside:
                yield self._call_or_text(before, closed=True)
            elif before.strip():
                yield before.rstrip()
            self._inside = not self._inside
        if not self._inside:  # hold what may begin a tag, and trailing blanks (dropped if a call follows)
            keep = _partial_tag_length(self._held, CALL_START)
            ready = self._held[: len(self._held) - keep]
            shown = ready.rstrip()
            self._held = self._held[len(shown) :]
            if shown:
                yield shown

    def finish(self) -> Iterator[str | ToolCall]:
        """What is left when generation ends: an unclosed call (the model stopped after its JSON) is still a call."""
        held, self._held = self._held, ""
        if self._bare:
            lines = [line for line in held.splitlines() if line.strip()]
            calls = [_parse_call(line) for line in lines] if len(lines) > 1 else [_parse_call(held)]
            if calls and all(call is not None and call.name in self._names for call in calls):
                self.calls_made += len(calls)
                yield from (call for call in calls if call is not None)
                return
        if self._inside:
            if held.strip():
                yield self._call_or_text(held, closed=False)
        elif held.strip() or (held and not self.calls_made):
            yield held

    def _call_or_text(self, body: str, *, closed: bool) -> str | ToolCall:
        call = _parse_call(body)
        if call is None:
            opened = "" if self._opened and not self.calls_made else CALL_START
            return f"{opened}{body}{CALL_END if closed else ''}"
        self.calls_made += 1
        return call


def _parse_call(body: str) -> ToolCall | None:
    try:
        value = json.loads(body)
    except ValueError:
        return None
    if not isinstance(value, dict) or not isinstance(value.get("name"), str):
        return None
    arguments = value.get("arguments", value.get("parameters", {}))
    text = arguments if isinstance(arguments, str) else json.dumps(arguments, ensure_ascii=False)
    return ToolCall(new_call_id(), value["name"], text)


def _partial_tag_length(text: str, tag: str) -> int:
    """How many characters at the end of ``text`` could begin ``tag``."""
    for length in range(min(len(tag) - 1, len(text)), 0, -1):
        if text.endswith(tag[:length]):
            return length
    return 0
