"""Chat completions as OpenAI clients use them, against a real `assistant serve` on 127.0.0.1 with the offline Qwen2.5
GGUF (llama-cpp), through the official openai SDK: every field of docs/openai-compat.md's table honoured or refused
by name, developer messages, parts the model cannot read, JSON output, tool calls (streamed and not), tool turns in
the history, the context window, and errors in OpenAI's shape."""

from __future__ import annotations

import json
import re
import typing
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.conftest import require_offline_models
from tests.test_server import client, start_server

pytestmark = pytest.mark.real_model
openai = pytest.importorskip("openai")
requests = pytest.importorskip("requests")
jsonschema = pytest.importorskip("jsonschema")

DOC = Path(__file__).parents[1] / "docs" / "openai-compat.md"
MODEL = "qwen2.5-0.5b"
CONTEXT = 1024
WEATHER = {"type": "function", "function": {
    "name": "get_weather", "description": "Current weather in a city",
    "parameters": {"type": "object", "properties": {"city": {"type": "string"},
                                                    "unit": {"type": "string", "enum": ["celsius", "fahrenheit"]}},
                   "required": ["city", "unit"], "additionalProperties": False}}}  # fmt: skip
TIME = {"type": "function", "function": {
    "name": "get_time", "description": "Current time in a city",
    "parameters": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}}}  # fmt: skip
ASK_WEATHER = [{"role": "user", "content": "What is the weather in Paris right now?"}]


@pytest.fixture(scope="module")
def server() -> Iterator[str]:
    require_offline_models(MODEL, "whisper-base")
    process, base = start_server("--model", MODEL, "--set", f"llm.context_tokens={CONTEXT}",
                                 "--set", "llm.sampling.max_new_tokens=48", "--set", "llm.sampling.temperature=0",
                                 "--set", "server.max_pending=8")  # fmt: skip
    yield base
    process.terminate()
    process.wait(timeout=30)


def post(server: str, body: dict[str, Any]) -> requests.Response:
    return requests.post(f"{server}/v1/chat/completions", json={"model": MODEL} | body, timeout=120)


# --- the table ----------------------------------------------------------------------------------------------------


def table(section: str) -> dict[str, str]:
    """``{field: status}`` from the markdown table under ``## {section}`` of docs/openai-compat.md."""
    text = DOC.read_text(encoding="utf-8").split(f"## {section}\n", 1)[1].split("\n## ", 1)[0]
    rows = re.findall(r"^\| `([^`]+)` \| (supported|refused|extension) \|", text, flags=re.MULTILINE)
    return dict(rows)


# a request that uses each field for what it asks for (supported rows must answer 200, refused ones 400 naming it)
USES: dict[str, dict[str, Any]] = {
    "messages": {}, "model": {"model": MODEL}, "max_completion_tokens": {"max_completion_tokens": 2},
    "max_tokens": {"max_tokens": 2}, "modalities": {"modalities": ["text"]}, "n": {"n": 1},
    "parallel_tool_calls": {"parallel_tool_calls": False, "tools": [WEATHER]},
    "prompt_cache_key": {"prompt_cache_key": "tenant-1"},
    "prompt_cache_retention": {"prompt_cache_retention": "in_memory"},
    "response_format": {"response_format": {"type": "json_object"}}, "safety_identifier": {"safety_identifier": "u-1"},
    "seed": {"seed": 1}, "service_tier": {"service_tier": "auto"}, "stop": {"stop": ["\n"]}, "store": {"store": False},
    "stream": {"stream": True}, "stream_options": {"stream": True, "stream_options": {"include_usage": True}},
    "temperature": {"temperature": 0.5}, "tool_choice": {"tool_choice": "none", "tools": [WEATHER]},
    "tools": {"tools": [WEATHER]}, "top_p": {"top_p": 0.5}, "user": {"user": "u-1"},
    "top_k": {"top_k": 5}, "repetition_penalty": {"repetition_penalty": 1.1}, "min_tokens": {"min_tokens": 1},
    "audio": {"audio": {"voice": "alloy", "format": "wav"}, "modalities": ["text", "audio"]},
    "frequency_penalty": {"frequency_penalty": 0.5}, "presence_penalty": {"presence_penalty": 0.5},
    "function_call": {"function_call": "auto"}, "functions": {"functions": [{"name": "f", "parameters": {}}]},
    "logit_bias": {"logit_bias": {"50256": -100}}, "logprobs": {"logprobs": True},
    "top_logprobs": {"top_logprobs": 2}, "metadata": {"metadata": {"team": "a"}},
    "moderation": {"moderation": {"model": "omni-moderation-latest"}},
    "prediction": {"prediction": {"type": "content", "content": "x"}},
    "prompt_cache_options": {"prompt_cache_options": {"mode": "explicit"}},
    "reasoning_effort": {"reasoning_effort": "low"},
    "verbosity": {"verbosity": "low"}, "web_search_options": {"web_search_options": {}},
}  # fmt: skip


