"""The OpenAI-compatible backend against a real HTTP server on 127.0.0.1 speaking the chat completions API."""

from __future__ import annotations

import json
import socket
import threading
import time
from collections.abc import Iterator
from typing import Any

import pytest

from assistant.chat import ChatSession
from assistant.config import LlmConfig, SamplingConfig
from assistant.conversation import Conversation
from assistant.errors import ConfigError, LlmError
from assistant.messages import Message

pytest.importorskip("openai")
fastapi = pytest.importorskip("fastapi")
uvicorn = pytest.importorskip("uvicorn")

from assistant.llm.openai_compat import OpenAIChatModel  # noqa: E402

PIECES = ["北", "京是", "中国的首都。"]


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


def fake_openai_app(requests: list[dict[str, Any]]) -> Any:
    """Streams a fixed reply as SSE the way vLLM does; records every request body."""
    from fastapi.responses import JSONResponse, StreamingResponse

    app = fastapi.FastAPI()

    @app.post("/v1/chat/completions")
    async def completions(body: dict[str, Any]) -> Any:
        requests.append(body)
        if body["model"] == "missing":
            return JSONResponse({"error": {"message": "The model `missing` does not exist."}}, status_code=404)

        def events() -> Iterator[str]:
            for index, piece in enumerate(PIECES):
                finish = "stop" if index == len(PIECES) - 1 else None
                chunk = {"id": "c", "object": "chat.completion.chunk", "created": 0, "model": body["model"],
                         "choices": [{"index": 0, "delta": {"content": piece}, "finish_reason": finish}]}  # fmt: skip
                yield f"data: {json.dumps(chunk, ensure_ascii=False)}\n\n"
            usage = {"id": "c", "object": "chat.completion.chunk", "created": 0, "model": body["model"], "choices": [],
                     "usage": {"prompt_tokens": 17, "completion_tokens": 5, "total_tokens": 22}}  # fmt: skip
            yield f"data: {json.dumps(usage)}\n\ndata: [DONE]\n\n"

        return StreamingResponse(events(), media_type="text/event-stream")

    return app


@pytest.fixture(scope="module")
def server() -> Iterator[tuple[str, list[dict[str, Any]]]]:
    requests: list[dict[str, Any]] = []
    port = free_port()
    config = uvicorn.Config(fake_openai_app(requests), host="127.0.0.1", port=port, log_level="error")
    instance = uvicorn.Server(config)
    thread = threading.Thread(target=instance.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 10
    while not instance.started and time.monotonic() < deadline:
        time.sleep(0.05)
    assert instance.started, "the test server did not start"
    yield f"http://127.0.0.1:{port}/v1", requests
    instance.should_exit = True
    thread.join(timeout=10)


def client(base_url: str, model: str = "Qwen/Qwen2.5-7B-Instruct") -> OpenAIChatModel:
    return OpenAIChatModel(LlmConfig(backend="openai", model=model, base_url=base_url, timeout_s=10))


def test_streams_deltas_and_sends_every_sampling_knob(server: tuple[str, list[dict[str, Any]]]) -> None:
    base_url, requests = server
    params = SamplingConfig(temperature=0.3, top_p=0.95, top_k=50, repetition_penalty=1.3, max_new_tokens=512,
                            stop=("\n\n",), seed=5)  # fmt: skip
    chat = ChatSession(client(base_url), Conversation("你是一个乐于助人的助手。"), params)
    reply = chat.send("北京是哪个国家的首都？")
    assert list(reply) == PIECES
    assert reply.stats.prompt_tokens == 17 and reply.stats.completion_tokens == 5
    assert reply.stats.finish_reason == "stop"
    body = requests[-1]
    assert body["stream"] is True and body["messages"][0] == {"role": "system", "content": "你是一个乐于助人的助手。"}
    expected = {"temperature": 0.3, "top_p": 0.95, "top_k": 50, "repetition_penalty": 1.3, "max_tokens": 512,
                "stop": ["\n\n"], "seed": 5}  # fmt: skip
    assert {key: body[key] for key in expected} == expected
    assert chat.conversation.turns[-1] == Message("assistant", "北京是中国的首都。")


def test_continue_asks_the_server_to_extend_the_final_message(server: tuple[str, list[dict[str, Any]]]) -> None:
    base_url, requests = server
    chat = ChatSession(client(base_url), Conversation(), SamplingConfig())
    list(chat.send("hi"))
    list(chat.continue_reply())
    body = requests[-1]
    assert body["continue_final_message"] is True and body["add_generation_prompt"] is False
    assert body["messages"][-1]["role"] == "assistant"


def test_server_error_is_a_clear_llm_error_and_history_survives(server: tuple[str, list[dict[str, Any]]]) -> None:
    base_url, _ = server
    chat = ChatSession(client(base_url, model="missing"), Conversation(), SamplingConfig())
    with pytest.raises(LlmError, match="answered 404: The model `missing` does not exist"):
        list(chat.send("hello"))
    assert chat.conversation.turns == []


def test_unreachable_server_names_the_address() -> None:
    base_url = f"http://127.0.0.1:{free_port()}/v1"
    with pytest.raises(LlmError, match=f"cannot reach the server at {base_url}"):
        list(client(base_url).stream([Message("user", "hi")], SamplingConfig()))


def test_base_url_is_required(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("OPENAI_BASE_URL", raising=False)
    with pytest.raises(ConfigError, match="llm.base_url"):
        OpenAIChatModel(LlmConfig(backend="openai", model="x"))


def test_token_estimate_counts_cjk_per_character() -> None:
    model = OpenAIChatModel(LlmConfig(backend="openai", model="x", base_url="http://127.0.0.1:9/v1"))
    assert model.count_tokens([Message("user", "你好世界")]) == 4 + 4
    assert model.count_tokens([Message("user", "a" * 40)]) == 10 + 4
