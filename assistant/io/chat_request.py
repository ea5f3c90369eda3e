"""``POST /v1/chat/completions`` bodies, read field by field against OpenAI's API reference.

Every field OpenAI defines is either honoured or refused with an InvalidRequestError naming it (``error.param``);
a field OpenAI does not define is refused as OpenAI refuses it (``unknown_parameter``). docs/openai-compat.md lists
each field with what happens to it, and tests/test_openai_compat.py checks every row against a running server.
Messages come out as our Message type (``developer`` is system instructions, as OpenAI treats it), tools as ToolUse,
``response_format`` as JsonOutput, the sampling fields over the server's ``llm.sampling``.
"""

from __future__ import annotations

import dataclasses
import json
import math
import re
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from assistant.config import SamplingConfig
from assistant.errors import InvalidRequestError
from assistant.llm.structured import JsonOutput
from assistant.messages import Message, Tool, ToolCall, ToolUse

MAX_STOP_STRINGS = 4  # OpenAI's limit
_FUNCTION_NAME = re.compile(r"^[A-Za-z0-9_-]{1,64}$")  # OpenAI's rule for function names


@dataclass(frozen=True)
class ChatRequest:
    """A validated chat completions request."""

    messages: list[Message]
    sampling: SamplingConfig
    stream: bool = False
    include_usage: bool = False
    output: JsonOutput | None = None
    tool_use: ToolUse | None = None

    @property
    def continue_last(self) -> bool:
        """A conversation ending in an assistant message (without calls) asks for that reply to go on."""
        last = self.messages[-1]
        return last.role == "assistant" and not last.tool_calls


def refused(param: str, why: str, *, code: str = "unsupported_parameter") -> InvalidRequestError:
    return InvalidRequestError(f"{param}: {why}", param=param, code=code)


def invalid(param: str, expected: str, value: Any, *, code: str = "invalid_value") -> InvalidRequestError:
    shown = json.dumps(value, ensure_ascii=False)[:80] if _jsonable(value) else repr(value)[:80]
    return InvalidRequestError(f"Invalid value for '{param}': expected {expected}, got {shown}", param=param,
                               code=code)  # fmt: skip


def _jsonable(value: Any) -> bool:
    try:
        json.dumps(value)
    except (TypeError, ValueError):
        return False
    return True


# --- the fields ---------------------------------------------------------------------------------------------------

# Fields OpenAI defines that this server does not do, with why (what to send instead); refused whatever their value
# unless the value is one that asks for nothing (``_NEUTRAL``).
REFUSED: dict[str, str] = {
    "audio": "spoken replies are not made here; use the Realtime API (/v1/realtime) for voice out",
    "function_call": "deprecated by OpenAI; send tools and tool_choice",
    "functions": "deprecated by OpenAI; send tools and tool_choice",
    "logit_bias": "not supported by this server",
    "logprobs": "token log probabilities are not returned by this server",
    "metadata": "nothing is stored on this server (store), so there is nothing to tag",
    "moderation": "this server runs no moderation model",
    "prediction": "predicted outputs are not supported by this server",
    "prompt_cache_options": "the prompt cache here is automatic (the previous prompt's KV cache is reused)",
    "reasoning_effort": "the served model does not reason before answering",
    "top_logprobs": "token log probabilities are not returned by this server",
    "verbosity": "the served model has no verbosity setting",
    "web_search_options": "this server has no web search",
    "frequency_penalty": "not supported by this server; repetition_penalty (vLLM's name) is",
    "presence_penalty": "not supported by this server; repetition_penalty (vLLM's name) is",
}
# values of refused fields that ask for nothing, so that clients sending OpenAI's defaults explicitly still work
_NEUTRAL: dict[str, tuple[Any, ...]] = {
    "logit_bias": ({},),
    "logprobs": (False,),
    "top_logprobs": (0,),
    "frequency_penalty": (0, 0.0),
    "presence_penalty": (0, 0.0),
    "reasoning_effort": ("none",),
    "metadata": ({},),
    "functions": ([],),
}
# honoured fields; ``messages`` and ``model`` are read by the route, the rest below
SUPPORTED = (
    "messages", "model", "max_completion_tokens", "max_tokens", "modalities", "n", "parallel_tool_calls",
    "prompt_cache_key", "prompt_cache_retention", "response_format", "safety_identifier", "seed", "service_tier",
    "stop", "store", "stream", "stream_options", "temperature", "tool_choice", "tools", "top_p", "user",
)  # fmt: skip
EXTENSIONS = ("top_k", "repetition_penalty", "min_tokens")  # vLLM's names for sampling OpenAI does not have