def sdk_fields() -> set[str]:
    """Every request field of chat completions in the official SDK's own types (what OpenAI's reference defines)."""
    from openai.types.chat import completion_create_params

    return set(typing.get_type_hints(completion_create_params.CompletionCreateParamsBase)) | {"stream"}


def test_the_table_covers_every_field_the_sdk_knows() -> None:
    rows = table("POST /v1/chat/completions")
    assert sdk_fields() <= set(rows), f"fields missing from docs/openai-compat.md: {sdk_fields() - set(rows)}"
    assert set(rows) <= set(USES), f"rows without a request in this test: {set(rows) - set(USES)}"


def test_every_row_is_honoured_or_refused_by_name(server: str) -> None:
    for field, status in table("POST /v1/chat/completions").items():
        body = {"messages": [{"role": "user", "content": "Say hi"}], "max_tokens": 2} | USES[field]
        response = post(server, body)
        if status == "refused":
            assert response.status_code == 400, (field, response.text)
            error = response.json()["error"]
            assert error["param"].split(".")[0] == field and error["type"] == "invalid_request_error", error
        else:
            assert response.status_code == 200, (field, response.text)
    unknown = post(server, {"messages": ASK_WEATHER, "mirostat": 2})
    assert unknown.status_code == 400 and unknown.json()["error"] == {
        "message": "Unrecognized request argument supplied: mirostat", "type": "invalid_request_error",
        "param": "mirostat", "code": "unknown_parameter"}  # fmt: skip


# --- messages -----------------------------------------------------------------------------------------------------


def test_developer_messages_are_system_instructions(server: str) -> None:
    api = client(server)
    answers = [api.chat.completions.create(model=MODEL, max_tokens=12, messages=[
        {"role": role, "content": "Answer in French only."}, {"role": "user", "content": "Hello, how are you?"}])
        for role in ("developer", "system")]  # fmt: skip
    assert answers[0].usage.prompt_tokens == answers[1].usage.prompt_tokens  # the same prompt, rendered once
    assert answers[0].choices[0].message.content == answers[1].choices[0].message.content


def test_a_part_the_model_cannot_read_is_refused_by_name(server: str) -> None:
    api = client(server)
    for part in ({"type": "image_url", "image_url": {"url": "data:image/png;base64,AAAA"}},
                 {"type": "input_audio", "input_audio": {"data": "AAAA", "format": "wav"}},
                 {"type": "file", "file": {"file_id": "file-1"}}):  # fmt: skip
        with pytest.raises(openai.BadRequestError) as refused:
            api.chat.completions.create(model=MODEL, messages=[
                {"role": "user", "content": [{"type": "text", "text": "What is this?"}, part]}])  # fmt: skip
        error = refused.value.body
        assert error["param"] == "messages[0].content[1]" and error["code"] == "unsupported_value"
        assert part["type"] in error["message"]


