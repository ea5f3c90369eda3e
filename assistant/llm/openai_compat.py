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
from assistant.messages import Message, ReplyStats
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
    ) -> Reply:
        return Reply(lambda reply: self._deltas(reply, list(messages), params, continue_last, cancel))

    def _request(self, messages: list[Message], params: SamplingConfig, continue_last: bool) -> dict[str, Any]:
        extra: dict[str, Any] = {"top_k": params.top_k, "repetition_penalty": params.repetition_penalty}
        if params.min_new_tokens:
            extra["min_tokens"] = params.min_new_tokens
        if continue_last:
            extra |= {"continue_final_message": True, "add_generation_prompt": False}
        request: dict[str, Any] = {
            "model": self._config.model,
            "messages": [{"role": m.role, "content": m.content} for m in messages],
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
        self,
        reply: Reply,
        messages: list[Message],
        params: SamplingConfig,
        continue_last: bool,
        cancel: threading.Event | None,
    ) -> Iterator[str]:
        started = time.perf_counter()
        first_s, chunks, finish, usage = 0.0, 0, "cancelled", None
        response = None
        try:
            response = self._client.chat.completions.create(**self._request(messages, params, continue_last))
            for chunk in response:
                usage = chunk.usage or usage
                if not chunk.choices:
                    continue
                choice = chunk.choices[0]
                if text := choice.delta.content:
                    first_s = first_s or time.perf_counter() - started
                    chunks += 1
                    yield text
                if choice.finish_reason:
                    finish = "length" if choice.finish_reason == "length" else "stop"
                if cancel is not None and cancel.is_set():
                    finish = "cancelled"
                    break
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
