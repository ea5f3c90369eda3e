"""JSON output by constrained decoding (issue 19): llguidance on the tiny random transformers model, llama.cpp
grammars on the offline Qwen2.5 GGUF, ``response_format`` passed through by the openai backend.

A random model, or a real one sampled hot, writes nonsense; under a schema the nonsense must still parse and obey it,
and end when the value is complete."""

from __future__ import annotations

import dataclasses
import json
import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any, ClassVar

import pytest

from assistant.config import LlmConfig, SamplingConfig
from assistant.errors import ConfigError
from assistant.llm.structured import JsonOutput, call_schema
from assistant.messages import Message, Tool
from tests.conftest import require_offline_models

jsonschema = pytest.importorskip("jsonschema")

# every keyword the forced tool calls use: enum, const, anyOf, nested objects, arrays, required, no extra properties;
# strings and arrays bounded so that a model writing noise still finishes the value
PET = {"type": "object", "properties": {"kind": {"enum": ["cat", "dog"]}}, "required": ["kind"],
       "additionalProperties": False}  # fmt: skip
PERSON = {
    "type": "object",
    "properties": {
        "name": {"type": "string", "maxLength": 8},
        "age": {"type": "integer"},
        "mood": {"enum": ["happy", "sad", "neutral"]},
        "tags": {"type": "array", "items": {"type": "string", "maxLength": 5}, "maxItems": 3},
        "pet": {"anyOf": [{"const": "none"}, PET]},
        "address": {
            "type": "object",
            "properties": {"city": {"type": "string", "maxLength": 8}, "zip": {"type": "string", "maxLength": 5}},
            "required": ["city"],
            "additionalProperties": False,
        },
        "verified": {"type": "boolean"},
    },
    "required": ["name", "age", "mood", "tags", "pet", "address"],
    "additionalProperties": False,
}
TOOLS = (
    Tool("get_weather", "The weather in a city", {"type": "object", "properties": {
        "city": {"type": "string", "maxLength": 10}, "unit": {"enum": ["celsius", "fahrenheit"]}},
        "required": ["city", "unit"], "additionalProperties": False}),
    Tool("get_time", "The time in a time zone", {"type": "object", "properties": {
        "zone": {"type": "string", "maxLength": 10}}, "required": ["zone"], "additionalProperties": False}),
)  # fmt: skip
ASK = [Message("user", "Describe a fictional person as JSON: name, age, mood, tags, pet, address.")]


def obeys(text: str, schema: dict[str, Any]) -> Any:
    value = json.loads(text)
    jsonschema.validate(value, schema)
    return value


# --- hf: llguidance on a tiny random model --------------------------------------------------------------------------

pytest.importorskip("transformers")
llguidance = pytest.importorskip("llguidance")

from assistant.llm.hf import HFChatModel, TokenMask  # noqa: E402


@pytest.fixture(scope="module")
def tiny(tiny_chat_model: Path) -> HFChatModel:
    return HFChatModel(LlmConfig(backend="hf", model=str(tiny_chat_model), system=None))


@pytest.mark.parametrize("seed", [1, 2, 3])
def test_random_model_writes_json_that_obeys_the_schema(tiny: HFChatModel, seed: int) -> None:
    # min_new_tokens would hold off the end past the value's close: under a schema the JSON decides the end
    params = SamplingConfig(temperature=1.0, top_k=0, top_p=1.0, max_new_tokens=400, min_new_tokens=300, seed=seed)
    reply = tiny.stream(ASK, params, output=JsonOutput(PERSON, name="person", strict=True))
    obeys("".join(reply), PERSON)
    assert reply.stats.finish_reason == "stop"


def test_random_model_writes_a_valid_forced_tool_call(tiny: HFChatModel) -> None:
    schema = call_schema(TOOLS)  # anyOf of {"name": const, "arguments": the function's parameters}
    for seed in (4, 5):
        params = SamplingConfig(temperature=1.0, top_k=0, top_p=1.0, max_new_tokens=300, seed=seed)
        reply = tiny.stream(ASK, params, output=JsonOutput(schema, name="tool_call", strict=True))
        call = obeys("".join(reply), schema)
        assert call["name"] in ("get_weather", "get_time") and reply.stats.finish_reason == "stop"


