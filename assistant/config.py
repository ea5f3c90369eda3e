"""Typed, frozen configuration read from YAML.

Every option is declared once, here, as a dataclass field with its default; the defaults are the offline CPU
configuration (``configs/default.yaml`` spells the same values out). Unknown keys and wrong types are rejected with
their dotted path, and ``--set a.b=c`` overrides go through the same validation as the file.
"""

from __future__ import annotations

import dataclasses
import math
import types
import typing
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, Union, get_args, get_origin

import yaml

from assistant import registry
from assistant.errors import ConfigError
from assistant.llm.templates import TEMPLATE_CHOICES
from assistant.tts.base import ESPEAK_VOICE, check_remote_voice, check_speed, check_voice_name

Task = Literal["transcribe", "translate"]
ZhScript = Literal["simplified", "traditional", "as-is"]
LiveWindow = Literal["auto", "full"]
OutputFormat = Literal["txt", "srt", "vtt", "json", "tsv"]


@dataclass(frozen=True)
class AsrConfig:
    backend: str = "faster-whisper"  # a name in registry.ASR_BACKENDS
    model: str = "whisper-base"  # offline bundle name, local directory, or hub id
    sha256: str | None = None  # checks a local model.bin / model.safetensors when set
    device: str = "auto"  # auto | cpu | cuda | cuda:N
    dtype: str = "auto"  # auto | float32 | float16 | bfloat16 | int8 | int8_float16 (faster-whisper)
    attention: str = "auto"  # whisper-hf: auto | sdpa | flash_attention_2 | eager
    threads: int = 0  # CPU threads, 0 = all cores
    chunk_s: float = 30.0  # longest audio piece sent to the model in one window, seconds
    batch_size: int = 0  # windows decoded together; 0 = auto: CPU 1 (faster-whisper) or 4 (whisper-hf), CUDA 16
    # (faster-whisper) or as many as free VRAM holds (whisper-hf)
    language: str | None = None  # None = detect; zh, en, yue, ...
    task: Task = "transcribe"
    zh_script: ZhScript = "simplified"  # applied when the language is zh
    initial_prompt: str | None = None
    beam_size: int = 1  # 1 = greedy
    temperatures: tuple[float, ...] = (0.0, 0.2, 0.4, 0.6, 0.8, 1.0)  # fallback ladder
    seed: int | None = 0  # the sampling of the temperature fallback: the same audio gives the same text; None = random
    compression_ratio_threshold: float | None = 2.4  # gzip ratio of the text, as in openai/whisper
    logprob_threshold: float | None = -1.0
    no_speech_threshold: float | None = 0.6
    condition_on_previous_text: bool = True
    word_timestamps: bool = False  # words with start, end and probability in every segment
    # a live turn's final transcript: auto = an encoder window cut to the utterance (faster-whisper, utterances up to
    # 20 s; 5x cheaper for a 3 s question, same WER: benchmarks/live_asr.py), full = Whisper's 30 s window
    live_window: LiveWindow = "auto"
    # backend openai: a remote /v1/audio/transcriptions server (vLLM, speaches, OpenAI, another assistant serve);
    # decoding and the VAD stay local, each speech window is one request; `model` is the server's model name
    base_url: str | None = None  # e.g. http://127.0.0.1:8000/v1
    api_key: str | None = None  # default: the OPENAI_API_KEY environment variable
    max_in_flight: int = 4  # windows sent at once, so the server can batch them
    timeout_s: float = 120.0  # per request
    max_retries: int = 4  # 429 (after its Retry-After), 5xx, timeouts and lost connections are retried

    def __post_init__(self) -> None:
        if self.backend not in registry.ASR_BACKENDS:
            raise ConfigError(f"asr.backend: unknown backend {self.backend!r}; choose one of {registry.names('asr')}")
        _require(self.chunk_s > 0 and self.chunk_s <= 30, "asr.chunk_s", self.chunk_s, "a number in (0, 30]")
        _require(self.batch_size >= 0, "asr.batch_size", self.batch_size, "0 (auto) or an integer >= 1")
        _require(self.beam_size >= 1, "asr.beam_size", self.beam_size, "an integer >= 1")
        _require(self.threads >= 0, "asr.threads", self.threads, "0 (all cores) or a positive integer")
        _require(self.max_in_flight >= 1, "asr.max_in_flight", self.max_in_flight, "an integer >= 1")
        _require(self.timeout_s > 0, "asr.timeout_s", self.timeout_s, "a positive number of seconds")
        _require(self.max_retries >= 0, "asr.max_retries", self.max_retries, "an integer >= 0")
        _require(len(self.temperatures) > 0, "asr.temperatures", self.temperatures, "a non-empty list")
        _require(self.seed is None or 0 <= self.seed < 2**32, "asr.seed", self.seed, "null or an integer in [0, 2**32)")
        _require(
            self.device == "auto" or self.device == "cpu" or self.device.startswith("cuda"),
            "asr.device",
            self.device,
            "auto, cpu, cuda or cuda:N",
        )


