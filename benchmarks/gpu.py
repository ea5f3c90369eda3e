"""GPU speed and memory with random weights in the real architectures (MODELS.md): one command, one table.

    .venv/bin/python benchmarks/gpu.py [--small] [--minutes 30] [--llm atom-7b,gemma-2b] [--quant fp16,8bit,4bit]

Speed does not depend on weight values when decode lengths are fixed, so every decode here is forced to a fixed
number of tokens (min = max new tokens). Without CUDA (or with --small) it runs reduced architectures on the CPU,
so the script and the product paths are exercised everywhere; the targets are for the full sizes on an H100.

ASR (Whisper large-v3 shape): x real time of 30 s windows decoded by the product's path (batched ``generate`` on
whole windows, SDPA / Flash-Attention 2, fp16) per batch size, with ``asr.batch_size: 0`` (auto from free VRAM)
among them, beside the plain-script path (the pipeline's defaults: one window at a time, float32).
LLM (Llama-7B with Atom's 65000 vocab; Gemma 2B): time to first token (512-token prompt) and decode tok/s at
batch 1 through the product's hf backend for fp16 / 8-bit / 4-bit (bitsandbytes; torchao int8 and, on CUDA, int4
tinygemm) eager and compiled over a static cache, beside the plain script (``model.generate`` on a bitsandbytes
4-bit model) and as a ratio to it, with peak VRAM, and the memory-bandwidth bound
(weight bytes per token / bandwidth: the H100's HBM3 3.35 TB/s, or on CPU a copy measured in this run).
"""

from __future__ import annotations

import argparse
import dataclasses
import gc
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

WHISPER_LARGE_V3 = {"d_model": 1280, "encoder_layers": 32, "decoder_layers": 32, "encoder_attention_heads": 20,
                    "decoder_attention_heads": 20, "encoder_ffn_dim": 5120, "decoder_ffn_dim": 5120,
                    "num_mel_bins": 128, "vocab_size": 51866}  # fmt: skip
WHISPER_SMALL = WHISPER_LARGE_V3 | {"d_model": 256, "encoder_layers": 2, "decoder_layers": 2,
                                   "encoder_attention_heads": 4, "decoder_attention_heads": 4,
                                   "encoder_ffn_dim": 1024, "decoder_ffn_dim": 1024}  # fmt: skip
LLMS = {
    "atom-7b": ("llama", {"hidden_size": 4096, "num_hidden_layers": 32, "num_attention_heads": 32,
                          "num_key_value_heads": 32, "intermediate_size": 11008, "vocab_size": 65000}),
    "gemma-2b": ("gemma", {"hidden_size": 2048, "num_hidden_layers": 18, "num_attention_heads": 8,
                           "num_key_value_heads": 1, "head_dim": 256, "intermediate_size": 16384,
                           "vocab_size": 256000}),
}  # fmt: skip
SMALL_LLM = {"hidden_size": 256, "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 4,
             "intermediate_size": 1024, "vocab_size": 65000}  # fmt: skip
H100_BANDWIDTH = 3.35e12  # bytes/s, HBM3 (SXM)
WINDOW_S = 30.0
WINDOW_TOKENS = 128  # forced decode length per 30 s window (about a window of fast speech)
PROMPT_TOKENS, DECODE_TOKENS = 512, 128
# (weights, quantization library, compiled static-cache decode): the product's paths measured per model; torchao
# int4 (tinygemm) exists on CUDA only
VARIANTS = [("fp16", "none", False), ("fp16", "none", True), ("8bit", "bitsandbytes", False),
            ("4bit", "bitsandbytes", False), ("4bit", "bitsandbytes", True), ("8bit", "torchao", True),
            ("4bit", "torchao", True)]  # fmt: skip


def peak_gb(torch: Any, cuda: bool) -> str:
    if not cuda:
        return "-"
    return f"{torch.cuda.max_memory_allocated() / 1e9:.1f}"


def reset_peak(torch: Any, cuda: bool) -> None:
    gc.collect()
    if cuda:
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()


# --- ASR ---------------------------------------------------------------------------------------------------------