def chat_request(body: dict[str, Any], defaults: SamplingConfig) -> ChatRequest:
    """The body checked against OpenAI's reference; InvalidRequestError names the first field at fault."""
    for name, value in body.items():
        if name in REFUSED:
            if value is None or any(value == neutral and type(value) is type(neutral) for neutral in
                                    _NEUTRAL.get(name, ())):  # fmt: skip
                continue
            raise refused(name, REFUSED[name])
        if name not in SUPPORTED and name not in EXTENSIONS:
            raise InvalidRequestError(f"Unrecognized request argument supplied: {name}", param=name,
                                      code="unknown_parameter")  # fmt: skip
    _check_plain_fields(body)
    stream = _optional(body, "stream", bool, "true or false") or False
    tool_use = tool_use_of(body)
    output = output_of(body.get("response_format"))
    if output is not None and tool_use is not None and tool_use.choice != "none":
        raise refused("response_format", "JSON output together with tools is not supported here; send one of "
                      "the two", code="unsupported_value")  # fmt: skip
    return ChatRequest(
        messages=messages_of(body.get("messages")),
        sampling=sampling_of(body, defaults),
        stream=stream,
        include_usage=_include_usage(body.get("stream_options"), stream),
        output=output,
        tool_use=tool_use,
    )


def _check_plain_fields(body: dict[str, Any]) -> None:
    """The fields that change nothing here, or only accept the value that is all this server does."""
    n = body.get("n")
    if n is not None and (type(n) is not int or n != 1):
        raise refused("n", f"one choice per request is generated here, got {n!r}; send n: 1 (or leave it out) "
                      "and send the request again for another", code="unsupported_value")  # fmt: skip
    modalities = body.get("modalities")
    if modalities is not None and modalities != ["text"]:
        raise refused("modalities", f"only ['text'] is made here, got {modalities!r}; use the Realtime API "
                      "(/v1/realtime) for voice out", code="unsupported_value")  # fmt: skip
    if body.get("store") not in (None, False):
        raise refused("store", "nothing is stored on this server; send store: false or leave it out",
                      code="unsupported_value")  # fmt: skip
    tier = body.get("service_tier")
    if tier not in (None, "auto", "default"):
        raise refused("service_tier", f"one tier exists here, {tier!r} does not; send auto or default",
                      code="unsupported_value")  # fmt: skip
    retention = body.get("prompt_cache_retention")
    if retention not in (None, "in_memory"):
        raise refused("prompt_cache_retention", "the prompt cache lives in memory only (in_memory)",
                      code="unsupported_value")  # fmt: skip
    for name in ("user", "safety_identifier", "prompt_cache_key"):
        _optional(body, name, str, "a string")
    model = body.get("model")
    if model is not None and not isinstance(model, str):
        raise invalid("model", "a model name", model, code="invalid_type")


def _optional(body: dict[str, Any], name: str, kind: type, expected: str) -> Any:
    value = body.get(name)
    if value is not None and type(value) is not kind:
        raise invalid(name, expected, value, code="invalid_type")
    return value


def _include_usage(options: Any, stream: bool) -> bool:
    if options is None:
        return False
    if not stream:
        raise refused("stream_options", "only allowed when stream is true", code="invalid_value")
    if not isinstance(options, dict):
        raise invalid("stream_options", 'an object such as {"include_usage": true}', options, code="invalid_type")
    for key, value in options.items():
        if key == "include_usage":
            if type(value) is not bool:
                raise invalid("stream_options.include_usage", "true or false", value, code="invalid_type")
        elif key == "include_obfuscation":
            if value is not False:
                raise refused("stream_options.include_obfuscation", "no obfuscation padding is added to stream "
                              "events here; send false (and keep the server behind TLS on networks you do not "
                              "trust)", code="unsupported_value")  # fmt: skip
        else:
            raise InvalidRequestError(f"Unrecognized stream option: {key}", param=f"stream_options.{key}",
                                      code="unknown_parameter")  # fmt: skip
    return bool(options.get("include_usage"))