@dataclass(frozen=True)
class VadConfig:
    enabled: bool = True
    backend: str = "silero"  # a name in registry.VAD_BACKENDS
    threshold: float = 0.5  # speech probability above which a frame is speech
    min_speech_ms: int = 250  # shorter bursts are noise
    min_silence_ms: int = 500  # a pause at least this long ends a speech region
    speech_pad_ms: int = 200  # kept on both sides of each region so word edges are not clipped
    max_speech_s: float = 30.0  # a longer region is cut at its last short pause (a recogniser window is 30 s)

    def __post_init__(self) -> None:
        if self.backend not in registry.VAD_BACKENDS:
            raise ConfigError(f"vad.backend: unknown backend {self.backend!r}; choose one of {registry.names('vad')}")
        _require(0 < self.threshold < 1, "vad.threshold", self.threshold, "a number between 0 and 1")
        _require(self.max_speech_s >= 5, "vad.max_speech_s", self.max_speech_s, "at least 5 seconds")


@dataclass(frozen=True)
class TranscribeConfig:
    formats: tuple[OutputFormat, ...] = ("txt", "srt")
    output_dir: str | None = None  # None = next to each input file
    block_s: float = 600.0  # audio decoded and processed at a time; bounds memory for long recordings
    max_line_chars: int = 42  # SRT/VTT: characters per subtitle line (CJK text: 16, the broadcast rule)
    max_cue_s: float = 7.0  # SRT/VTT: longest time one cue stays on screen, seconds
    audio_track: int | None = None  # which audio stream (0 = first); None = the one that holds the speech
    audio_channel: int | None = None  # which channel of it (0 = first); None = the mix, or the clearest channel
    ray_workers: int = 0  # --ray: actors on a cluster without GPUs; 0 = half its CPUs (with GPUs: one per GPU)

    def __post_init__(self) -> None:
        _require(self.ray_workers >= 0, "transcribe.ray_workers", self.ray_workers, "0 (auto) or an integer >= 1")
        _require(self.block_s >= 60, "transcribe.block_s", self.block_s, "at least 60 seconds")
        _require(self.max_line_chars >= 10, "transcribe.max_line_chars", self.max_line_chars, "an integer >= 10")
        _require(self.max_line_chars <= 1000, "transcribe.max_line_chars", self.max_line_chars, "an integer <= 1000")
        _require(
            math.isfinite(self.max_cue_s) and self.max_cue_s >= 1,
            "transcribe.max_cue_s",
            self.max_cue_s,
            "a number of seconds, at least 1",
        )
        _require(
            self.audio_channel is None or self.audio_channel >= 0,
            "transcribe.audio_channel",
            self.audio_channel,
            "a channel index >= 0 (0 = the first), or null for the mix or the clearest channel",
        )
        _require(
            self.audio_track is None or self.audio_track >= 0,
            "transcribe.audio_track",
            self.audio_track,
            "an audio stream index >= 0 (0 = the first), or null to pick the one that holds the speech",
        )
        _require(len(self.formats) > 0, "transcribe.formats", self.formats, "at least one of txt, srt, vtt, json, tsv")