def asr_rows(torch: Any, cuda: bool, small: bool, minutes: float) -> list[list[str]]:
    from transformers import WhisperConfig, WhisperForConditionalGeneration

    from assistant.asr.whisper_hf import auto_batch_size

    device = "cuda" if cuda else "cpu"
    shape = WHISPER_SMALL if small else WHISPER_LARGE_V3
    config = WhisperConfig(**shape, max_target_positions=448, decoder_start_token_id=50258, eos_token_id=50257,
                           pad_token_id=50257, begin_suppress_tokens=None, suppress_tokens=None)  # fmt: skip
    windows = max(1, round(minutes * 60 / WINDOW_S))
    rows = []
    for label, dtype, attention, batches in (
        ("plain script (pipeline defaults: batch 1, float32)", torch.float32, "sdpa", [1]),
        ("assistant whisper-hf", torch.float16 if cuda else torch.float32,
         "flash_attention_2" if cuda and _has_flash() else "sdpa", None),
    ):  # fmt: skip
        reset_peak(torch, cuda)
        torch.manual_seed(0)
        model = WhisperForConditionalGeneration(config).to(device=device, dtype=dtype).eval()
        model.config._attn_implementation = attention
        if batches is None:
            auto = auto_batch_size(model.config, device, dtype)
            batches = sorted({1, 8, 16, auto} if cuda else {1, 4})
        for batch in batches:
            reset_peak(torch, cuda)
            features = torch.randn(batch, shape["num_mel_bins"], 3000, device=device, dtype=dtype)
            done, started = 0, time.perf_counter()
            with torch.inference_mode():
                while done < windows:
                    size = min(batch, windows - done)
                    model.generate(features[:size], max_new_tokens=WINDOW_TOKENS, min_new_tokens=WINDOW_TOKENS,
                                   do_sample=False)  # fmt: skip
                    done += size
            if cuda:
                torch.cuda.synchronize()
            wall = time.perf_counter() - started
            rows.append([label, str(batch), f"{windows * WINDOW_S / 60:.0f} min", f"{windows * WINDOW_S / wall:.1f}x",
                         peak_gb(torch, cuda)])  # fmt: skip
        del model
    return rows


def _has_flash() -> bool:
    try:
        import flash_attn  # noqa: F401
    except ImportError:
        return False
    return True


# --- LLM ---------------------------------------------------------------------------------------------------------


def llm_rows(torch: Any, cuda: bool, small: bool, names: list[str], quants: list[str]) -> list[list[str]]:
    rows = []
    bandwidth = H100_BANDWIDTH if cuda else cpu_bandwidth()
    for name in names:
        family, shape = LLMS[name]
        shape = SMALL_LLM if small else shape
        with tempfile.TemporaryDirectory() as folder:
            path = save_random_llm(torch, family, shape, Path(folder))
            plain = plain_generate(torch, cuda, name, path, bandwidth)
            model_rows = [
                ours(torch, cuda, name, path, quant, method, compiled, bandwidth)
                for quant, method, compiled in VARIANTS
                if quant in quants and (cuda or (quant, method) != ("4bit", "torchao")) and _installed(method)
            ]
        for row in [*model_rows, plain]:  # each path's decode speed against the plain script's, same run
            rows.append([*row[:4], f"{float(row[3]) / float(plain[3]):.2f}x", *row[4:]])
    return rows


def _installed(method: str) -> bool:
    import importlib.util

    return method == "none" or importlib.util.find_spec(method) is not None


def save_random_llm(torch: Any, family: str, shape: dict[str, int], folder: Path) -> Path:
    from transformers import GemmaConfig, GemmaForCausalLM, LlamaConfig, LlamaForCausalLM

    from tests.conftest import byte_level_tokenizer

    torch.manual_seed(0)
    config_class, model_class = (LlamaConfig, LlamaForCausalLM) if family == "llama" else (GemmaConfig,
                                                                                          GemmaForCausalLM)  # fmt: skip
    tokenizer = byte_level_tokenizer()
    config = config_class(**shape, max_position_embeddings=4096, eos_token_id=tokenizer.eos_token_id,
                          bos_token_id=None, pad_token_id=tokenizer.pad_token_id,
                          tie_word_embeddings=False)  # fmt: skip
    model_class(config).to(torch.float16).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


def weight_bytes(model: Any) -> int:
    return sum(p.numel() * p.element_size() for p in model.parameters()) + sum(
        b.numel() * b.element_size() for b in model.buffers()
    )


def ours(torch: Any, cuda: bool, name: str, path: Path, quant: str, method: str, compiled: bool,
         bandwidth: float) -> list[str]:  # fmt: skip
    from assistant.config import LlmConfig, SamplingConfig
    from assistant.llm.hf import HFChatModel

    reset_peak(torch, cuda)
    dtype = "float16" if cuda else "float32"
    torchao_int4 = (quant, method) == ("4bit", "torchao")
    config = LlmConfig(backend="hf", model=str(path), template="chatml", quantize="none" if quant == "fp16" else quant,
                       quant_method="torchao" if method == "torchao" else "bitsandbytes",
                       dtype="auto" if torchao_int4 else dtype, compute_dtype=dtype if cuda else "auto",
                       compile=compiled, context_tokens=PROMPT_TOKENS + DECODE_TOKENS + 8)  # fmt: skip
    model = HFChatModel(config)
    params = SamplingConfig(temperature=0, repetition_penalty=1.0, max_new_tokens=DECODE_TOKENS,
                            min_new_tokens=DECODE_TOKENS)  # fmt: skip
    prompt = [int(i) % 250 for i in range(PROMPT_TOKENS)]
    if compiled:  # compile and capture before timing, as a server does at start
        warm = model.sample(prompt, dataclasses.replace(params, max_new_tokens=8, min_new_tokens=8))
        for _, _token in zip(range(8), warm, strict=False):
            pass
        warm.close()
        model._cache, model._cache_ids = None, []
    first, started = _timed_tokens(torch, cuda, model.sample(prompt, params))
    precision = dtype if quant == "fp16" else f"{quant} {method}"
    label = f"assistant hf {precision}{' compiled' if compiled else ''}"
    return _llm_row(name, label, first, started, weight_bytes(model._model), bandwidth, torch, cuda)


