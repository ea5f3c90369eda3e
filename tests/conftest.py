"""Shared fixtures: synthetic audio, spoken test sentences (espeak-ng), fakes for the stages."""

from __future__ import annotations

import os
import shutil
import subprocess
from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np
import pytest

from assistant.messages import SAMPLE_RATE, Audio, Segment, Transcript, Word

IN_CI = os.environ.get("CI", "").lower() == "true"


def require(condition: bool, reason: str) -> None:
    """Skip when something optional is missing on a developer machine; in CI everything must be there."""
    if not condition:
        if IN_CI:
            pytest.fail(f"CI must provide this: {reason}")
        pytest.skip(reason)


def require_tool(name: str) -> str:
    path = shutil.which(name)
    require(path is not None, f"{name} is not installed")
    assert path is not None
    return path


def speak(text: str, target: Path, *, voice: str = "en-us", words_per_minute: int = 150) -> Path:
    """Synthesise ``text`` with espeak-ng into a 16 kHz mono wav."""
    require_tool("espeak-ng")
    ffmpeg = require_tool("ffmpeg")
    raw = target.with_suffix(".espeak.wav")
    subprocess.run(["espeak-ng", "-v", voice, "-s", str(words_per_minute), "-w", str(raw), text], check=True)
    subprocess.run([ffmpeg, "-loglevel", "error", "-y", "-i", str(raw), "-ar", "16000", "-ac", "1", str(target)],
                   check=True)  # fmt: skip
    raw.unlink()
    return target


def meeting_speech(minutes: float, folder: Path) -> tuple[Path, str]:
    """The ASR benchmark's meeting speech (12 spoken sentences with short pauses) repeated to ``minutes``, as m4a,
    and its text."""
    import importlib.util
    import sys

    require_tool("espeak-ng")
    spec = importlib.util.spec_from_file_location("asr_benchmark", Path(__file__).parents[1] / "benchmarks" / "asr.py")
    assert spec is not None and spec.loader is not None
    benchmark = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = benchmark  # dataclasses look their module up while the file runs
    spec.loader.exec_module(benchmark)
    return benchmark.make_speech(minutes, folder)  # type: ignore[no-any-return]


def write_wav(path: Path, samples: np.ndarray, sample_rate: int = SAMPLE_RATE) -> Path:
    import soundfile

    soundfile.write(str(path), samples.astype(np.float32), sample_rate, subtype="PCM_16")
    return path


def tone(seconds: float, frequency: float = 440.0, amplitude: float = 0.3) -> np.ndarray:
    t = np.arange(int(seconds * SAMPLE_RATE)) / SAMPLE_RATE
    return (amplitude * np.sin(2 * np.pi * frequency * t)).astype(np.float32)


def silence(seconds: float) -> np.ndarray:
    return np.zeros(int(seconds * SAMPLE_RATE), dtype=np.float32)


def ffmpeg_generate(target: Path, *args: str) -> Path:
    ffmpeg = require_tool("ffmpeg")
    subprocess.run([ffmpeg, "-loglevel", "error", "-y", *args, str(target)], check=True)
    return target


class FakeTranscriber:
    """Says which piece of audio it heard: one segment per window, text = the window's start time. With no language
    given, each window "detects" ``language`` (or what ``detect(audio)`` says: a code and a probability)."""

    description = "fake"

    def __init__(
        self,
        batch_size: int = 2,
        language: str = "en",
        text: str | None = None,
        detect: Callable[[Audio], tuple[str, float]] | None = None,
    ) -> None:
        self.batch_size = batch_size
        self.detect = detect or (lambda audio: (language, 0.99))
        self.text = text
        self.calls: list[list[tuple[float, float]]] = []
        self.languages: list[str | None] = []  # the language each call was given
        self.detect_calls = 0

    def supports_language(self, language: str) -> bool:
        return language in ("en", "zh", "de")

    def transcribe_many(
        self,
        audios: Sequence[Audio],
        *,
        language: str | None,
        task: str = "transcribe",
        timestamps: bool = True,
        word_timestamps: bool = False,
    ) -> list[Transcript]:
        self.calls.append([(a.start_s, a.end_s) for a in audios])
        self.languages.append(language)
        results = []
        for audio in audios:
            probability = None
            if language is None:
                self.detect_calls += 1
                code, probability = self.detect(audio)
            text = self.text or f"window at {audio.start_s:.1f}"
            words = (Word(" " + text.split()[0], 0.1, 0.4, 0.9),) if word_timestamps else ()
            # runs past the end on purpose: must be clipped
            segment = Segment(0.0, audio.duration_s + 5.0, text, words, language or code)
            results.append(Transcript(text, language or code, (segment,), audio.duration_s, probability))
        return results