@dataclass(frozen=True)
class SamplingConfig:
    """How a reply is sampled. The same names as transformers' generate() and the OpenAI API use."""

    temperature: float = 0.7  # 0 = greedy
    top_p: float = 0.8
    top_k: int = 20  # 0 = off
    repetition_penalty: float = 1.05  # 1 = off
    max_new_tokens: int = 512
    min_new_tokens: int = 0  # end-of-sequence is suppressed until this many tokens (benchmarks fix lengths)
    stop: tuple[str, ...] = ()  # the reply ends before the first of these strings
    seed: int | None = None  # fixes the sampling for reproducible replies

    def __post_init__(self) -> None:
        _require(math.isfinite(self.temperature) and self.temperature >= 0, "llm.sampling.temperature",
                 self.temperature, "a number >= 0 (0 = greedy)")  # fmt: skip
        _require(0 < self.top_p <= 1, "llm.sampling.top_p", self.top_p, "a number in (0, 1]")
        _require(self.top_k >= 0, "llm.sampling.top_k", self.top_k, "an integer >= 0 (0 = off)")
        _require(math.isfinite(self.repetition_penalty) and self.repetition_penalty > 0,
                 "llm.sampling.repetition_penalty", self.repetition_penalty, "a finite number > 0")  # fmt: skip
        _require(self.max_new_tokens >= 1, "llm.sampling.max_new_tokens", self.max_new_tokens, "an integer >= 1")
        _require(
            0 <= self.min_new_tokens <= self.max_new_tokens,
            "llm.sampling.min_new_tokens",
            self.min_new_tokens,
            "an integer between 0 and max_new_tokens",
        )
        _require(all(self.stop), "llm.sampling.stop", self.stop, "non-empty strings")


Quantize = Literal["none", "8bit", "4bit"]


@dataclass(frozen=True)
class LlmConfig:
    backend: str = "llama-cpp"  # a name in registry.LLM_BACKENDS
    model: str = "qwen2.5-0.5b"  # offline bundle, local path (GGUF file or transformers directory), or hub id
    sha256: str | None = None  # checks a local GGUF file / model.safetensors when set
    template: str = "auto"  # auto | tokenizer | a built-in name (assistant.llm.templates.BUILTIN_TEMPLATES)
    system: str | None = "你是一个乐于助人的助手。"  # system prompt; a persona's replaces it
    persona: str | None = None  # YAML character file: name, greeting, system
    context_tokens: int = 4096  # prompt + reply must fit; older turns are dropped to make room
    device: str = "auto"  # hf: auto | cpu | cuda | cuda:N (auto spreads over all GPUs)
    dtype: str = "auto"  # hf: auto | float32 | float16 | bfloat16
    quantize: Quantize = "none"  # hf: 8bit | 4bit weights
    quant_method: Literal["bitsandbytes", "torchao"] = "bitsandbytes"  # hf: torchao = int4 tinygemm (CUDA), int8
    quant_type: Literal["nf4", "fp4"] = "nf4"  # hf 4bit
    double_quant: bool = True  # hf 4bit: quantize the quantization constants too
    compute_dtype: str = "auto"  # hf 4bit matmul dtype: auto | float32 | float16 | bfloat16
    adapter: str | None = None  # hf: a LoRA adapter directory (peft); its tokenizer wins if it has one
    attention: str = "auto"  # hf: auto | sdpa | flash_attention_2 | eager
    cache: Literal["dynamic", "static"] = "dynamic"  # hf: KV cache grown per token, or preallocated for the context
    compile: bool = False  # hf: torch.compile the decode step over a static cache (fast batch-1 decode on GPUs)
    threads: int = 0  # llama-cpp: CPU threads, 0 = all cores
    gpu_layers: int = 0  # llama-cpp: layers offloaded to the GPU, -1 = all
    batch_tokens: int = 512  # llama-cpp: prompt tokens evaluated per batch
    base_url: str | None = None  # openai: e.g. http://127.0.0.1:8000/v1 (vLLM, llama.cpp server, Ollama)
    api_key: str | None = None  # openai: default is the OPENAI_API_KEY environment variable
    timeout_s: float = 120.0  # openai: per request
    sampling: SamplingConfig = field(default_factory=SamplingConfig)

    def __post_init__(self) -> None:
        if self.backend not in registry.LLM_BACKENDS:
            raise ConfigError(f"llm.backend: unknown backend {self.backend!r}; choose one of {registry.names('llm')}")
        _require(
            self.template in TEMPLATE_CHOICES, "llm.template", self.template, f"one of {', '.join(TEMPLATE_CHOICES)}"
        )
        _require(self.context_tokens >= 64, "llm.context_tokens", self.context_tokens, "an integer >= 64")
        _require(
            self.sampling.max_new_tokens < self.context_tokens,
            "llm.sampling.max_new_tokens",
            self.sampling.max_new_tokens,
            f"fewer than llm.context_tokens ({self.context_tokens}), leaving room for the prompt",
        )
        _require(
            self.device == "auto" or self.device == "cpu" or self.device.startswith("cuda"),
            "llm.device",
            self.device,
            "auto, cpu, cuda or cuda:N",
        )
        _require(self.threads >= 0, "llm.threads", self.threads, "0 (all cores) or a positive integer")
        _require(self.gpu_layers >= -1, "llm.gpu_layers", self.gpu_layers, "-1 (all), 0 or a positive integer")
        _require(self.batch_tokens >= 1, "llm.batch_tokens", self.batch_tokens, "an integer >= 1")
        _require(self.timeout_s > 0, "llm.timeout_s", self.timeout_s, "a positive number of seconds")