def _timed_tokens(torch: Any, cuda: bool, tokens: Any) -> tuple[float, float]:
    started = time.perf_counter()
    first = 0.0
    for count, _token in enumerate(tokens, start=1):
        if count == 1:
            first = time.perf_counter()
        if count == DECODE_TOKENS:
            break
    tokens.close()
    if cuda:
        torch.cuda.synchronize()
    return first - started, time.perf_counter() - first


def plain_generate(torch: Any, cuda: bool, name: str, path: Path, bandwidth: float) -> list[str]:
    """The script users run: a bitsandbytes 4-bit model and model.generate."""
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig

    reset_peak(torch, cuda)
    quant = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4",
                               bnb_4bit_compute_dtype=torch.float16 if cuda else torch.float32)  # fmt: skip
    # the unquantized parts (embeddings, lm_head) in the same dtype as ours, so the ratio compares code paths
    model = AutoModelForCausalLM.from_pretrained(path, quantization_config=quant, device_map="cuda" if cuda else "cpu",
                                                 dtype=torch.float16 if cuda else torch.float32)  # fmt: skip
    inputs = torch.tensor([[int(i) % 250 for i in range(PROMPT_TOKENS)]], device=model.device)
    with torch.inference_mode():
        started = time.perf_counter()
        model.generate(inputs, max_new_tokens=1, min_new_tokens=1, do_sample=False)
        first = time.perf_counter() - started
        started = time.perf_counter()
        model.generate(inputs, max_new_tokens=DECODE_TOKENS, min_new_tokens=DECODE_TOKENS, do_sample=False)
        if cuda:
            torch.cuda.synchronize()
        decode = time.perf_counter() - started - first
    return _llm_row(
        name, "plain script: generate, bnb 4bit", first, decode, weight_bytes(model), bandwidth, torch, cuda
    )


def _llm_row(name: str, label: str, first_s: float, decode_s: float, weights: int, bandwidth: float, torch: Any,
             cuda: bool) -> list[str]:  # fmt: skip
    rate = (DECODE_TOKENS - 1) / decode_s if decode_s > 0 else 0.0
    bound = bandwidth / weights
    return [name, label, f"{first_s * 1000:.0f} ms", f"{rate:.1f}", f"{bound:.0f}", f"{rate / bound * 100:.0f}%",
            f"{weights / 1e9:.2f}", peak_gb(torch, cuda)]  # fmt: skip


def cpu_bandwidth() -> float:
    """Bytes per second of a large array copy on this machine (read + write)."""
    import numpy as np

    source = np.ones(64 << 20, dtype=np.float64)  # 512 MB
    target = np.empty_like(source)
    best = float("inf")
    for _ in range(3):
        started = time.perf_counter()
        np.copyto(target, source)
        best = min(best, time.perf_counter() - started)
    return 2 * source.nbytes / best


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--small", action="store_true", help="reduced architectures (the default without CUDA)")
    parser.add_argument("--minutes", type=float, help="audio per batch size (default 30 on GPU, 2 with --small)")
    parser.add_argument("--llm", default="atom-7b,gemma-2b")
    parser.add_argument("--quant", default="fp16,8bit,4bit")
    parser.add_argument("--skip-asr", action="store_true")
    args = parser.parse_args()
    import torch

    cuda = torch.cuda.is_available()
    small = args.small or not cuda
    minutes = args.minutes or (2.0 if small else 30.0)
    device = torch.cuda.get_device_name() if cuda else "CPU (no CUDA: reduced architectures)"
    asr = [] if args.skip_asr else asr_rows(torch, cuda, small, minutes)
    llm = llm_rows(torch, cuda, small, args.llm.split(","), args.quant.split(","))
    print(f"\n{device}; random weights, forced decode lengths; {'REDUCED sizes' if small else 'full sizes'}\n")
    if asr:
        print(
            f"| ASR ({'reduced' if small else 'whisper-large-v3'} shape) | batch | audio | x real time | peak VRAM GB |"
        )
        print("|---|---|---|---|---|")
        for row in asr:
            print("| " + " | ".join(row) + " |")
    print(
        f"\n| LLM | path | TTFT ({PROMPT_TOKENS}-token prompt) | decode tok/s | vs plain script | "
        "bandwidth bound tok/s | of bound | weights GB | peak VRAM GB |"
    )
    print("|---|---|---|---|---|---|---|---|---|")
    for row in llm:
        print("| " + " | ".join(row) + " |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
