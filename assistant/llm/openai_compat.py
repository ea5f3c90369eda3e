"""Chat backend for any OpenAI-compatible server: vLLM, llama.cpp server, Ollama, another ``assistant serve``.

This is how a deployment grows past one machine: the server does the generation, we keep the conversation. The
server renders the prompt with the model's own template. ``top_k`` and ``repetition_penalty`` go in the request body
the way vLLM and llama.cpp server read them; servers that do not know them ignore them. Continuing a reply uses
vLLM's ``continue_final_message``.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator, Sequence
from typing import Any

from assistant.config import LlmConfig, SamplingConfig
from assistant.errors import AssistantError, ConfigError, LlmError, PromptTooLongError
from assistant.llm.base import Reply
from assistant.llm.structured import JsonOutput, new_call_id
from assistant.messages import Message, ReplyStats, ToolCall, ToolUse
from assistant.remote import connect

_CHARS_PER_TOKEN = 4  # rough size of a token of non-CJK text, for the context estimate (the API has no tokenizer)
_TOKENS_PER_MESSAGE = 4  # role markers and separators around each message


class OpenAIChatModel:
    def __init__(self, config: LlmConfig) -> None:
        remote = connect("llm", config.base_url, config.api_key, timeout_s=config.timeout_s, max_retries=0,
                         example="http://127.0.0.1:8000/v1")  # fmt: skip
        self._openai, self._client, self._base_url = remote.openai, remote.client, remote.base_url
        self._config = config
        self.context_tokens = config.context_tokens

    @property
    def description(self) -> str:
        return f"openai {self._config.model} at {self._base_url}"

    def count_tokens(self, messages: Sequence[Message]) -> int:
        """An estimate: CJK characters count one token each, other text one per four characters."""
        total = 0
        for message in messages:
            cjk = sum(1 for char in message.content if _is_wide(char))
            total += cjk + (len(message.content) - cjk) // _CHARS_PER_TOKEN + _TOKENS_PER_MESSAGE
        return total

    def stream(
        self,
        messages: Sequence[Message],
        params: SamplingConfig,
        *,
        continue_last: bool = False,
        cancel: threading.Event | None = None,
        output: JsonOutput | None = None,
        tool_use: ToolUse | None = None,
    ) -> Reply:
        request = self._request(list(messages), params, continue_last) | _tool_fields(tool_use)
        request |= _output_fields(output)
        return Reply(lambda reply: self._deltas(reply, request, cancel))

    def _request(self, messages: list[Message], params: SamplingConfig, continue_last: bool) -> dict[str, Any]:
        extra: dict[str, Any] = {"top_k": params.top_k, "repetition_penalty": params.repetition_penalty}
        if params.min_new_tokens:
            extra["min_tokens"] = params.min_new_tokens
        if continue_last:
            extra |= {"continue_final_message": True, "add_generation_prompt": False}
        request: dict[str, Any] = {
            "model": self._config.model,
            "messages": [_as_openai(m) for m in messages],
            "stream": True,
            "stream_options": {"include_usage": True},
            "temperature": params.temperature,
            "top_p": params.top_p,
            "max_tokens": params.max_new_tokens,
            "extra_body": extra,
        }
        if params.stop:
            request["stop"] = list(params.stop)
        if params.seed is not None:
            request["seed"] = params.seed
        return request

    def _deltas(
        self, reply: Reply, request: dict[str, Any], cancel: threading.Event | None
    ) -> Iterator[str | ToolCall]:
        started = time.perf_counter()
        first_s, chunks, finish, usage = 0.0, 0, "cancelled", None
        response = None
        calls: dict[int, dict[str, str]] = {}  # tool calls as their fragments arrive, by index
        try:
            response = self._client.chat.completions.create(**request)
            for chunk in response:
                usage = chunk.usage or usage
                if not chunk.choices:
                    continue
                choice = chunk.choices[0]
                if text := choice.delta.content:
                    first_s = first_s or time.perf_counter() - started
                    chunks += 1
                    yield text
                for fragment in choice.delta.tool_calls or ():
                    first_s = first_s or time.perf_counter() - started
                    _gather(calls, fragment)
                if choice.finish_reason:
                    finish = choice.finish_reason if choice.finish_reason in ("length", "tool_calls") else "stop"
                if cancel is not None and cancel.is_set():
                    finish = "cancelled"
                    break
            for index in sorted(calls):
                call = calls[index]
                yield ToolCall(call["id"] or new_call_id(), call["name"], call["arguments"])
            if calls and finish != "cancelled":
                finish = "tool_calls"
        except self._openai.APIConnectionError as exc:
            raise LlmError(f"cannot reach the server at {self._base_url} ({exc}); is it running?") from None
        except self._openai.APIError as exc:  # a refusal, before the stream (a status) or inside it (an event)
            raise self._refusal(exc) from None
        finally:
            if response is not None:
                response.close()
            reply.stats = ReplyStats(
                prompt_tokens=usage.prompt_tokens if usage else 0,
                completion_tokens=usage.completion_tokens if usage else chunks,
                first_token_s=first_s,
                total_s=time.perf_counter() - started,
                finish_reason=finish,
            )

    def close(self) -> None:
        self._client.close()

    def _refusal(self, exc: Any) -> AssistantError:
        """The server's refusal as our error: what the request got wrong stays a client error (a prompt over the
        window, a bad request), anything else is the generation failing."""
        status = getattr(exc, "status_code", None)
        body = exc.body if isinstance(exc.body, dict) else {}
        error = body.get("error", body) if isinstance(body.get("error", body), dict) else {}
        code = error.get("code") or error.get("type")
        message = f"the server at {self._base_url} answered{f' {status}' if status else ''}: {_server_message(exc)}"
        if code in ("prompt-too-long", "context_length_exceeded"):
            return PromptTooLongError(message)
        if status in (400, 413, 422) or code in ("template", "config", "invalid_request_error"):
            return ConfigError(message)
        return LlmError(message)


def _as_openai(message: Message) -> dict[str, Any]:
    """A message as OpenAI's API takes it (tool calls with their JSON arguments as text, a tool result's call id)."""
    sent: dict[str, Any] = {"role": message.role, "content": message.content}
    if message.tool_calls:
        sent["content"] = message.content or None
        sent["tool_calls"] = [call.to_openai() for call in message.tool_calls]
    if message.tool_call_id is not None:
        sent["tool_call_id"] = message.tool_call_id
    return sent


def _output_fields(output: JsonOutput | None) -> dict[str, Any]:
    """``response_format`` for the server, which constrains its own decoding (vLLM, llama.cpp server and another
    ``assistant serve`` all do): ``json_object`` for any object, ``json_schema`` with OpenAI's name and strict."""
    if output is None:
        return {}
    if output.schema is None:
        return {"response_format": {"type": "json_object"}}
    schema = {"name": output.name, "schema": output.schema, "strict": output.strict}
    return {"response_format": {"type": "json_schema", "json_schema": schema}}