def test_json_object_mode_allows_an_object_and_nothing_else(tiny: HFChatModel) -> None:
    params = SamplingConfig(temperature=1.0, max_new_tokens=40, seed=6)
    assert "".join(tiny.stream(ASK, params, output=JsonOutput())).startswith("{")
    mask = TokenMask(tiny._matchers.get(JsonOutput()).deep_copy(), tiny._guidance_tokenizer.vocab_size)
    first = allowed(mask, 300)
    assert tiny.tokenize("{") == [first[0]] and len(first) == 1  # not a string, number or array: an object
    for token in tiny.tokenize('{"a": [1, {"b": null}], "c": "d"}'):
        mask.consume(token)
    assert allowed(mask, 300) == sorted(tiny._end_ids)  # complete: only the end may follow


def allowed(mask: TokenMask, width: int) -> list[int]:
    import torch

    logits = torch.zeros(1, width)
    mask.apply(logits)
    return [int(index) for index in torch.nonzero(logits[0] > -float("inf"))]


def test_logits_wider_than_the_tokenizer_never_pick_padding(tiny: HFChatModel) -> None:
    """Embedding matrices are often padded past the tokenizer's vocabulary (Qwen2.5: 151936 rows, 151665 tokens)."""
    mask = TokenMask(tiny._matchers.get(JsonOutput({"type": "integer"})).deep_copy(), len(tiny._tokenizer))
    ids = allowed(mask, len(tiny._tokenizer) + 77)
    assert ids and max(ids) < len(tiny._tokenizer)
    assert {tiny.decode([token]) for token in ids} <= set("-0123456789")


def test_a_schema_llguidance_cannot_enforce_is_refused_at_the_call(tiny: HFChatModel) -> None:
    params = SamplingConfig(max_new_tokens=8)
    unique = {"type": "array", "items": {"enum": [1, 2]}, "maxItems": 2, "uniqueItems": True}
    for schema, reason in (({"type": "color"}, "color"), ({"$ref": "#/$defs/missing"}, "missing"),
                           (unique, "uniqueItems")):  # fmt: skip
        with pytest.raises(ConfigError, match=reason) as caught:
            tiny.stream(ASK, params, output=JsonOutput(schema, strict=True))
        assert caught.value.param == "response_format" and "response_format" in caught.value.message
    # not strict: what llguidance implements is enforced, the rest left to the model (OpenAI's non-strict mode)
    reply = tiny.stream(ASK, dataclasses.replace(params, max_new_tokens=20, seed=1), output=JsonOutput(unique))
    assert isinstance(json.loads("".join(reply)), list)


def test_compiled_schemas_are_reused(tiny: HFChatModel) -> None:
    schema = {"type": "object", "properties": {"n": {"type": "integer"}}, "required": ["n"]}
    before = len(tiny._matchers)
    tiny.prepare_output(JsonOutput(schema))
    tiny.prepare_output(JsonOutput(dict(schema), name="other"))
    assert len(tiny._matchers) == before + 1
    tiny.prepare_output(JsonOutput(schema, strict=True))
    assert len(tiny._matchers) == before + 2


# --- llama-cpp: GBNF grammars on the offline Qwen2.5 GGUF -----------------------------------------------------------


@pytest.fixture(scope="module")
def qwen() -> Iterator[Any]:
    require_offline_models("qwen2.5-0.5b")
    from assistant.llm.llama_cpp import LlamaCppChatModel

    model = LlamaCppChatModel(LlmConfig(model="qwen2.5-0.5b", context_tokens=2048))
    yield model
    model.close()


GREEDY = SamplingConfig(temperature=0, repetition_penalty=1.0, max_new_tokens=200)


@pytest.mark.real_model
def test_qwen_follows_the_schema_and_stops_when_the_value_is_complete(qwen: Any) -> None:
    # min_new_tokens must not hold off the end: llama.cpp aborts the process on a token its grammar rejects
    params = dataclasses.replace(GREEDY, min_new_tokens=150)
    reply = qwen.stream(ASK, params, output=JsonOutput(PERSON))
    person = obeys("".join(reply), PERSON)
    assert reply.stats.finish_reason == "stop" and reply.stats.completion_tokens < 150 and person["name"]
    free = qwen.stream([Message("user", "Say hello in five words.")], dataclasses.replace(GREEDY, max_new_tokens=8))
    assert not "".join(free).lstrip().startswith("{")  # the grammar went with its reply
    assert free.stats.cached_tokens > 0  # and the KV cache of the shared system prompt was still reused


