"""GPU paths. The arithmetic runs everywhere; tests marked ``gpu`` run on CUDA only and skip cleanly elsewhere."""

from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace

import pytest

from assistant.messages import Message

torch = pytest.importorskip("torch")


def test_auto_batch_size_follows_free_vram(monkeypatch: pytest.MonkeyPatch) -> None:
    from assistant.asr.whisper_hf import AUTO_BATCH_CPU, AUTO_BATCH_MAX, auto_batch_size

    large_v3 = SimpleNamespace(d_model=1280, decoder_layers=32, vocab_size=51866)
    assert auto_batch_size(large_v3, "cpu", torch.float32) == AUTO_BATCH_CPU
    for free_gb, expected in ((2, 3), (8, 15), (70, AUTO_BATCH_MAX)):  # about 0.46 GB per large-v3 window in fp16
        monkeypatch.setattr(torch.cuda, "mem_get_info", lambda device, gb=free_gb: (gb * 1024**3, 80 * 1024**3))
        assert auto_batch_size(large_v3, "cuda", torch.float16) == expected
    monkeypatch.setattr(torch.cuda, "mem_get_info", lambda device: (1024**2, 80 * 1024**3))
    assert auto_batch_size(large_v3, "cuda", torch.float16) == 1  # never zero


@pytest.mark.gpu
def test_whisper_hf_picks_a_batch_from_vram_on_cuda(tmp_path: Path) -> None:
    from transformers import WhisperConfig, WhisperForConditionalGeneration

    from assistant.asr.whisper_hf import auto_batch_size

    model = WhisperForConditionalGeneration(WhisperConfig(d_model=256, encoder_layers=2, decoder_layers=2))
    assert auto_batch_size(model.config, "cuda", torch.float16) > 1


@pytest.mark.gpu
@pytest.mark.parametrize(
    ("quantize", "method"), [("none", "bitsandbytes"), ("4bit", "bitsandbytes"), ("4bit", "torchao")]
)
def test_compiled_decode_on_cuda_matches_eager(tmp_path: Path, quantize: str, method: str) -> None:
    import dataclasses

    from assistant.config import LlmConfig, SamplingConfig
    from assistant.llm.hf import HFChatModel
    from tests.conftest import build_tiny_chat_model

    if quantize != "none":
        pytest.importorskip(method)
    model_dir = build_tiny_chat_model(tmp_path / "model", hidden_size=256)
    params = SamplingConfig(temperature=0, max_new_tokens=16, min_new_tokens=16, repetition_penalty=1.0)
    base = LlmConfig(backend="hf", model=str(model_dir), device="cuda", quantize=quantize, quant_method=method,
                     sampling=params, context_tokens=256, system=None)  # fmt: skip
    messages = [Message("user", "你好")]
    eager = "".join(HFChatModel(base).stream(messages, params))
    fast = HFChatModel(dataclasses.replace(base, compile=True))
    assert "".join(fast.stream(messages, params)) == eager