@dataclass(frozen=True)
class ChatConfig:
    autosave: str | None = None  # JSON file the conversation is written to after every turn
    load: str | None = None  # JSON conversation to resume


@dataclass(frozen=True)
class InputConfig:
    """Where spoken turns come from (``assistant chat``)."""

    source: str = "auto"  # auto (microphone if there is one, else text) | microphone | file | text
    device: str | None = None  # microphone: a sounddevice name or index; None = the system default
    mode: Literal["vad", "push-to-talk"] = "vad"  # vad: turns end after vad.min_silence_ms; push-to-talk: Enter
    max_utterance_s: float = 30.0  # a turn longer than this is cut and answered
    barge_in: bool = True  # speaking while a reply streams cancels it (live sources only)
    realtime: bool = False  # file source: play files at speaking pace (barge-in and latency as with a microphone)
    partial_interval_s: float = 0.5  # live partial transcripts: new speech between two (model idle only); 0 = off

    def __post_init__(self) -> None:
        choices = ("auto", "text", *registry.SOURCES)
        _require(self.source in choices, "input.source", self.source, f"one of {', '.join(choices)}")
        _require(0 < self.max_utterance_s <= 30, "input.max_utterance_s", self.max_utterance_s, "a number in (0, 30]")
        _require(self.partial_interval_s >= 0, "input.partial_interval_s", self.partial_interval_s, "seconds >= 0")


@dataclass(frozen=True)
class TurnConfig:
    """When a spoken turn ends and what starts before it does (``assistant.turn``, ``assistant.session``)."""

    detector: str = "rules"  # a name in registry.TURN_DETECTORS: rules (English, Chinese) | fixed (vad.min_silence_ms)
    complete_silence_ms: int = 250  # silence that ends a turn the detector judges finished ("What time is it?")
    incomplete_silence_ms: int = 1200  # ... one it judges unfinished ("I'd like to order a pizza and ...")
    preemptive: bool = True  # in a pause: transcribe, prefill and start the reply, held until the turn ends

    def __post_init__(self) -> None:
        _require(self.detector in registry.TURN_DETECTORS, "turn.detector", self.detector,
                 f"one of {registry.names('turn')}")  # fmt: skip
        for name in ("complete_silence_ms", "incomplete_silence_ms"):
            value = getattr(self, name)
            _require(0 < value <= 10_000, f"turn.{name}", value, "milliseconds in (0, 10000]")