@pytest.mark.real_model
def test_hot_sampled_qwen_still_writes_valid_json(qwen: Any) -> None:
    params = SamplingConfig(temperature=2.0, top_k=0, top_p=1.0, repetition_penalty=1.0, max_new_tokens=300, seed=5)
    reply = qwen.stream(ASK, params, output=JsonOutput(PERSON))
    obeys("".join(reply), PERSON)
    assert reply.stats.finish_reason == "stop"
    call = qwen.stream([Message("user", "Weather in Paris?")], params, output=JsonOutput(call_schema(TOOLS)))
    assert obeys("".join(call), call_schema(TOOLS))["name"] in ("get_weather", "get_time")


@pytest.mark.real_model
def test_qwen_json_object_mode_gives_an_object(qwen: Any) -> None:
    reply = qwen.stream([Message("user", "Give me a JSON list of three fruits.")], GREEDY, output=JsonOutput())
    assert isinstance(json.loads("".join(reply)), dict) and reply.stats.finish_reason == "stop"


@pytest.mark.real_model
def test_llama_cpp_refuses_by_name_what_its_grammar_cannot_enforce_when_strict(qwen: Any) -> None:
    ranged = {"type": "object", "properties": {"age": {"type": "integer", "minimum": 0}}, "required": ["age"]}
    with pytest.raises(ConfigError, match="'minimum' at /properties/age") as caught:
        qwen.stream(ASK, GREEDY, output=JsonOutput(ranged, strict=True))
    assert caught.value.param == "response_format"
    missing = {"type": "object", "properties": {"a": {}}, "required": ["b"]}
    with pytest.raises(ConfigError, match="'required' name 'b'"):
        qwen.stream(ASK, GREEDY, output=JsonOutput(missing, strict=True))
    with pytest.raises(ConfigError, match="cannot turn the schema into a grammar"):
        qwen.stream(ASK, GREEDY, output=JsonOutput({"$ref": "#/$defs/missing"}))
    # not strict: the structure is enforced, the range left to the model (OpenAI's non-strict mode)
    reply = qwen.stream([Message("user", "How old is the Eiffel tower? JSON.")], GREEDY, output=JsonOutput(ranged))
    assert isinstance(json.loads("".join(reply))["age"], int)


# --- openai: response_format passed through --------------------------------------------------------------------------


class ScriptedServer(BaseHTTPRequestHandler):
    """Answers every chat completion with one streamed chunk of JSON; keeps the request bodies."""

    bodies: ClassVar[list[dict[str, Any]]] = []

    def do_POST(self) -> None:
        self.bodies.append(json.loads(self.rfile.read(int(self.headers["Content-Length"]))))
        chunk = {"id": "c", "object": "chat.completion.chunk", "created": 0, "model": "m",
                 "choices": [{"index": 0, "delta": {"content": '{"a": 1}'}, "finish_reason": "stop"}]}  # fmt: skip
        payload = f"data: {json.dumps(chunk)}\n\ndata: [DONE]\n\n".encode()
        self.send_response(200)
        self.send_header("Content-Type", "text/event-stream")
        self.send_header("Content-Length", str(len(payload)))
        self.end_headers()
        self.wfile.write(payload)

    def log_message(self, *args: Any) -> None:
        pass


@pytest.fixture(scope="module")
def scripted() -> Iterator[str]:
    pytest.importorskip("openai")
    server = ThreadingHTTPServer(("127.0.0.1", 0), ScriptedServer)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_address[1]}/v1"
    server.shutdown()
    server.server_close()


def test_openai_backend_sends_response_format(scripted: str) -> None:
    from assistant.llm.openai_compat import OpenAIChatModel

    model = OpenAIChatModel(LlmConfig(backend="openai", model="m", base_url=scripted, timeout_s=10))
    params = SamplingConfig(max_new_tokens=16)
    try:
        for output in (None, JsonOutput(), JsonOutput(PERSON, name="person", strict=True)):
            assert "".join(model.stream(ASK, params, output=output)) == '{"a": 1}'
    finally:
        model.close()
    plain, any_object, person = ScriptedServer.bodies[-3:]
    assert "response_format" not in plain
    assert any_object["response_format"] == {"type": "json_object"}
    assert person["response_format"] == {
        "type": "json_schema",
        "json_schema": {"name": "person", "schema": PERSON, "strict": True},
    }
