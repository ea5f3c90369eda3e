"""The transformers chat backend on tiny random models: streaming, KV-cache reuse, sampling, quantization, LoRA."""

from __future__ import annotations

import builtins
import dataclasses
from pathlib import Path

import pytest

from assistant.config import LlmConfig, SamplingConfig
from assistant.errors import ConfigError, ModelLoadError, ModelNotFoundError, TemplateError
from assistant.llm.base import REPLACEMENT
from assistant.messages import Message

pytest.importorskip("transformers")
from assistant.llm.hf import HFChatModel

GREEDY = SamplingConfig(temperature=0, max_new_tokens=24, min_new_tokens=24, repetition_penalty=1.0)
CONVERSATION = [Message("system", "你是助手。"), Message("user", "你好，世界")]


def load(model_dir: Path, **changes: object) -> HFChatModel:
    return HFChatModel(dataclasses.replace(LlmConfig(backend="hf", model=str(model_dir), system=None), **changes))


@pytest.fixture(scope="module")
def model(tiny_chat_model: Path) -> HFChatModel:
    return load(tiny_chat_model)


def test_random_byte_tokens_never_stream_a_replacement_character(model: HFChatModel) -> None:
    params = SamplingConfig(temperature=1.5, top_k=0, top_p=1.0, max_new_tokens=120, min_new_tokens=120, seed=1)
    reply = model.stream(CONVERSATION, params)
    deltas = list(reply)
    assert reply.stats.completion_tokens == 120
    assert deltas and not any(REPLACEMENT in delta for delta in deltas)


def test_uses_the_tokenizers_own_template(model: HFChatModel) -> None:
    assert model.template.name == "tokenizer"
    assert model.render(CONVERSATION).endswith("<|im_start|>assistant\n")


def test_kv_cache_reuse_gives_the_same_tokens_as_a_fresh_prompt(tiny_chat_model: Path, model: HFChatModel) -> None:
    first = model.stream(CONVERSATION, GREEDY)
    first_text = "".join(first)
    follow_up = [*CONVERSATION, Message("assistant", first_text), Message("user", "再说一遍")]
    second = model.stream(follow_up, GREEDY)
    second_text = "".join(second)
    assert second.stats.cached_tokens > first.stats.prompt_tokens // 2  # the history was not encoded again
    fresh = load(tiny_chat_model)
    fresh_reply = fresh.stream(follow_up, GREEDY)
    assert "".join(fresh_reply) == second_text and fresh_reply.stats.cached_tokens == 0


def test_seed_makes_sampling_reproducible(model: HFChatModel) -> None:
    params = SamplingConfig(temperature=1.0, max_new_tokens=16, min_new_tokens=16, seed=7)
    assert "".join(model.stream(CONVERSATION, params)) == "".join(model.stream(CONVERSATION, params))


def test_stop_string_ends_the_reply(model: HFChatModel) -> None:
    text = "".join(model.stream(CONVERSATION, GREEDY))
    stop = text[3:5]
    params = dataclasses.replace(GREEDY, stop=(stop,))
    reply = model.stream(CONVERSATION, params)
    assert "".join(reply) == text[: text.index(stop)] and reply.stats.finish_reason == "stop"


def test_closing_mid_stream_keeps_the_model_usable(model: HFChatModel) -> None:
    reply = model.stream(CONVERSATION, GREEDY)
    next(reply)
    reply.close()
    assert reply.stats.finish_reason == "cancelled"
    assert len("".join(model.stream(CONVERSATION, GREEDY))) > 0


def test_builtin_template_can_be_forced(tiny_chat_model: Path) -> None:
    forced = load(tiny_chat_model, template="llama-2-chat")
    assert forced.render(CONVERSATION).startswith("<s>[INST] <<SYS>>")


def test_missing_model_path_is_a_clear_error(tmp_path: Path) -> None:
    with pytest.raises(ModelNotFoundError, match="does not exist"):
        load(tmp_path / "nowhere")


def test_model_without_template_needs_one_named(tiny_chat_model: Path, tmp_path: Path) -> None:
    import shutil

    copy = shutil.copytree(tiny_chat_model, tmp_path / "merge")
    config_file = copy / "tokenizer_config.json"
    config_file.write_text(config_file.read_text().replace('"chat_template"', '"unused_template"'))
    (copy / "chat_template.jinja").unlink(missing_ok=True)
    with pytest.raises(TemplateError, match="set llm.template to one of"):
        load(copy)