@dataclass(frozen=True)
class TtsConfig:
    """Voice out: how replies are spoken (the ``speaker`` sink, ``POST /v1/audio/speech``). See assistant.tts.Speech."""

    english_voice: str = "joe-us-piper"  # a Piper voice: the offline package's name or a path to its .onnx
    # an espeak-ng voice for text with Chinese characters; Debian's espeak-ng 1.51 "cmn" reads its own tone digits
    # out as English numbers (espeak-ng issues 1028, 1370): the pinyin voice speaks Mandarin
    chinese_voice: str = "cmn-latn-pinyin"
    voice: str = "auto"  # default voice: auto (by language) | piper | espeak-ng | espeak-ng:<voice> | english_voice
    speed: float = 1.0  # multiple of the voice's natural pace, 0.25 to 4
    # backend openai: every text spoken by a remote /v1/audio/speech server (Kokoro-FastAPI, speaches, OpenAI,
    # another assistant serve); voice names go to it as they are (auto = alloy)
    backend: Literal["local", "openai"] = "local"
    base_url: str | None = None  # e.g. http://127.0.0.1:8880/v1
    api_key: str | None = None  # default: the OPENAI_API_KEY environment variable
    model: str = "tts-1"  # the server's model name (kokoro, tts-1, ...)
    timeout_s: float = 60.0  # per sentence

    def __post_init__(self) -> None:
        if self.backend == "openai":
            check_remote_voice(self.voice, "tts.voice")
        else:
            check_voice_name(self.voice, self.english_voice, "tts.voice")
        check_speed(self.speed, "tts.speed")
        _require(bool(ESPEAK_VOICE.fullmatch(self.chinese_voice)), "tts.chinese_voice", self.chinese_voice,
                 "an espeak-ng voice name such as cmn ('espeak-ng --voices' lists them)")  # fmt: skip


@dataclass(frozen=True)
class SpeakerConfig:
    """The ``speaker`` sink: where spoken replies are played."""

    device: str | None = None  # output device (sounddevice name or index); None = the system default
    save_dir: str | None = None  # write every spoken sentence as a wav file here instead of playing it


@dataclass(frozen=True)
class OutputConfig:
    """Where replies go."""

    sinks: tuple[str, ...] = ("console",)  # names in registry.SINKS
    log: str = "turns.jsonl"  # jsonl sink: one JSON line per turn (transcript, reply, metrics)
    speaker: SpeakerConfig = field(default_factory=SpeakerConfig)

    def __post_init__(self) -> None:
        for sink in self.sinks:
            _require(sink in registry.SINKS, "output.sinks", sink, f"one of {registry.names('sink')}")