def test_another_model_name_is_not_found(server: str) -> None:
    with pytest.raises(openai.NotFoundError) as missing:
        client(server).chat.completions.create(model="gpt-4o", messages=ASK_WEATHER)
    assert missing.value.body["code"] == "model_not_found" and MODEL in missing.value.body["message"]
    assert client(server).models.retrieve(MODEL).id == MODEL  # the SDK's models.retrieve
    with pytest.raises(openai.NotFoundError):
        client(server).models.retrieve("gpt-4o")


def test_a_client_that_gives_up_does_not_hold_the_model(server: str) -> None:
    """A non-streaming request whose client times out is cancelled: the next one is not kept waiting for it."""
    import time

    impatient = openai.OpenAI(base_url=f"{server}/v1", api_key="x", max_retries=0, timeout=1.5)
    with pytest.raises(openai.APITimeoutError):
        impatient.chat.completions.create(model=MODEL, max_tokens=600, extra_body={"min_tokens": 600},
                                          messages=[{"role": "user", "content": "An essay on Rome."}])  # fmt: skip
    started = time.monotonic()
    client(server).chat.completions.create(model=MODEL, max_tokens=3, messages=ASK_WEATHER)
    assert time.monotonic() - started < 10  # 600 tokens would take 20-60 s here


# --- the context window -------------------------------------------------------------------------------------------


def test_a_prompt_over_the_window_is_refused_before_any_stream_byte(server: str) -> None:
    api = client(server)
    long = [{"role": "user", "content": "word " * (CONTEXT * 2)}]
    for stream in (False, True):
        with pytest.raises(openai.BadRequestError) as refused:
            api.chat.completions.create(model=MODEL, messages=long, stream=stream)  # raises here, not mid-stream
        error = refused.value.body
        assert (error["code"], error["type"], error["param"]) == (
            "context_length_exceeded", "invalid_request_error", "messages")  # fmt: skip
        assert f"maximum context length is {CONTEXT} tokens" in error["message"] and "/reset" not in error["message"]
        assert re.search(r"resulted in \d{4} tokens", error["message"])
    capped = api.chat.completions.create(model=MODEL, messages=ASK_WEATHER, max_tokens=CONTEXT * 8)
    assert capped.choices[0].finish_reason in ("stop", "length")  # more than the room is clipped to it


# --- structured output --------------------------------------------------------------------------------------------

PERSON = {"type": "object", "properties": {
    "name": {"type": "string"}, "age": {"type": "integer"}, "role": {"type": "string", "enum": ["admin", "user"]},
    "tags": {"type": "array", "items": {"type": "string"}}},
    "required": ["name", "age", "role", "tags"], "additionalProperties": False}  # fmt: skip


def test_json_schema_output_obeys_the_schema(server: str) -> None:
    api = client(server)
    ask = [{"role": "user", "content": "Invent a person."}]
    fmt = {"type": "json_schema", "json_schema": {"name": "person", "schema": PERSON, "strict": True}}
    whole = api.chat.completions.create(model=MODEL, messages=ask, response_format=fmt, max_tokens=200)
    jsonschema.validate(json.loads(whole.choices[0].message.content), PERSON)
    assert whole.choices[0].finish_reason == "stop"
    streamed = "".join(chunk.choices[0].delta.content or "" for chunk in api.chat.completions.create(
        model=MODEL, messages=ask, response_format=fmt, max_tokens=200, stream=True) if chunk.choices)  # fmt: skip
    jsonschema.validate(json.loads(streamed), PERSON)
    any_object = api.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "Hi"}],
                                             response_format={"type": "json_object"}, max_tokens=100)  # fmt: skip
    assert isinstance(json.loads(any_object.choices[0].message.content), dict)