def _tool_fields(tool_use: ToolUse | None) -> dict[str, Any]:
    """``tools``, ``tool_choice`` and ``parallel_tool_calls`` for the server, which parses its model's calls."""
    if tool_use is None or not tool_use.tools:
        return {}
    choice: Any = tool_use.choice
    if choice not in ("auto", "required", "none"):
        choice = {"type": "function", "function": {"name": choice}}
    return {"tools": [tool.to_openai() for tool in tool_use.tools], "tool_choice": choice,
            "parallel_tool_calls": tool_use.parallel}  # fmt: skip


def _gather(calls: dict[int, dict[str, str]], fragment: Any) -> None:
    """Add one streamed tool-call fragment (OpenAI sends id and name first, then the arguments in pieces)."""
    call = calls.setdefault(fragment.index, {"id": "", "name": "", "arguments": ""})
    call["id"] = fragment.id or call["id"]
    if fragment.function is not None:
        call["name"] += fragment.function.name or ""
        call["arguments"] += fragment.function.arguments or ""


def _server_message(exc: Any) -> str:
    body = exc.body
    if isinstance(body, dict):
        error = body.get("error", body)
        if isinstance(error, dict) and error.get("message"):
            return str(error["message"])
        if isinstance(error, str):
            return error
    return str(exc.message)


def _is_wide(char: str) -> bool:
    return "\u2e80" <= char <= "\u9fff" or "\uac00" <= char <= "\ud7af" or "\uf900" <= char <= "\ufaff"