@dataclass(frozen=True)
class ServerConfig:
    host: str = "127.0.0.1"  # any other address requires api_key
    port: int = 8765
    api_key: str | None = None  # Bearer token; default: the ASSISTANT_API_KEY environment variable
    api_keys: tuple[str, ...] = ()  # more keys, one per client: sessions are counted per key
    max_sessions: int = 16  # open WebSocket sessions
    max_sessions_per_key: int = 4  # open WebSocket sessions one key may hold (when keys are set)
    max_pending: int = 8  # model jobs waiting for the worker; more is a "busy" error
    max_requests: int = 32  # HTTP requests in progress at once; more is a "busy" error
    max_upload_mb: float = 50.0  # HTTP body / uploaded file
    max_turn_audio_s: float = 60.0  # audio in one WebSocket turn
    max_upload_audio_s: float = 10800.0  # audio in one uploaded file (3 hours): a small file can hold many hours
    max_message_kb: int = 1024  # one WebSocket message
    request_timeout_s: float = 60.0  # to send a whole HTTP request (headers and body); slower clients are cut off
    idle_timeout_s: float = 300.0  # a WebSocket session with no message and no reply for this long is closed
    allowed_origins: tuple[str, ...] = ()  # browser Origins allowed besides the server's own address
    allowed_hosts: tuple[str, ...] = ()  # Host names clients may use besides the bound address (a TLS proxy's name)
    docs: bool = False  # serve /docs and /openapi.json (the route listing; behind the API key when one is set)
    persona_dir: str | None = None  # YAML personas (name, greeting, system) offered by GET /v1/personas and the page
    conversation_dir: str | None = None  # each WebSocket session's conversation saved here after every turn
    output_modalities: tuple[Literal["text", "audio"], ...] = ("audio",)  # realtime replies: spoken (the API's) or text
    # per client (API key, else address): None = unset on loopback, 120 req/min and 240 audio min/h when reachable
    # from other machines; 0 = off
    rate_limit_requests_per_minute: int | None = None  # HTTP requests under /v1, WebSocket connects, response.create
    rate_limit_audio_minutes_per_hour: float | None = None  # uploaded files and Realtime input audio
    shutdown_timeout_s: float = 5.0  # on SIGTERM/SIGINT: work in flight gets this long to end; exit is forced 3 s later

    def __post_init__(self) -> None:
        _require(0 < self.port < 65536, "server.port", self.port, "a TCP port number")
        for name in ("max_sessions", "max_sessions_per_key", "max_pending", "max_requests"):
            _require(getattr(self, name) >= 1, f"server.{name}", getattr(self, name), "an integer >= 1")
        for name in ("max_upload_mb", "max_turn_audio_s", "max_upload_audio_s", "request_timeout_s", "idle_timeout_s"):
            _require(getattr(self, name) > 0, f"server.{name}", getattr(self, name), "a positive number")
        for name in ("rate_limit_requests_per_minute", "rate_limit_audio_minutes_per_hour"):
            value = getattr(self, name)
            _require(value is None or (math.isfinite(value) and value >= 0), f"server.{name}", value,
                     "a number >= 0 (0 turns the limit off)")  # fmt: skip
        _require(0 < self.shutdown_timeout_s <= 60, "server.shutdown_timeout_s", self.shutdown_timeout_s,
                 "seconds, more than 0 and at most 60")  # fmt: skip
        _require(self.max_message_kb >= 1, "server.max_message_kb", self.max_message_kb, "an integer >= 1")
        _require(all(key.strip() for key in self.api_keys), "server.api_keys", self.api_keys, "non-empty keys")
        _require(len(self.output_modalities) == 1, "server.output_modalities", self.output_modalities,
                 "[audio] (spoken replies with their transcript) or [text]")  # fmt: skip


@dataclass(frozen=True)
class Config:
    asr: AsrConfig = field(default_factory=AsrConfig)
    vad: VadConfig = field(default_factory=VadConfig)
    transcribe: TranscribeConfig = field(default_factory=TranscribeConfig)
    llm: LlmConfig = field(default_factory=LlmConfig)
    tts: TtsConfig = field(default_factory=TtsConfig)
    chat: ChatConfig = field(default_factory=ChatConfig)
    input: InputConfig = field(default_factory=InputConfig)
    turn: TurnConfig = field(default_factory=TurnConfig)
    output: OutputConfig = field(default_factory=OutputConfig)
    server: ServerConfig = field(default_factory=ServerConfig)


def _require(ok: bool, path: str, value: object, expected: str) -> None:
    if not ok:
        raise ConfigError(f"{path}: {value!r} is not valid; expected {expected}")


def load_config(path: str | Path | None = None, overrides: Iterable[str] = ()) -> Config:
    """Defaults, then the YAML file, then ``key.path=value`` overrides (values parsed as YAML)."""
    data: dict[str, Any] = {}
    if path is not None:
        data = _read_yaml(Path(path))
    for item in overrides:
        key, value = _parse_override(item)
        _set_dotted(data, key, value)
    return build(Config, data, "")