def test_the_sdks_parse_helper_gets_its_pydantic_model(server: str) -> None:
    """``client.chat.completions.parse`` (what instructor-style code uses): a Pydantic model as a strict schema, the
    reply parsed back into it by the SDK itself."""
    from pydantic import BaseModel

    class City(BaseModel):
        name: str
        country: str
        population_millions: float

    ask = [{"role": "user", "content": "Describe Paris."}]
    parsed = client(server).chat.completions.parse(model=MODEL, response_format=City, max_tokens=80, messages=ask)
    assert isinstance(parsed.choices[0].message.parsed, City)


# --- tool calls ---------------------------------------------------------------------------------------------------


def check_weather_call(call: Any) -> None:
    assert call.type == "function" and call.id.startswith("call_") and call.function.name == "get_weather"
    jsonschema.validate(json.loads(call.function.arguments), WEATHER["function"]["parameters"])


def test_required_and_named_tool_choices_call_with_valid_arguments(server: str) -> None:
    api = client(server)
    for choice in ("required", {"type": "function", "function": {"name": "get_weather"}}):
        reply = api.chat.completions.create(model=MODEL, messages=ASK_WEATHER, tools=[WEATHER, TIME],
                                            tool_choice=choice, max_tokens=100)  # fmt: skip
        choice_made = reply.choices[0]
        assert choice_made.finish_reason == "tool_calls" and choice_made.message.content is None
        (call,) = choice_made.message.tool_calls
        check_weather_call(call) if call.function.name == "get_weather" else None
        assert call.function.name in ("get_weather", "get_time") and json.loads(call.function.arguments)["city"]
    named = api.chat.completions.create(model=MODEL, messages=ASK_WEATHER, tools=[WEATHER, TIME], max_tokens=100,
                                        tool_choice={"type": "function", "function": {"name": "get_time"}})  # fmt: skip
    assert named.choices[0].message.tool_calls[0].function.name == "get_time"


def test_tool_calls_stream_as_openai_streams_them(server: str) -> None:
    api = client(server)
    with api.chat.completions.stream(model=MODEL, messages=ASK_WEATHER, tools=[WEATHER], tool_choice="required",
                                     max_tokens=100) as stream:  # the SDK's own accumulator  # fmt: skip
        for _ in stream:
            pass
        final = stream.get_final_completion()
    assert final.choices[0].finish_reason == "tool_calls"
    check_weather_call(final.choices[0].message.tool_calls[0])
    chunks = list(api.chat.completions.create(model=MODEL, messages=ASK_WEATHER, tools=[WEATHER], stream=True,
                                              tool_choice="required", max_tokens=100))  # fmt: skip
    fragments = [call for chunk in chunks if chunk.choices for call in chunk.choices[0].delta.tool_calls or ()]
    assert fragments[0].id and fragments[0].function.name == "get_weather" and fragments[0].function.arguments == ""
    assert all(fragment.index == 0 for fragment in fragments)
    assert [chunk.choices[0].finish_reason for chunk in chunks if chunk.choices][-1] == "tool_calls"


def test_auto_tool_choice_gives_a_call_or_an_answer(server: str) -> None:
    reply = client(server).chat.completions.create(model=MODEL, messages=ASK_WEATHER, tools=[WEATHER],
                                                   max_tokens=100)  # fmt: skip
    choice = reply.choices[0]
    if choice.message.tool_calls:
        assert choice.finish_reason == "tool_calls" and choice.message.tool_calls[0].function.name == "get_weather"
        json.loads(choice.message.tool_calls[0].function.arguments)
    else:
        assert choice.finish_reason in ("stop", "length") and choice.message.content
        assert "<tool_call>" not in choice.message.content