def test_4bit_without_bitsandbytes_names_the_fix(tiny_chat_model: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    real_import = builtins.__import__

    def no_bitsandbytes(name: str, *args: object, **kwargs: object) -> object:
        if name == "bitsandbytes":
            raise ImportError("No module named 'bitsandbytes'")
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", no_bitsandbytes)
    with pytest.raises(ModelLoadError, match="pip install bitsandbytes"):
        load(tiny_chat_model, quantize="4bit")


@pytest.mark.parametrize("quantize", ["4bit", "8bit"])
def test_bitsandbytes_quantized_model_streams(tiny_chat_model: Path, quantize: str) -> None:
    pytest.importorskip("bitsandbytes")
    quantized = load(tiny_chat_model, quantize=quantize)
    assert quantize in quantized.description
    reply = quantized.stream(CONVERSATION, GREEDY)
    assert not any(REPLACEMENT in delta for delta in reply) and reply.stats.completion_tokens == 24


def test_lora_adapter_with_a_larger_chinese_vocabulary(tiny_chat_model: Path, tmp_path: Path) -> None:
    """The case users fix by hand: the adapter's tokenizer adds tokens, so embeddings must grow before it loads."""
    peft = pytest.importorskip("peft")
    from transformers import AutoModelForCausalLM

    from tests.conftest import byte_level_tokenizer

    tokenizer = byte_level_tokenizer(extra_tokens=["你好", "世界", "北京"])
    base = AutoModelForCausalLM.from_pretrained(tiny_chat_model)
    base.resize_token_embeddings(len(tokenizer))
    lora = peft.get_peft_model(
        base,
        peft.LoraConfig(r=4, target_modules=["q_proj", "v_proj"], modules_to_save=["embed_tokens", "lm_head"]),
    )
    adapter = tmp_path / "adapter"
    lora.save_pretrained(adapter)
    tokenizer.save_pretrained(adapter)

    adapted = load(tiny_chat_model, adapter=str(adapter))
    assert adapted.tokenize("你好") == [tokenizer.convert_tokens_to_ids("你好")]
    reply = adapted.stream(CONVERSATION, GREEDY)
    deltas = list(reply)
    assert reply.stats.completion_tokens == 24 and not any(REPLACEMENT in d for d in deltas)
    assert adapted._model.get_input_embeddings().weight.shape[0] == len(tokenizer)


def test_adapter_directory_without_adapter_config(tiny_chat_model: Path, tmp_path: Path) -> None:
    pytest.importorskip("peft")
    with pytest.raises(ModelLoadError, match="not a LoRA adapter directory"):
        load(tiny_chat_model, adapter=str(tmp_path))


def test_4bit_where_bitsandbytes_has_no_backend(tiny_chat_model: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    pytest.importorskip("bitsandbytes")
    import transformers

    real = transformers.AutoModelForCausalLM.from_pretrained

    def no_backend(*args: object, **kwargs: object) -> object:
        if "quantization_config" in kwargs:
            raise RuntimeError("bitsandbytes: no kernel for device type 'mps'")
        return real(*args, **kwargs)

    monkeypatch.setattr(transformers.AutoModelForCausalLM, "from_pretrained", no_backend)
    with pytest.raises(ModelLoadError, match=r"llm.quantize 4bit cannot run here \(bitsandbytes: no kernel"):
        load(tiny_chat_model, quantize="4bit")


@pytest.mark.parametrize("options", [{"cache": "static"}, {"compile": True}], ids=["static-cache", "compiled"])
def test_static_and_compiled_decode_give_the_same_tokens(tiny_chat_model: Path, options: dict[str, object]) -> None:
    """The fast decode paths must not change a greedy reply, on a first turn or on a turn that reuses the cache."""
    eager = load(tiny_chat_model)
    fast = load(tiny_chat_model, context_tokens=256, sampling=GREEDY, **options)
    first = "".join(eager.stream(CONVERSATION, GREEDY))
    assert "".join(fast.stream(CONVERSATION, GREEDY)) == first
    follow_up = [*CONVERSATION, Message("assistant", first), Message("user", "再说一遍")]
    reply = fast.stream(follow_up, GREEDY)
    assert "".join(reply) == "".join(eager.stream(follow_up, GREEDY)) and reply.stats.cached_tokens > 0
    retry = fast.stream(CONVERSATION, GREEDY)  # a shorter prompt than the cache holds: stale slots are masked
    assert "".join(retry) == first


def test_torchao_int8_streams_and_compiles_to_the_same_tokens(tiny_chat_model: Path) -> None:
    pytest.importorskip("torchao")
    eager = load(tiny_chat_model, quantize="8bit", quant_method="torchao")
    assert "8bit torchao" in eager.description
    assert type(eager._model.model.layers[0].mlp.up_proj.weight).__name__ == "Int8Tensor"  # really quantized
    compiled = load(
        tiny_chat_model, quantize="8bit", quant_method="torchao", compile=True, context_tokens=256, sampling=GREEDY
    )
    reply = compiled.stream(CONVERSATION, GREEDY)
    assert "".join(reply) == "".join(eager.stream(CONVERSATION, GREEDY)) and reply.stats.completion_tokens == 24


def test_torchao_int4_is_refused_clearly_without_cuda(tiny_chat_model: Path) -> None:
    pytest.importorskip("torchao")
    with pytest.raises(ConfigError, match="torchao with quantize 4bit needs a CUDA GPU"):
        load(tiny_chat_model, quantize="4bit", quant_method="torchao", device="cpu")
    with pytest.raises(ConfigError, match="torchao int4 computes in bfloat16 only"):
        load(tiny_chat_model, quantize="4bit", quant_method="torchao", dtype="float16")