def _read_yaml(path: Path) -> dict[str, Any]:
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as exc:
        raise ConfigError(f"cannot read config file '{path}': {exc.strerror}; check the path") from None
    except UnicodeDecodeError:
        raise ConfigError(f"'{path}' is not UTF-8 text; save the YAML file as UTF-8") from None
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        raise ConfigError(f"'{path}' is not valid YAML: {exc}") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError(f"'{path}' must hold a mapping of sections (asr:, vad:, ...), not {type(data).__name__}")
    return data


def _parse_override(item: str) -> tuple[str, Any]:
    key, sep, raw = item.partition("=")
    if not sep or not key.strip():
        raise ConfigError(f"override {item!r} must look like section.key=value, e.g. asr.beam_size=5")
    try:
        value = yaml.safe_load(raw) if raw.strip() else None
    except yaml.YAMLError:
        value = raw
    return key.strip(), value


def _set_dotted(data: dict[str, Any], dotted: str, value: Any) -> None:
    *parents, last = dotted.split(".")
    node = data
    for part in parents:
        child = node.setdefault(part, {})
        if not isinstance(child, dict):
            raise ConfigError(f"override {dotted!r}: {part!r} is not a section")
        node = child
    node[last] = value


def build(cls: type, data: Any, path: str) -> Any:
    """Turn a YAML mapping into the dataclass ``cls``, checking every key and type on the way."""
    if not isinstance(data, Mapping):
        raise ConfigError(f"{path or 'config'}: expected a mapping, got {_describe(data)}")
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls)}
    unknown = sorted(set(data) - set(fields))
    if unknown:
        where = f"{path}." if path else ""
        raise ConfigError(
            f"unknown key {where}{unknown[0]!s}; valid keys{' in ' + path if path else ''}: {', '.join(fields)}"
        )
    values = {name: _convert(hints[name], data[name], _join(path, name)) for name in data}
    try:
        return cls(**values)
    except TypeError as exc:  # pragma: no cover - every field has a default
        raise ConfigError(f"{path or 'config'}: {exc}") from None


def _convert(hint: Any, value: Any, path: str) -> Any:
    if dataclasses.is_dataclass(hint):
        return build(hint, value if value is not None else {}, path)
    origin = get_origin(hint)
    if origin in (Union, types.UnionType):
        options = get_args(hint)
        if value is None and type(None) in options:
            return None
        errors = []
        for option in options:
            if option is type(None):
                continue
            try:
                return _convert(option, value, path)
            except ConfigError as exc:
                errors.append(exc)
        raise errors[0]
    if origin is Literal:
        choices = get_args(hint)
        if value not in choices:
            raise ConfigError(f"{path}: {value!r} is not one of {', '.join(map(str, choices))}")
        return value
    if origin is tuple:
        item_hint = get_args(hint)[0]
        items = value if isinstance(value, list | tuple) else [value]
        if isinstance(value, str) and "," in value:
            items = [part.strip() for part in value.split(",") if part.strip()]
        return tuple(_convert(item_hint, item, f"{path}[{i}]") for i, item in enumerate(items))
    return _convert_scalar(hint, value, path)


def _convert_scalar(hint: Any, value: Any, path: str) -> Any:
    if hint is bool:
        if isinstance(value, bool):
            return value
    elif hint is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
    elif hint is float:
        if isinstance(value, int | float) and not isinstance(value, bool):
            return float(value)
    elif hint is str:
        if isinstance(value, str):
            return value
        if isinstance(value, int | float) and not isinstance(value, bool):
            return str(value)
    else:  # pragma: no cover - a type this loader was not taught
        raise ConfigError(f"{path}: unsupported option type {hint!r}")
    raise ConfigError(f"{path}: expected {hint.__name__}, got {_describe(value)}")


def _describe(value: Any) -> str:
    return "nothing" if value is None else f"{type(value).__name__} {value!r}"


def _join(path: str, name: str) -> str:
    return f"{path}.{name}" if path else name


def to_dict(config: Any) -> dict[str, Any]:
    """The configuration as plain data (for JSON output and ``--print-config``)."""
    return dataclasses.asdict(config)