# --- sampling -----------------------------------------------------------------------------------------------------


def _number(body: dict[str, Any], name: str, check: Callable[[float], bool], expected: str) -> float | None:
    value = body.get(name)
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value) or not check(value):
        raise invalid(name, expected, value)
    return float(value)


def _whole(body: dict[str, Any], name: str, low: int, expected: str) -> int | None:
    value = body.get(name)
    if value is None:
        return None
    if type(value) is not int or value < low:
        raise invalid(name, expected, value)
    return value


def sampling_of(body: dict[str, Any], defaults: SamplingConfig) -> SamplingConfig:
    """The server's ``llm.sampling`` with the request's fields over it. ``max_tokens`` (or the newer
    ``max_completion_tokens``) more than the context has room for is clipped to the room: the reply then ends with
    finish_reason ``length``."""
    changes: dict[str, Any] = {}
    temperature = _number(body, "temperature", lambda v: 0 <= v <= 2, "a number from 0 to 2")
    top_p = _number(body, "top_p", lambda v: 0 < v <= 1, "a number greater than 0, at most 1")
    repetition = _number(body, "repetition_penalty", lambda v: v > 0, "a number greater than 0 (1 = off)")
    for name, value in (("temperature", temperature), ("top_p", top_p), ("repetition_penalty", repetition)):
        if value is not None:
            changes[name] = value
    top_k = body.get("top_k")
    if top_k is not None:
        if type(top_k) is not int or top_k < -1:
            raise invalid("top_k", "a whole number, 0 or -1 for off", top_k)
        changes["top_k"] = max(top_k, 0)
    for name in ("max_tokens", "max_completion_tokens"):  # the newer name wins when both are sent
        if (limit := _whole(body, name, 1, "a whole number of at least 1")) is not None:
            changes["max_new_tokens"] = limit
    if (minimum := _whole(body, "min_tokens", 0, "a whole number of at least 0")) is not None:
        changes["min_new_tokens"] = minimum
    seed = body.get("seed")
    if seed is not None:
        if type(seed) is not int:
            raise invalid("seed", "a whole number", seed, code="invalid_type")
        changes["seed"] = seed
    stop = body.get("stop")
    if stop is not None:
        stops = [stop] if isinstance(stop, str) else stop
        if not isinstance(stops, list) or not all(isinstance(s, str) and s for s in stops):
            raise invalid("stop", "a non-empty string or a list of them", stop)
        if len(stops) > MAX_STOP_STRINGS:
            raise invalid("stop", f"at most {MAX_STOP_STRINGS} strings", stop)
        changes["stop"] = tuple(stops)
    sampling = dataclasses.replace(defaults, **{k: v for k, v in changes.items() if k != "min_new_tokens"})
    minimum_asked = changes.get("min_new_tokens", 0 if "max_new_tokens" in changes else sampling.min_new_tokens)
    if minimum_asked > sampling.max_new_tokens:
        raise invalid("min_tokens", f"at most max_tokens ({sampling.max_new_tokens})", minimum_asked)
    return dataclasses.replace(sampling, min_new_tokens=minimum_asked)


# --- messages -----------------------------------------------------------------------------------------------------

_MESSAGE_FIELDS = {
    "system": {"role", "content", "name"},
    "developer": {"role", "content", "name"},
    "user": {"role", "content", "name"},
    "assistant": {"role", "content", "name", "tool_calls", "refusal", "audio", "function_call"},
    "tool": {"role", "content", "tool_call_id"},
}
_PART_KINDS = {"image_url": "images", "input_audio": "audio", "file": "files", "refusal": "refusal parts"}


def messages_of(items: Any) -> list[Message]:
    if not isinstance(items, list) or not items:
        raise invalid("messages", "a non-empty list of messages", items)
    return [_message(item, f"messages[{index}]") for index, item in enumerate(items)]


