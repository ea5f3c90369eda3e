"""Tool calls without a model: the Hermes parser over streamed text, the plan a tool_choice makes, the templates that
render tool turns, and chat completions bodies read field by field."""

from __future__ import annotations

import json
from typing import Any

import pytest

from assistant.config import SamplingConfig
from assistant.errors import InvalidRequestError, TemplateError
from assistant.io.chat_request import chat_request
from assistant.llm.structured import HermesParser, ToolPlan, call_schema
from assistant.llm.templates import BUILTIN_TEMPLATES, JinjaTemplate
from assistant.messages import Message, Tool, ToolCall, ToolUse

WEATHER = Tool("get_weather", "The weather in a city", {"type": "object", "properties": {"city": {"type": "string"}},
                                                         "required": ["city"]})  # fmt: skip
TIME = Tool("get_time", "The time in a city", {"type": "object", "properties": {"city": {"type": "string"}}})
# the tool part of Qwen2.5's chat template (the offline Qwen GGUF ships the whole of it)
HERMES_TEMPLATE = (
    "{%- if tools %}<|im_start|>system\n# Tools\n<tools>{%- for tool in tools %}\n{{ tool | tojson }}{%- endfor %}"
    '\n</tools>\nFor each call return <tool_call>{"name": ..., "arguments": ...}</tool_call><|im_end|>\n'
    "{%- endif %}{%- for message in messages %}{%- if message.role == 'assistant' and message.tool_calls %}"
    '<|im_start|>assistant{%- for call in message.tool_calls %}\n<tool_call>\n{"name": "{{ call.function.name }}"'
    ', "arguments": {{ call.function.arguments | tojson }}}\n</tool_call>{%- endfor %}<|im_end|>\n'
    "{%- elif message.role == 'tool' %}<|im_start|>user\n<tool_response>\n{{ message.content }}\n</tool_response>"
    "<|im_end|>\n{%- else %}<|im_start|>{{ message.role }}\n{{ message.content }}<|im_end|>\n{%- endif %}"
    "{%- endfor %}{%- if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)


def parse(chunks: list[str], *, inside: bool = False) -> list[str | ToolCall]:
    parser = HermesParser(inside=inside)
    items = [item for chunk in chunks for item in parser.feed(chunk)]
    return items + list(parser.finish())


def test_calls_split_from_text_however_the_tags_are_cut() -> None:
    text = 'Checking.\n<tool_call>\n{"name": "get_weather", "arguments": {"city": "巴黎"}}\n</tool_call>\n' \
           '<tool_call>\n{"name": "get_time", "arguments": {}}\n</tool_call>'  # fmt: skip
    for size in (1, 2, 3, 7, len(text)):
        items = parse([text[i : i + size] for i in range(0, len(text), size)])
        content = "".join(item for item in items if isinstance(item, str))
        calls = [item for item in items if isinstance(item, ToolCall)]
        assert content == "Checking."
        assert [(c.name, json.loads(c.arguments)) for c in calls] == [("get_weather", {"city": "巴黎"}),
                                                                      ("get_time", {})]  # fmt: skip
        assert all(c.id.startswith("call_") and len(c.id) == 29 for c in calls) and calls[0].id != calls[1].id


def test_text_that_only_looks_like_a_tag_is_kept() -> None:
    assert "".join(map(str, parse(["a <tool", "box> and <b>bold</b>"]))) == "a <toolbox> and <b>bold</b>"
    assert parse(["<tool_call>\nnot json\n</tool_call>"]) == ["<tool_call>\nnot json\n</tool_call>"]


def test_a_forced_call_without_its_closing_tag_is_still_a_call() -> None:
    (call,) = parse(['{"name": "get_weather", "arguments": {"city": "Oslo"}}'], inside=True)
    assert isinstance(call, ToolCall) and json.loads(call.arguments) == {"city": "Oslo"}


def test_tool_choice_plans() -> None:
    template = JinjaTemplate(HERMES_TEMPLATE)
    assert ToolPlan.of(template, None) == ToolPlan()
    assert ToolPlan.of(template, ToolUse((WEATHER,), "none")) == ToolPlan()
    auto = ToolPlan.of(template, ToolUse((WEATHER, TIME)))
    assert auto.shown == (WEATHER, TIME) and auto.constraint is None and auto.parses and not auto.prefill
    named = ToolPlan.of(template, ToolUse((WEATHER, TIME), "get_time"))
    assert named.prefill == "<tool_call>\n" and named.constraint is not None
    assert named.constraint.schema == call_schema((TIME,))
    assert named.constraint.schema["properties"]["name"] == {"const": "get_time"}
    required = ToolPlan.of(template, ToolUse((WEATHER, TIME), "required"))
    assert required.constraint is not None and len(required.constraint.schema["anyOf"]) == 2
    with pytest.raises(TemplateError) as refused:
        ToolPlan.of(BUILTIN_TEMPLATES["llama2-chinese"], ToolUse((WEATHER,)))
    assert refused.value.param == "tools" and "llama2-chinese" in refused.value.message


def test_templates_render_tools_and_tool_turns() -> None:
    template = JinjaTemplate(HERMES_TEMPLATE)
    call = ToolCall("call_1", "get_weather", '{"city": "Paris"}')
    history = [Message("user", "Weather?"), Message("assistant", "", tool_calls=(call,)),
               Message("tool", '{"celsius": 18}', tool_call_id="call_1")]  # fmt: skip
    prompt = template.render(history, tools=(WEATHER,))
    assert '"name": "get_weather"' in prompt and '"required": ["city"]' in prompt  # the tool, described
    assert '"arguments": {"city": "Paris"}' in prompt  # arguments as an object, not a quoted string
    assert '<tool_response>\n{"celsius": 18}\n</tool_response>' in prompt
    assert prompt.endswith("<|im_start|>assistant\n")  # a reply may follow a tool result
    with pytest.raises(TemplateError) as refused:
        BUILTIN_TEMPLATES["chatml"].render(history)
    assert refused.value.param == "messages"


BASE = {"model": "m", "messages": [{"role": "user", "content": "Hi"}]}


def read(**fields: Any) -> Any:
    return chat_request(BASE | fields, SamplingConfig())


@pytest.mark.parametrize(
    ("fields", "param", "code"),
    [({"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "x"}}]}]},
      "messages[0].content[0]", "unsupported_value"),
     ({"messages": [{"role": "user", "content": [{"type": "input_audio", "input_audio": {}}]}]},
      "messages[0].content[0]", "unsupported_value"),
     ({"messages": [{"role": "function", "content": "x", "name": "f"}]}, "messages[0].role", "unsupported_value"),
     ({"messages": [{"role": "tool", "content": "x"}]}, "messages[0].tool_call_id", "invalid_value"),
     ({"messages": [{"role": "user", "content": "x", "mood": "happy"}]}, "messages[0].mood", "unknown_parameter"),
     ({"max_tokens": 0}, "max_tokens", "invalid_value"), ({"temperature": 2.5}, "temperature", "invalid_value"),
     ({"n": 2}, "n", "unsupported_value"), ({"logprobs": True}, "logprobs", "unsupported_parameter"),
     ({"frequency_penalty": 0.5}, "frequency_penalty", "unsupported_parameter"),
     ({"stop": ["a", "b", "c", "d", "e"]}, "stop", "invalid_value"), ({"mirostat": 2}, "mirostat", "unknown_parameter"),
     ({"stream_options": {"include_usage": True}}, "stream_options", "invalid_value"),
     ({"tool_choice": "required"}, "tool_choice", "invalid_value"),
     ({"tools": [WEATHER.to_openai()], "tool_choice": {"type": "function", "function": {"name": "nope"}}},
      "tool_choice", "invalid_value"),
     ({"tools": [{"type": "custom", "custom": {"name": "x"}}]}, "tools[0].type", "unsupported_value"),
     ({"tools": [{"type": "function", "function": {"name": "f", "parameters": {"type": "string"}}}]},
      "tools[0].function.parameters", "invalid_type"),
     ({"tools": [{"type": "function", "function": {"name": "f", "foo": 1}}]}, "tools[0].function.foo",
      "unknown_parameter"),
     ({"tools": [{"type": "function", "function": {"name": "f"}, "foo": 1}]}, "tools[0].foo", "unknown_parameter"),
     ({"response_format": {"type": "json_object", "x": 1}}, "response_format.x", "unknown_parameter"),
     ({"response_format": {"type": "json_schema", "json_schema": {"schema": {}}}},
      "response_format.json_schema.name", "invalid_value")],
)  # fmt: skip
def test_refusals_name_the_field(fields: dict[str, Any], param: str, code: str) -> None:
    with pytest.raises(InvalidRequestError) as refused:
        read(**fields)
    assert (refused.value.param, refused.value.code) == (param, code)
    assert "llm." not in refused.value.message  # the request's names, never our YAML keys


def test_what_a_request_asks_for_is_read() -> None:
    asked = read(messages=[{"role": "developer", "content": [{"type": "text", "text": "Be brief."}]},
                           {"role": "user", "content": "Hi"}],
                 max_completion_tokens=9, temperature=0, stop="END", seed=3, frequency_penalty=0, logprobs=False,
                 tools=[WEATHER.to_openai()], tool_choice={"type": "function", "function": {"name": "get_weather"}},
                 parallel_tool_calls=False, stream=True, stream_options={"include_usage": True})  # fmt: skip
    assert asked.messages[0] == Message("system", "Be brief.")
    assert (asked.sampling.max_new_tokens, asked.sampling.temperature, asked.sampling.stop, asked.sampling.seed) == (
        9, 0.0, ("END",), 3)  # fmt: skip
    assert asked.tool_use == ToolUse((WEATHER,), "get_weather", parallel=False)
    assert asked.stream and asked.include_usage
    history = read(messages=[{"role": "user", "content": "Weather?"},
                             {"role": "assistant", "content": None, "tool_calls": [
                                 {"id": "call_1", "type": "function",
                                  "function": {"name": "get_weather", "arguments": "{\"city\": \"Paris\"}"}}]},
                             {"role": "tool", "tool_call_id": "call_1", "content": "18 C"}])  # fmt: skip
    assert history.messages[1].tool_calls == (ToolCall("call_1", "get_weather", '{"city": "Paris"}'),)
    assert history.messages[2] == Message("tool", "18 C", tool_call_id="call_1") and not history.continue_last
    schema = {"type": "object", "properties": {"a": {"type": "integer"}}}
    output = read(response_format={"type": "json_schema", "json_schema": {"name": "A", "schema": schema,
                                                                          "strict": True}}).output  # fmt: skip
    assert output is not None and output.schema == schema and output.strict


def test_saved_tool_turns_are_conversation_items_the_sdk_reads() -> None:
    """A conversation's tool calls and results come out of /v1/conversations/{id}/items as OpenAI's function_call
    and function_call_output items, which the official SDK's own type parses."""
    from openai.types.conversations import ConversationItemList

    from assistant.conversation import Conversation
    from assistant.io.conversations import items

    conversation = Conversation(None)
    conversation.turns = [Message("user", "Weather?"),
                          Message("assistant", "", tool_calls=(ToolCall("call_1", "get_weather", '{"city":"Oslo"}'),)),
                          Message("tool", "3 C", tool_call_id="call_1"), Message("assistant", "3 °C.")]  # fmt: skip
    page = ConversationItemList.model_validate(items("c0ffee00", conversation, order="asc"))
    assert [item.type for item in page.data] == ["message", "function_call", "function_call_output", "message"]
    call, output = page.data[1], page.data[2]
    assert (call.call_id, call.name, call.arguments) == ("call_1", "get_weather", '{"city":"Oslo"}')
    assert (output.call_id, output.output) == ("call_1", "3 C")


def test_bare_calls_without_tags_are_calls_to_known_tools_only() -> None:
    """Small models (the offline Qwen2.5-Coder 0.5B) often answer with the call's JSON and no tags."""
    names = frozenset({"get_weather", "get_time"})
    parser = HermesParser(names=names)
    streamed = [*parser.feed('\n{"name": "get_weather", '), *parser.feed('"arguments": {"city": "Oslo"}}\n'),
                *parser.feed('{"name": "get_time", "arguments": {}}')]  # fmt: skip
    assert streamed == []  # held until the reply shows what it is
    calls = list(parser.finish())
    assert [(c.name, c.arguments) for c in calls] == [("get_weather", '{"city": "Oslo"}'), ("get_time", "{}")]
    for text in ('{"name": "send_email", "arguments": {}}', '{"answer": 42}'):  # unknown function, plain JSON
        parser = HermesParser(names=names)
        assert [*parser.feed(text), *parser.finish()] == [text]


def test_parallel_off_ends_generation_after_the_first_call() -> None:
    """With parallel_tool_calls false the reply stops at the first complete call: the second is never generated."""
    from assistant.llm.base import Reply
    from assistant.messages import ReplyStats

    plan = ToolPlan.of(JinjaTemplate(HERMES_TEMPLATE), ToolUse((WEATHER, TIME), parallel=False))
    produced: list[str] = []

    def deltas(reply: Reply) -> Any:
        try:
            for piece in ('<tool_call>\n{"name": "get_time", "arguments": {}}\n</tool_call>\n',
                          '<tool_call>\n{"name": "get_weather", "arguments": {}}\n</tool_call>'):  # fmt: skip
                produced.append(piece)
                yield piece
        finally:
            reply.stats = ReplyStats(finish_reason="stop")

    reply = Reply(lambda reply: plan.calls(reply, deltas(reply)))
    assert "".join(reply) == "" and [call.name for call in reply.tool_calls] == ["get_time"]
    assert len(produced) == 1 and reply.stats.finish_reason == "tool_calls"
