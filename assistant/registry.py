"""Component registry: one dict per stage kind, name -> "module:Class". Backends are imported only when chosen."""

from __future__ import annotations

import importlib
from typing import Any

from assistant.errors import ConfigError

ASR_BACKENDS: dict[str, str] = {
    "faster-whisper": "assistant.asr.faster_whisper:FasterWhisperTranscriber",
    "whisper-hf": "assistant.asr.whisper_hf:WhisperHFTranscriber",
    "openai": "assistant.asr.openai_remote:OpenAITranscriber",
}

VAD_BACKENDS: dict[str, str] = {
    "silero": "assistant.asr.vad:SileroVad",
}

LLM_BACKENDS: dict[str, str] = {
    "hf": "assistant.llm.hf:HFChatModel",
    "llama-cpp": "assistant.llm.llama_cpp:LlamaCppChatModel",
    "openai": "assistant.llm.openai_compat:OpenAIChatModel",
}

TTS_BACKENDS: dict[str, str] = {
    "piper": "assistant.tts.piper:PiperSynthesizer",
    "espeak-ng": "assistant.tts.espeak:EspeakSynthesizer",
    "openai": "assistant.tts.openai_remote:OpenAISynthesizer",
}

SOURCES: dict[str, str] = {
    "microphone": "assistant.io.microphone:MicrophoneSource",
    "file": "assistant.io.audio_file:FileSource",
}

SINKS: dict[str, str] = {
    "console": "assistant.io.console:ConsoleSink",
    "jsonl": "assistant.io.turn_log:JsonlSink",
    "speaker": "assistant.io.speaker:SpeakerSink",
}

TURN_DETECTORS: dict[str, str] = {
    "rules": "assistant.turn:RuleTurnDetector",
    "fixed": "assistant.turn:FixedTurnDetector",
}

_KINDS: dict[str, dict[str, str]] = {
    "asr": ASR_BACKENDS,
    "vad": VAD_BACKENDS,
    "llm": LLM_BACKENDS,
    "tts": TTS_BACKENDS,
    "source": SOURCES,
    "sink": SINKS,
    "turn": TURN_DETECTORS,
}


def names(kind: str) -> str:
    return ", ".join(sorted(_KINDS[kind]))


def resolve(kind: str, name: str) -> Any:
    """The class registered as ``name`` for stage ``kind``, imported now."""
    table = _KINDS[kind]
    if name not in table:
        raise ConfigError(f"unknown {kind} backend {name!r}; choose one of {names(kind)}")
    module_name, _, class_name = table[name].partition(":")
    module = importlib.import_module(module_name)
    return getattr(module, class_name)


def create(kind: str, name: str, *args: Any, **kwargs: Any) -> Any:
    return resolve(kind, name)(*args, **kwargs)