def _message(item: Any, where: str) -> Message:
    if not isinstance(item, dict):
        raise invalid(where, "a message object {role, content}", item, code="invalid_type")
    role = item.get("role")
    if role == "function":
        raise refused(f"{where}.role", "function messages are deprecated by OpenAI; send tool messages",
                      code="unsupported_value")  # fmt: skip
    if role not in _MESSAGE_FIELDS:
        raise invalid(f"{where}.role", "one of system, developer, user, assistant, tool", role)
    for key in item:
        if key not in _MESSAGE_FIELDS[role]:
            raise InvalidRequestError(f"Unrecognized field in a {role} message: {key}", param=f"{where}.{key}",
                                      code="unknown_parameter")  # fmt: skip
    for key, why in (("name", "participant names are not given to this model (its chat template has no place "
                      "for them); put the name in the content"),
                     ("audio", "earlier spoken replies are not kept here; send their transcript as content"),
                     ("function_call", "deprecated by OpenAI; send tool_calls")):  # fmt: skip
        if item.get(key) is not None:
            raise refused(f"{where}.{key}", why)
    if item.get("refusal") not in (None, ""):
        raise refused(f"{where}.refusal", "send the refusal text as the message content")
    if role == "assistant":
        calls = _tool_calls(item.get("tool_calls"), f"{where}.tool_calls")
        content = _content(item.get("content"), f"{where}.content", nullable=bool(calls))
        return Message("assistant", content, tool_calls=calls)
    content = _content(item.get("content"), f"{where}.content", nullable=False)
    if role == "tool":
        call_id = item.get("tool_call_id")
        if not isinstance(call_id, str) or not call_id:
            raise invalid(f"{where}.tool_call_id", "the id of the call this is the result of", call_id)
        return Message("tool", content, tool_call_id=call_id)
    return Message("system" if role == "developer" else role, content)


def _content(value: Any, where: str, *, nullable: bool) -> str:
    """Text content: a string, or a list of text parts (joined). A part the model cannot take is refused by name."""
    if value is None and nullable:
        return ""
    if isinstance(value, str):
        return value
    if not isinstance(value, list):
        raise invalid(where, "a string or a list of content parts", value, code="invalid_type")
    texts = []
    for index, part in enumerate(value):
        kind = part.get("type") if isinstance(part, dict) else None
        if kind in _PART_KINDS:
            raise refused(f"{where}[{index}]", f"{kind} parts are not supported: the served model reads text only, "
                          f"not {_PART_KINDS[kind]}; send text parts", code="unsupported_value")  # fmt: skip
        if kind != "text" or not isinstance(part.get("text"), str):
            raise invalid(f"{where}[{index}]", 'a content part such as {"type": "text", "text": "..."}', part)
        texts.append(part["text"])
    return "".join(texts)


def _tool_calls(value: Any, where: str) -> tuple[ToolCall, ...]:
    if value is None:
        return ()
    if not isinstance(value, list):
        raise invalid(where, "a list of tool calls", value, code="invalid_type")
    calls = []
    for index, call in enumerate(value):
        place = f"{where}[{index}]"
        function = call.get("function") if isinstance(call, dict) else None
        if not isinstance(call, dict) or call.get("type", "function") != "function" or not isinstance(function, dict):
            raise invalid(place, '{"id", "type": "function", "function": {"name", "arguments"}}', call)
        name, arguments, call_id = function.get("name"), function.get("arguments", ""), call.get("id")
        if not isinstance(call_id, str) or not call_id:
            raise invalid(f"{place}.id", "the call's id (tool messages name it in tool_call_id)", call_id)
        if not isinstance(name, str) or not isinstance(arguments, str):
            raise invalid(f"{place}.function", "a name and arguments as a JSON string", function)
        calls.append(ToolCall(call_id, name, arguments))
    return tuple(calls)


# --- tools and structured output ----------------------------------------------------------------------------------


def tool_use_of(body: dict[str, Any]) -> ToolUse | None:
    """``tools``, ``tool_choice`` and ``parallel_tool_calls``; None when no tools are offered."""
    tools_value, choice_value = body.get("tools"), body.get("tool_choice")
    parallel = _optional(body, "parallel_tool_calls", bool, "true or false")
    if tools_value is None or tools_value == []:
        if choice_value not in (None, "none"):
            raise invalid("tool_choice", "tool_choice only together with tools", choice_value)
        return None
    if not isinstance(tools_value, list):
        raise invalid("tools", "a list of tools", tools_value, code="invalid_type")
    tools = tuple(_tool(item, f"tools[{index}]") for index, item in enumerate(tools_value))
    names = [tool.name for tool in tools]
    if len(set(names)) != len(names):
        raise invalid("tools", "functions with different names", names)
    return ToolUse(tools, _tool_choice(choice_value, names), True if parallel is None else parallel)