def test_a_tool_result_in_the_history_is_answered(server: str) -> None:
    call = {
        "id": "call_abc",
        "type": "function",
        "function": {"name": "get_weather", "arguments": json.dumps({"city": "Paris", "unit": "celsius"})},
    }
    result = json.dumps({"temperature": 18, "sky": "sunny"})
    history = [*ASK_WEATHER, {"role": "assistant", "content": None, "tool_calls": [call]},
               {"role": "tool", "tool_call_id": "call_abc", "content": result}]  # fmt: skip
    reply = client(server).chat.completions.create(model=MODEL, messages=history, tools=[WEATHER], max_tokens=40)
    assert reply.choices[0].message.content and reply.choices[0].finish_reason in ("stop", "length")
    assert "18" in reply.choices[0].message.content


def test_parallel_tool_calls_off_gives_at_most_one_call(server: str) -> None:
    reply = client(server).chat.completions.create(
        model=MODEL, tools=[WEATHER, TIME], parallel_tool_calls=False, max_tokens=160,
        messages=[{"role": "user", "content": "What are the weather and the time in Paris and in Tokyo?"}])  # fmt: skip
    assert len(reply.choices[0].message.tool_calls or []) <= 1


def test_the_openai_backend_passes_tools_through_to_a_server(server: str) -> None:
    """Our own openai backend in front of this server: the tool call it reads back is the one the server made."""
    from assistant.config import LlmConfig, SamplingConfig
    from assistant.llm.openai_compat import OpenAIChatModel
    from assistant.messages import Message, Tool, ToolUse

    remote = OpenAIChatModel(LlmConfig(backend="openai", model=MODEL, base_url=f"{server}/v1", timeout_s=60))
    weather = Tool("get_weather", WEATHER["function"]["description"], WEATHER["function"]["parameters"])
    reply = remote.stream([Message("user", ASK_WEATHER[0]["content"])], SamplingConfig(temperature=0),
                          tool_use=ToolUse((weather,), "required"))  # fmt: skip
    assert "".join(reply) == "" and reply.stats.finish_reason == "tool_calls"
    (call,) = reply.tool_calls
    assert call.name == "get_weather" and json.loads(call.arguments)["city"]
    remote.close()


# --- errors everywhere under /v1 ----------------------------------------------------------------------------------


def test_errors_have_openais_shape_everywhere(server: str) -> None:
    unknown_route = requests.post(f"{server}/v1/chat/complete", json={}, timeout=10)
    assert unknown_route.status_code == 404
    assert unknown_route.json()["error"]["message"] == "Invalid URL (POST /v1/chat/complete)"
    wrong_method = requests.get(f"{server}/v1/chat/completions", timeout=10)
    assert wrong_method.status_code == 405 and wrong_method.json()["error"]["type"] == "invalid_request_error"
    bad_value = post(server, {"messages": ASK_WEATHER, "max_tokens": -1})
    assert bad_value.json()["error"]["param"] == "max_tokens" and "llm.sampling" not in bad_value.text
    for response in (unknown_route, wrong_method, bad_value):
        assert set(response.json()["error"]) == {"message", "type", "param", "code"}


SPEECH_USES: dict[str, dict[str, Any]] = {
    "input": {}, "model": {"model": "tts-1"}, "voice": {"voice": "alloy"},
    "response_format": {"response_format": "wav"},
    "speed": {"speed": 1.5}, "stream_format": {"stream_format": "audio"},
    "instructions": {"instructions": "Speak like a pirate."},
}  # fmt: skip


def test_every_speech_row_is_honoured_or_refused_by_name(server: str) -> None:
    from openai.types.audio import speech_create_params

    rows = table("POST /v1/audio/speech")
    assert set(typing.get_type_hints(speech_create_params.SpeechCreateParams)) <= set(rows) <= set(SPEECH_USES)
    for field, status in rows.items():
        body = {"model": "tts-1", "voice": "alloy", "input": "Hello.", "response_format": "pcm"} | SPEECH_USES[field]
        response = requests.post(f"{server}/v1/audio/speech", json=body, timeout=60)
        if status == "refused":
            assert response.status_code == 400 and response.json()["error"]["param"] == field, (field, response.text)
        else:
            assert response.status_code == 200 and len(response.content) > 1000, (field, response.text)
