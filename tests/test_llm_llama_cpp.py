"""The llama.cpp backend on the real offline GGUF models (SmolLM2 135M; Qwen2.5 0.5B for Chinese)."""

from __future__ import annotations

import dataclasses
import importlib.util
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest

from assistant.chat import ChatSession
from assistant.config import LlmConfig, SamplingConfig
from assistant.conversation import Conversation
from assistant.errors import ChecksumError, ConfigError, ModelLoadError, ModelNotFoundError
from assistant.llm.base import REPLACEMENT
from assistant.llm.llama_cpp import LlamaCppChatModel
from assistant.messages import Message
from assistant.models import OFFLINE_BUNDLES, install_bundle
from tests.conftest import require

pytestmark = pytest.mark.real_model

GREEDY = SamplingConfig(temperature=0, max_new_tokens=32, repetition_penalty=1.0)


def bundle(name: str) -> Path:
    try:
        return install_bundle(OFFLINE_BUNDLES[name]) / "model.gguf"
    except ModelNotFoundError as exc:
        require(False, str(exc))
        raise


def llama(model: str, **changes: object) -> LlamaCppChatModel:
    require(importlib.util.find_spec("llama_cpp") is not None, "llama-cpp-python is not installed")
    return LlamaCppChatModel(dataclasses.replace(LlmConfig(model=model, context_tokens=2048), **changes))


def opened(name: str) -> Iterator[LlamaCppChatModel]:
    bundle(name)
    model = llama(name)
    yield model
    model.close()


@pytest.fixture(scope="module")
def smol() -> Iterator[LlamaCppChatModel]:
    yield from opened("smollm2-135m")


@pytest.fixture(scope="module")
def qwen() -> Iterator[LlamaCppChatModel]:
    yield from opened("qwen2.5-0.5b")


def test_smollm_answers_and_reuses_the_history_cache(smol: LlamaCppChatModel) -> None:
    chat = ChatSession(smol, Conversation("You are a helpful assistant."), GREEDY)
    first = chat.send("What is the capital of France? Answer in one word.")
    assert "paris" in "".join(first).lower()
    second = chat.send("And of Germany?")
    "".join(second)
    assert second.stats.cached_tokens >= first.stats.prompt_tokens  # the first turn was not evaluated again
    assert chat.conversation.turns[-1].role == "assistant"


def test_qwen_answers_chinese_in_whole_characters(qwen: LlamaCppChatModel) -> None:
    messages = [Message("system", "你是一个乐于助人的助手。"), Message("user", "北京是哪个国家的首都？")]
    reply = qwen.stream(messages, GREEDY)
    deltas = list(reply)
    assert "中国" in "".join(deltas) or "中华人民共和国" in "".join(deltas)
    assert not any(REPLACEMENT in delta for delta in deltas)
    assert reply.stats.finish_reason == "stop" and reply.stats.first_token_s > 0


def test_sampled_chinese_never_splits_a_character(qwen: LlamaCppChatModel) -> None:
    """Hot sampling makes the model pick byte-fallback tokens mid-character; the stream must hold them back."""
    messages = [Message("user", "用中文写一首关于秋天的短诗。")]
    params = SamplingConfig(temperature=1.3, top_k=0, top_p=1.0, max_new_tokens=96, seed=3)
    for seed in (3, 4):
        deltas = list(qwen.stream(messages, dataclasses.replace(params, seed=seed)))
        assert deltas and not any(REPLACEMENT in delta for delta in deltas)


def test_seed_reproduces_a_sampled_reply(smol: LlamaCppChatModel) -> None:
    params = SamplingConfig(temperature=0.9, max_new_tokens=24, seed=11)
    messages = [Message("user", "Tell me a short story.")]
    assert "".join(smol.stream(messages, params)) == "".join(smol.stream(messages, params))


def test_cancel_stops_generation_and_min_new_tokens_holds_off_the_end(smol: LlamaCppChatModel) -> None:
    cancel = threading.Event()
    reply = smol.stream([Message("user", "Count from one to fifty.")], GREEDY, cancel=cancel)
    next(reply)
    cancel.set()
    list(reply)
    assert reply.stats.finish_reason == "cancelled" and reply.stats.completion_tokens <= 3
    fixed = dataclasses.replace(GREEDY, max_new_tokens=40, min_new_tokens=40)
    long = smol.stream([Message("user", "Say hi.")], fixed)
    list(long)
    assert long.stats.completion_tokens == 40


def test_gguf_with_a_wrong_checksum_is_refused(tmp_path: Path) -> None:
    path = bundle("smollm2-135m")
    with pytest.raises(ChecksumError, match="does not match its sha256"):
        llama(str(path), sha256="0" * 64)


def test_truncated_gguf_is_a_clear_load_error(tmp_path: Path) -> None:
    source = bundle("smollm2-135m")
    broken = tmp_path / "broken.gguf"
    with source.open("rb") as src, broken.open("wb") as out:
        out.write(src.read(1 << 20))
    with pytest.raises(ModelLoadError, match="complete GGUF file"):
        llama(str(broken))


def test_non_gguf_model_is_refused_with_the_right_backend_named(tiny_chat_model: Path, tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="use backend hf"):
        llama(str(tiny_chat_model))
    with pytest.raises(ConfigError, match="reads a local GGUF file"):
        llama("Qwen/Qwen2.5-0.5B-Instruct-GGUF")
    with pytest.raises(ModelNotFoundError, match="does not exist"):
        llama(str(tmp_path / "missing.gguf"))