def _only(value: dict[str, Any], allowed: tuple[str, ...], where: str) -> None:
    """A nested object's keys: one OpenAI does not define is refused by name, as at the top level."""
    for key in value:
        if key not in allowed:
            raise InvalidRequestError(f"Unrecognized field: {where}.{key}", param=f"{where}.{key}",
                                      code="unknown_parameter")  # fmt: skip


def _tool(item: Any, where: str) -> Tool:
    if isinstance(item, dict) and item.get("type") == "custom":
        raise refused(f"{where}.type", "custom (free-text) tools are not supported here; send function tools",
                      code="unsupported_value")  # fmt: skip
    function = item.get("function") if isinstance(item, dict) else None
    if not isinstance(item, dict) or item.get("type") != "function" or not isinstance(function, dict):
        raise invalid(where, '{"type": "function", "function": {"name", "description", "parameters"}}', item)
    _only(item, ("type", "function"), where)
    _only(function, ("name", "description", "parameters", "strict"), f"{where}.function")
    name = function.get("name")
    if not isinstance(name, str) or not _FUNCTION_NAME.match(name):
        raise invalid(f"{where}.function.name", "letters, digits, _ and -, at most 64", name)
    description = function.get("description") or ""
    if not isinstance(description, str):
        raise invalid(f"{where}.function.description", "a string", description, code="invalid_type")
    parameters = function.get("parameters", {"type": "object", "properties": {}})
    if not isinstance(parameters, dict) or parameters.get("type", "object") != "object":
        raise invalid(f"{where}.function.parameters", 'a JSON Schema of an object ({"type": "object", ...}): '
                      "arguments are named", parameters, code="invalid_type")  # fmt: skip
    strict = function.get("strict") or False
    if not isinstance(strict, bool):
        raise invalid(f"{where}.function.strict", "true or false", strict, code="invalid_type")
    return Tool(name, description, parameters, strict)


def _tool_choice(value: Any, names: list[str]) -> str:
    if value is None:
        return "auto"
    if value in ("none", "auto", "required"):
        return str(value)
    if isinstance(value, dict) and value.get("type") == "allowed_tools":
        raise refused("tool_choice", "allowed_tools is not supported here; send only the tools allowed",
                      code="unsupported_value")  # fmt: skip
    function = value.get("function") if isinstance(value, dict) and value.get("type") == "function" else None
    name = function.get("name") if isinstance(function, dict) else None
    if not isinstance(name, str):
        raise invalid("tool_choice", 'none, auto, required or {"type": "function", "function": {"name": ...}}', value)
    if name not in names:
        raise invalid("tool_choice", f"the name of one of the tools ({', '.join(names)})", name)
    return name


def output_of(value: Any) -> JsonOutput | None:
    """``response_format``: text (None), json_object, or json_schema with its name, schema and strict."""
    if value is None:
        return None
    kind = value.get("type") if isinstance(value, dict) else None
    if isinstance(value, dict):
        _only(value, ("type", "json_schema"), "response_format")
    if kind == "text":
        return None
    if kind == "json_object":
        return JsonOutput()
    if kind != "json_schema":
        raise invalid("response_format", '{"type": "text"}, {"type": "json_object"} or {"type": "json_schema", '
                      '"json_schema": {...}}', value)  # fmt: skip
    spec = value.get("json_schema")
    if not isinstance(spec, dict):
        raise invalid("response_format.json_schema", "an object with name and schema", spec)
    _only(spec, ("name", "description", "schema", "strict"), "response_format.json_schema")
    name, schema, strict = spec.get("name"), spec.get("schema", {}), spec.get("strict") or False
    if not isinstance(name, str) or not _FUNCTION_NAME.match(name):
        raise invalid("response_format.json_schema.name", "letters, digits, _ and -, at most 64", name)
    if not isinstance(schema, dict):
        raise invalid("response_format.json_schema.schema", "a JSON Schema object", schema, code="invalid_type")
    if not isinstance(strict, bool):
        raise invalid("response_format.json_schema.strict", "true or false", strict, code="invalid_type")
    return JsonOutput(schema, name, strict)