class EnergyVad:
    """A deterministic stand-in for Silero: speech wherever 100 ms frames have energy."""

    def speech_spans(self, audio: Audio):
        from assistant.messages import Span

        frame = SAMPLE_RATE // 10
        count = len(audio.samples) // frame
        loud = np.abs(audio.samples[: count * frame].reshape(count, frame)).max(axis=1) > 0.01
        spans: list[Span] = []
        for index, is_loud in enumerate(loud):
            start = audio.start_s + index * 0.1
            if is_loud and spans and abs(spans[-1].end_s - start) < 1e-6:
                spans[-1] = Span(spans[-1].start_s, start + 0.1)
            elif is_loud:
                spans.append(Span(start, start + 0.1))
        return spans


# --- tiny chat models -----------------------------------------------------------------------------------------------

CHATML_TEMPLATE = (
    "{% for message in messages %}{{'<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>' + "
    "'\\n'}}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)
CHAT_SPECIALS = ("<|im_start|>", "<|im_end|>", "<|endoftext|>")


def byte_level_tokenizer(extra_tokens: Sequence[str] = ()):
    """A byte-level BPE tokenizer with no merges: every CJK character becomes three byte tokens."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    alphabet = sorted(pre_tokenizers.ByteLevel.alphabet())
    backend = Tokenizer(models.BPE(vocab={char: index for index, char in enumerate(alphabet)}, merges=[]))
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    backend.add_special_tokens(list(CHAT_SPECIALS))
    if extra_tokens:
        backend.add_tokens(list(extra_tokens))
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=backend, eos_token="<|im_end|>", pad_token="<|endoftext|>", unk_token=None
    )
    tokenizer.chat_template = CHATML_TEMPLATE
    return tokenizer


def build_tiny_chat_model(target: Path, *, seed: int = 0, hidden_size: int = 64) -> Path:
    """A random 2-layer Llama with the byte-level tokenizer, saved as a transformers directory (int4 kernels quantize
    groups of 128 inputs: give them ``hidden_size`` 256)."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    tokenizer = byte_level_tokenizer()
    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=hidden_size,
        intermediate_size=2 * hidden_size,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=2048,
        eos_token_id=tokenizer.convert_tokens_to_ids("<|im_end|>"),
        pad_token_id=tokenizer.pad_token_id,
        bos_token_id=None,
        tie_word_embeddings=False,
    )
    model = LlamaForCausalLM(config)
    with torch.no_grad():  # sharper logits than the default init, so sampled text varies with the prompt
        model.lm_head.weight.normal_(0.0, 0.5)
    model.save_pretrained(target)
    tokenizer.save_pretrained(target)
    return target


@pytest.fixture(scope="session")
def tiny_chat_model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    pytest.importorskip("transformers")
    return build_tiny_chat_model(tmp_path_factory.mktemp("tiny-chat"))


def require_offline_models(*names: str) -> None:
    """The offline bundles ``names`` assembled and verified, and llama.cpp importable (for the GGUF ones)."""
    import importlib.util

    from assistant.errors import ModelNotFoundError
    from assistant.models import OFFLINE_BUNDLES, install_bundle

    require(importlib.util.find_spec("llama_cpp") is not None, "llama-cpp-python is not installed")
    for name in names:
        try:
            install_bundle(OFFLINE_BUNDLES[name])
        except ModelNotFoundError as exc:
            require(False, str(exc))


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """Tests marked ``gpu`` skip cleanly where there is no CUDA device."""
    try:
        import torch

        cuda = torch.cuda.is_available()
    except ImportError:
        cuda = False
    if cuda:
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


def served_chat_model(api: object) -> str:
    """The chat model a running server serves (its first /v1/models id): chat completions must name it."""
    return str(api.models.list().data[0].id)  # type: ignore[attr-defined]
