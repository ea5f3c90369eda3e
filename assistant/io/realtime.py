"""``/v1/realtime``: the OpenAI Realtime API (GA) over WebSocket, as a thin driver of the voice session.

A client of the Realtime API (the official ``openai`` SDK's ``client.realtime.connect``, frameworks built on it,
browser demos) points its ``websocket_base_url`` at this server and works unchanged: GA event names and fields out;
GA and beta shapes of ``session.update`` in. This module only translates: client events become calls on
``assistant.session.VoiceSession`` and its typed events become server events. Audio formats: ``audio/pcm`` (PCM16
mono, 24 kHz by default as in the API; other rates accepted and resampled with soxr), ``audio/pcmu`` and
``audio/pcma`` (G.711, 8 kHz). docs/protocol.md is the compatibility table: every GA event, supported, accepted and
ignored, or refused. Every bad message gets an ``error`` event naming it, and the session goes on.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import contextlib
import dataclasses
import json
import math
import time
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

from assistant.config import SamplingConfig, build
from assistant.conversation import Conversation
from assistant.errors import (
    AssistantError,
    AuthError,
    ConfigError,
    LimitError,
    OutputError,
    RateLimitError,
    ShutdownError,
    public_message,
)
from assistant.io.conversations import ConversationStore
from assistant.messages import (
    SAMPLE_RATE,
    Audio,
    ItemAdded,
    ItemDeleted,
    ItemTruncated,
    Message,
    ReplyAudio,
    ReplyDone,
    ReplyStarted,
    ReplyTextDelta,
    SessionError,
    SessionEvent,
    SpeculationDone,
    SpeechStarted,
    SpeechStopped,
    TranscriptFailed,
    TranscriptFinal,
    TranscriptPartial,
)
from assistant.session import ResponseOptions, SessionOptions, TurnDetection, VoiceSession
from assistant.turn import EAGERNESS_SCALE

CLOSE_POLICY = 1008  # WebSocket close code: policy violation (bad origin, no key)
CLOSE_TRY_LATER = 1013
CLOSE_GOING_AWAY = 1001
CLOSE_INTERNAL_ERROR = 1011
DEFAULT_PCM_RATE = 24_000  # Hz: the Realtime API's audio/pcm
G711_RATE = 8_000  # Hz: audio/pcmu and audio/pcma
AUDIO_DELTA_S = 0.2  # reply audio is sent in pieces of this length
SEND_TIMEOUT_S = 30.0  # a client that reads nothing for this long is treated as gone
# names the Realtime API defines that this server accepts and ignores (they change nothing here)
IGNORED_SESSION_KEYS = {"object", "id", "expires_at", "include", "tracing", "truncation", "client_secret",
                        "parallel_tool_calls", "reasoning",
                        "conversation_id", "history_messages"}  # fmt: skip  # the last two: ours, echoed back
SAMPLING_KEYS = ("temperature", "top_p", "top_k", "repetition_penalty", "seed")


@dataclasses.dataclass(frozen=True)
class AudioFormat:
    """An audio format of the session: ``audio/pcm`` at ``rate``, or G.711 ``audio/pcmu`` / ``audio/pcma``."""

    type: str = "audio/pcm"
    rate: int = DEFAULT_PCM_RATE

    def describe(self) -> dict[str, Any]:
        return {"type": self.type, "rate": self.rate} if self.type == "audio/pcm" else {"type": self.type}


class RealtimeSession:
    """One WebSocket connection: authentication, limits and saving around one VoiceSession."""

    def __init__(self, services: Any, websocket: Any) -> None:
        from assistant.io.server import new_session

        self._services = services
        self._config = services.config
        self._ws = websocket
        self._session_id = f"sess_{uuid.uuid4().hex[:20]}"
        self._input = AudioFormat()
        self._output = AudioFormat()
        self._resampler: Any = None
        self._send_lock = asyncio.Lock()
        self._saved_as: Path | None = None  # server.conversation_dir/<id>.json
        self._announced: set[str] = set()  # items already sent in conversation.item.added
        self._audio_items: set[str] = set()  # items made of speech (input_audio / output_audio content)
        self._responses: dict[str, tuple[tuple[str, ...], float, float, float]] = {}  # id -> modalities, clocks
        self._gone = False
        self._client = ""  # who the rate limits count (client_of): set once the key is known
        self._throttled_until = 0.0  # audio over the allowance is dropped until then, with one error event
        options = SessionOptions.from_config(self._config, modalities=tuple(self._config.server.output_modalities))
        self.voice = VoiceSession(new_session(services), services.session_services(), options, self._on_event,
                                  vad=self._config.vad)  # fmt: skip

    # --- connection --------------------------------------------------------------------------------------------------

    async def run(self) -> None:
        await self._ws.accept()  # Host and Origin were checked before (assistant.io.access)
        # from here on a server stop reaches this session, whatever stage it is at (even waiting for its key)
        with self._services.shutdown.closing(self._server_stopping):
            if self._services.shutdown.stopping:  # the stop began before this session was registered
                await self._goodbye()
                return
            key = await self._authorized()
            if key is not None and await self._opened(key):
                try:
                    await self._session(key)
                finally:
                    self._services.close_session(key)

    async def _opened(self, key: str) -> bool:
        """Count the session (rate and session limits) and open or resume its conversation; False after refusing."""
        from assistant.io.server import client_of

        self._client = client_of(key, self._ws.client)
        try:
            self._services.rate_limits.request(self._client)
            self._services.open_session(key)
        except (LimitError, RateLimitError) as exc:
            await self._error(exc)
            await self._close(CLOSE_TRY_LATER, exc.code)
            return False
        try:
            self._saved_as = await self._resume(self._ws.query_params.get("conversation"), key)
            self._check_model(self._ws.query_params.get("model"))
        except AssistantError as exc:
            if self._saved_as is not None:
                self._services.release_conversation(self._saved_as)
            self._services.close_session(key)
            await self._error(exc)
            await self._close(CLOSE_POLICY)
            return False
        return True

    async def _session(self, key: str) -> None:
        try:
            await self._send({"type": "session.created", "session": self._describe()})
            await self._receive_loop()
        except Exception as exc:  # a fault of ours ends this session with a reason, never the server
            await self._error(AssistantError(f"the session failed: {type(exc).__name__}: {str(exc)[:300]}"))
            await self._close(CLOSE_INTERNAL_ERROR)
        finally:
            self._gone = True
            if self._saved_as is not None:
                self._services.conversation_closing(self._saved_as)
            await self.voice.close()
            if self._saved_as is not None:
                self._services.release_conversation(self._saved_as)

    async def _server_stopping(self) -> None:
        """The server is stopping: the reply in progress ends where it is (cut, as on a barge-in) and is saved; then
        the client is told and the connection closed with 1001 (going away) and a reason."""
        self.voice.cancel("server_shutdown")
        await self.voice.settle()
        await self._goodbye()

    async def _goodbye(self) -> None:
        from assistant.io.shutdown import SHUTDOWN_MESSAGE

        await self._error(ShutdownError(SHUTDOWN_MESSAGE))
        await self._close(CLOSE_GOING_AWAY, "server shutting down")
        self._gone = True

    async def _close(self, code: int, reason: str = "") -> None:
        """Close the connection; nothing to do when it is closed already or the client has gone."""
        from starlette.websockets import WebSocketDisconnect

        with contextlib.suppress(RuntimeError, ConnectionError, WebSocketDisconnect):
            await self._ws.close(code=code, reason=reason)

    def _check_model(self, model: str | None) -> None:
        """``?model=``: any name works (clients send gpt-realtime); a name of one of our models must be loaded."""
        known = {self._config.llm.model, self._config.asr.model}
        if model and model.startswith(("whisper", "qwen", "smollm")) and model not in known:
            raise ConfigError(f"?model={model}: this server has {', '.join(sorted(known))}; use one of those or "
                              "leave model out")  # fmt: skip

    async def _resume(self, requested: str | None, key: str) -> Path | None:
        """With ``server.conversation_dir``: the file this session's conversation is saved to after every turn,
        ``?conversation=ID`` resuming a saved one (a new id when none is given). None without a directory. With API
        keys, each key's conversations live in a folder of their own: one client cannot open another's."""
        folder = self._config.server.conversation_dir
        if folder is None:
            if requested is not None:
                raise ConfigError("?conversation=: this server keeps no conversations (server.conversation_dir)")
            return None
        conversation_id = requested or uuid.uuid4().hex
        try:
            path = ConversationStore(Path(folder).expanduser()).path_of(key, conversation_id)
        except ConfigError:
            raise ConfigError("?conversation= takes the id from session.created: 1-64 letters, digits, '-' or "
                              "'_'") from None  # fmt: skip
        await self._services.claim_conversation_soon(path)
        if path.is_file():
            try:
                self.voice.chat.resume(Conversation.load(path))
            except AssistantError:
                self._services.release_conversation(path)
                raise
            turns = len(self.voice.chat.conversation.turns)
            self.voice.items[:] = [f"item_{conversation_id[:8]}_{i}" for i in range(turns)]
        return path

    async def _save(self) -> None:
        """Write the conversation after a turn; a failure (disk full, read-only) is this turn's error only."""
        if self._saved_as is None:
            return
        try:
            await asyncio.to_thread(self.voice.chat.conversation.save, self._saved_as)
        except AssistantError as exc:
            await self._error(OutputError(f"the reply was not saved: {exc.message}"))

    async def _authorized(self) -> str | None:
        """The client's API key ("" when the server has none), or None after refusing it."""
        if not self._services.api_keys:
            return ""
        header = self._ws.headers.get("authorization", "")
        offered = header.partition(" ")[2].strip() or self._ws.query_params.get("api_key", "")
        if not offered:  # the first message may carry it: {"type": "auth", "api_key": "..."}
            try:
                first = json.loads(await asyncio.wait_for(self._ws.receive_text(), timeout=10))
                offered = str(first.get("api_key", "")) if isinstance(first, dict) else ""
            except Exception:
                offered = ""
        key = self._services.key_of(offered)
        if key is None:
            await self._error(AuthError("missing or wrong API key (Authorization header, ?api_key= or an auth event)"))
            await self._close(CLOSE_POLICY)
        return key

    async def _receive_loop(self) -> None:
        from starlette.websockets import WebSocketDisconnect

        limit = self._config.server.max_message_kb * 1024
        idle_s = self._config.server.idle_timeout_s
        while True:
            try:
                message = await asyncio.wait_for(self._ws.receive(), timeout=idle_s)
            except TimeoutError:
                if self.voice.replying:
                    continue  # a long reply is still streaming to a client that has nothing to say
                await self._error(LimitError(f"no message for {idle_s:g} s (server.idle_timeout_s); session closed"))
                await self._close(CLOSE_GOING_AWAY)
                return
            except WebSocketDisconnect:
                return
            if message["type"] == "websocket.disconnect":
                return
            data, text = message.get("bytes"), message.get("text")
            size = len(data) if data is not None else len((text or "").encode())
            event_id = None
            try:
                if size > limit:
                    raise LimitError(f"message of {size} bytes is over server.max_message_kb ({limit // 1024} KB)")
                if data is not None:
                    await self._push(self._decode(data))
                else:
                    event = parse_event(text or "")
                    event_id = event.get("event_id") if isinstance(event.get("event_id"), str) else None
                    await self._event(event)
            except AssistantError as exc:
                await self._error(exc, event_id)

    # --- client events -----------------------------------------------------------------------------------------------

    async def _event(self, event: dict[str, Any]) -> None:
        kind = event["type"]
        handler = self._handlers().get(kind)
        if handler is None:
            refused = REFUSED_CLIENT_EVENTS.get(kind)
            if refused:
                raise ConfigError(f"{kind}: {refused}")
            raise ConfigError(f"unknown event type {kind!r}; see docs/protocol.md for the events this server takes")
        await handler(event)

    def _handlers(self) -> dict[str, Callable[[dict[str, Any]], Any]]:
        return {
            "session.update": self._session_update,
            "input_audio_buffer.append": self._append,
            "input_audio_buffer.commit": self._commit,
            "input_audio_buffer.clear": self._clear,
            "conversation.item.create": self._item_create,
            "conversation.item.delete": self._item_delete,
            "conversation.item.truncate": self._item_truncate,
            "conversation.item.retrieve": self._item_retrieve,
            "response.create": self._response_create,
            "response.continue": self._response_continue,
            "response.cancel": self._response_cancel,
            "auth": self._auth_again,
        }

    async def _auth_again(self, event: dict[str, Any]) -> None:
        """An auth event on a server without keys, or after the key was accepted: nothing to do."""

    async def _append(self, event: dict[str, Any]) -> None:
        audio = event.get("audio")
        if not isinstance(audio, str):
            raise ConfigError(f"input_audio_buffer.append needs 'audio': base64 {self._describe_input()}")
        try:
            raw = base64.b64decode(audio, validate=True)
        except (binascii.Error, ValueError):
            raise ConfigError("input_audio_buffer.append: 'audio' is not valid base64") from None
        await self._push(self._decode(raw))

    async def _push(self, samples: np.ndarray) -> None:
        """Input audio, counted against the client's audio allowance: over it, audio is dropped (one error event
        says until when) and the session goes on."""
        now = time.monotonic()
        if now < self._throttled_until:
            return
        try:
            self._services.rate_limits.audio_seconds(self._client, len(samples) / SAMPLE_RATE)
        except (RateLimitError, LimitError) as exc:  # LimitError: one piece is over the whole allowance
            wait = exc.retry_after_s if isinstance(exc, RateLimitError) else 3600.0
            self._throttled_until = now + wait
            await self._end_turn_in_progress()
            raise RateLimitError(f"{exc.message}; input audio is dropped for {math.ceil(wait)} s", wait) from None
        await self.voice.push_audio(samples)

    async def _end_turn_in_progress(self) -> None:
        """Audio stops counting mid-speech: with the server's VAD the turn ends on what was heard, as at
        server.max_turn_audio_s (client-committed audio stays in the buffer for the client to commit or clear)."""
        if self.voice.options.turn_detection is not None:
            with contextlib.suppress(AssistantError):
                await self.voice.commit()

    async def _commit(self, event: dict[str, Any]) -> None:
        await self.voice.commit()

    async def _clear(self, event: dict[str, Any]) -> None:
        self.voice.clear_audio()
        await self._send({"type": "input_audio_buffer.cleared"})

    async def _item_create(self, event: dict[str, Any]) -> None:
        message = _item_message(event.get("item"))
        item = event.get("item")
        requested_id = item.get("id") if isinstance(item, dict) and isinstance(item.get("id"), str) else None
        if requested_id is not None and requested_id in self.voice.items:
            raise ConfigError(f"conversation.item.create: an item with id {requested_id!r} exists already")
        await self.voice.add_message(message, item_id=requested_id)

    async def _item_delete(self, event: dict[str, Any]) -> None:
        await self.voice.delete(_string(event, "item_id", "conversation.item.delete"))
        await self._save()

    async def _item_truncate(self, event: dict[str, Any]) -> None:
        item_id = _string(event, "item_id", "conversation.item.truncate")
        audio_end_ms = event.get("audio_end_ms")
        if not isinstance(audio_end_ms, int) or isinstance(audio_end_ms, bool):
            got = "nothing" if audio_end_ms is None else repr(audio_end_ms)
            raise ConfigError(f"conversation.item.truncate: 'audio_end_ms' must be a whole number of milliseconds of "
                              f"the item's audio the user heard, not {got}")  # fmt: skip
        if event.get("content_index", 0) != 0:
            raise ConfigError("conversation.item.truncate: content_index must be 0 (a reply has one audio part)")
        await self.voice.truncate(item_id, audio_end_ms)
        await self._save()

    async def _item_retrieve(self, event: dict[str, Any]) -> None:
        item_id = _string(event, "item_id", "conversation.item.retrieve")
        message = self.voice.item(item_id)
        item = self._item(item_id, message, "incomplete" if message.cut else "completed")
        await self._send({"type": "conversation.item.retrieved", "item": item})

    async def _response_continue(self, event: dict[str, Any]) -> None:
        """This server's addition: the last reply goes on where it stopped (cut, or at its token limit); the
        deltas extend that item, and ``response.done`` carries its whole text. Takes ``response.create``'s
        ``response`` fields."""
        await self._response_create(event, extend=True)

    async def _response_create(self, event: dict[str, Any], *, extend: bool = False) -> None:
        self._services.rate_limits.request(self._client)
        response = event.get("response") or {}
        if not isinstance(response, dict):
            raise ConfigError("response.create: 'response' must be an object")
        if response.get("conversation", "auto") not in ("auto", None):
            raise ConfigError("response.create: only conversation 'auto' (the session's own) is supported")
        if response.get("input"):
            raise ConfigError("response.create: 'input' (out-of-band items) is not supported; add items with "
                              "conversation.item.create")  # fmt: skip
        if response.get("tools"):
            raise ConfigError("response.create: 'tools' (function calling) is not supported by this server")
        voice = ((response.get("audio") or {}).get("output") or {}).get("voice", response.get("voice"))
        modalities = response.get("output_modalities", response.get("modalities"))
        options = ResponseOptions(
            modalities=_modalities(modalities, "response.create") if modalities is not None else None,
            instructions=_optional_string(response, "instructions", "response.create"),
            max_output_tokens=_max_tokens(response.get("max_output_tokens", response.get("max_response_output_tokens")),
                                          "response.create"),
            voice=self._checked_voice(voice) if voice is not None else None,
            extend=extend,
        )  # fmt: skip
        await self.voice.respond(options, started=time.monotonic())

    async def _response_cancel(self, event: dict[str, Any]) -> None:
        if not self.voice.cancel("client_cancelled"):
            await self._error(ConfigError("response.cancel: no response is in progress"), event.get("event_id"),
                              code="response_cancel_not_active")  # fmt: skip

    # --- session.update ----------------------------------------------------------------------------------------------

    async def _session_update(self, event: dict[str, Any]) -> None:
        session = event.get("session")
        if not isinstance(session, dict):
            raise ConfigError("session.update needs a 'session' object")
        update = _SessionUpdate(self, session)
        update.parse()
        if update.options.voice != self.voice.options.voice:
            await self._try_voice(update.options.voice)
        update.apply()
        await self._send({"type": "session.updated", "session": self._describe()})

    async def _try_voice(self, voice: str) -> None:
        """An espeak-ng voice is only a name until espeak-ng is asked: ask now, not in the middle of a reply."""
        if voice.startswith("espeak-ng:"):
            await asyncio.to_thread(self._services.speech.synthesize, "ok", voice=voice)

    def _checked_voice(self, voice: Any) -> str:
        if isinstance(voice, dict):
            voice = voice.get("id")
        return str(self._services.speech.check_voice(voice))  # OpenAI's names are accepted: they mean "auto"

    def _describe_input(self) -> str:
        if self._input.type == "audio/pcm":
            return f"PCM16 mono at {self._input.rate} Hz"
        return f"G.711 {self._input.type} at 8 kHz"

    def _describe(self) -> dict[str, Any]:
        options, chat = self.voice.options, self.voice.chat
        detection = options.turn_detection
        sampling = chat.sampling
        return {
            "type": "realtime", "object": "realtime.session", "id": self._session_id,
            "model": self._config.llm.model, "output_modalities": list(options.modalities),
            "instructions": chat.conversation.system or "",
            "audio": {
                "input": {
                    "format": self._input.describe(), "noise_reduction": None,
                    "transcription": {"model": self._config.asr.model, "language": options.language,
                                      "prompt": options.transcription_prompt},
                    "turn_detection": _describe_detection(detection),
                },
                "output": {"format": self._output.describe(), "voice": options.voice, "speed": options.speed},
            },
            "max_output_tokens": sampling.max_new_tokens, "tools": [], "tool_choice": "auto",
            "tracing": None, "truncation": "auto", "prompt": None, "include": None,
            # extras of this server
            "conversation_id": self._saved_as.stem if self._saved_as is not None else None,
            "history_messages": len(chat.conversation.messages()),
            "sampling": {key: getattr(sampling, key) for key in SAMPLING_KEYS},
        }  # fmt: skip

    # --- audio in and out --------------------------------------------------------------------------------------------

    def _decode(self, data: bytes) -> np.ndarray:
        """Client audio in the session's input format as 16 kHz float32."""
        if self._input.type == "audio/pcmu":
            from assistant.tts.encode import decode_pcmu

            return self._to_16k(decode_pcmu(data), G711_RATE)
        if self._input.type == "audio/pcma":
            from assistant.tts.encode import decode_pcma

            return self._to_16k(decode_pcma(data), G711_RATE)
        if len(data) % 2:
            raise ConfigError(f"audio must be PCM16 (2 bytes per sample); got an odd number of bytes ({len(data)})")
        samples = np.frombuffer(data, dtype="<i2").astype(np.float32) / 32768.0
        return self._to_16k(samples, self._input.rate)

    def _to_16k(self, samples: np.ndarray, rate: int) -> np.ndarray:
        if rate == SAMPLE_RATE:
            return samples
        if self._resampler is None:
            import soxr

            self._resampler = soxr.ResampleStream(rate, SAMPLE_RATE, 1, dtype="float32")
        return np.asarray(self._resampler.resample_chunk(samples.astype(np.float32)), dtype=np.float32)

    def set_input_format(self, audio_format: AudioFormat) -> None:
        if audio_format != self._input:
            self._input, self._resampler = audio_format, None

    def _encode(self, audio: Audio) -> bytes:
        from assistant.tts.encode import pcm16, pcma, pcmu, resample

        if self._output.type == "audio/pcm":
            return pcm16(resample(audio, self._output.rate).samples)
        samples = resample(audio, G711_RATE).samples
        return pcmu(samples) if self._output.type == "audio/pcmu" else pcma(samples)

    # --- session events -> server events -----------------------------------------------------------------------------

    async def _on_event(self, event: SessionEvent) -> None:
        if isinstance(event, SpeechStarted):
            await self._send({"type": "input_audio_buffer.speech_started", "item_id": event.item_id,
                              "audio_start_ms": round(event.at_s * 1000)})  # fmt: skip
        elif isinstance(event, SpeechStopped):
            await self._speech_stopped(event)
        elif isinstance(event, TranscriptPartial):
            await self._send({"type": "conversation.item.input_audio_transcription.delta", "item_id": event.item_id,
                              "content_index": 0, "delta": event.delta, "text": event.text})  # fmt: skip
        elif isinstance(event, TranscriptFinal):
            await self._transcript(event)
        elif isinstance(event, TranscriptFailed):
            error = event.error
            await self._send({"type": "conversation.item.input_audio_transcription.failed", "item_id": event.item_id,
                              "content_index": 0, "error": _error_fields(error)})  # fmt: skip
            await self._error(error if isinstance(error, AssistantError) else AssistantError(str(error)))
            await self._forget(event.item_id)  # announced at commit, never in the conversation
        elif isinstance(event, ItemAdded):
            await self._item_added(event)
        elif isinstance(event, ItemDeleted):
            self._announced.discard(event.item_id)
            await self._send({"type": "conversation.item.deleted", "item_id": event.item_id})
        elif isinstance(event, ItemTruncated):
            await self._send({"type": "conversation.item.truncated", "item_id": event.item_id, "content_index": 0,
                              "audio_end_ms": event.audio_end_ms})  # fmt: skip
        elif isinstance(event, ReplyStarted):
            await self._reply_started(event)
        elif isinstance(event, ReplyTextDelta):
            await self._reply_text(event)
        elif isinstance(event, ReplyAudio):
            await self._reply_audio(event)
        elif isinstance(event, ReplyDone):
            await self._reply_done(event)
        elif isinstance(event, SpeculationDone):  # no Realtime event: the client sees only the reply it gets
            self._services.metrics.preemptive_replies.labels(outcome=event.outcome).inc()
        elif isinstance(event, SessionError):
            error = event.error
            await self._error(error if isinstance(error, AssistantError) else AssistantError(str(error)),
                              event.event_id)  # fmt: skip

    async def _speech_stopped(self, event: SpeechStopped) -> None:
        previous = self.voice.items[-1] if self.voice.items else None
        if self.voice.options.turn_detection is not None:  # a manual commit is only "committed"
            await self._send({"type": "input_audio_buffer.speech_stopped", "item_id": event.item_id,
                              "audio_end_ms": round(event.at_s * 1000)})  # fmt: skip
        await self._send({"type": "input_audio_buffer.committed", "item_id": event.item_id,
                          "previous_item_id": previous})  # fmt: skip
        self._audio_items.add(event.item_id)
        self._announced.add(event.item_id)
        item = self._item(event.item_id, Message("user", ""), "in_progress", transcript=None)
        await self._send({"type": "conversation.item.added", "previous_item_id": previous, "item": item})

    async def _transcript(self, event: TranscriptFinal) -> None:
        await self._send({"type": "conversation.item.input_audio_transcription.completed", "item_id": event.item_id,
                          "content_index": 0, "transcript": event.text,
                          "usage": {"type": "duration", "seconds": round(event.audio_s, 3)},
                          "audio_s": round(event.audio_s, 3), "latency_ms": round(event.latency_ms)})  # fmt: skip
        if not event.text:  # noise: the announced item is gone, no turn is taken
            await self._forget(event.item_id)

    async def _forget(self, item_id: str) -> None:
        """An item the client was told about that did not make it into the conversation."""
        if item_id in self._announced:
            self._announced.discard(item_id)
            await self._send({"type": "conversation.item.deleted", "item_id": item_id})

    async def _item_added(self, event: ItemAdded) -> None:
        item = self._item(event.item_id, event.message, "incomplete" if event.message.cut else "completed")
        if event.item_id not in self._announced:
            self._announced.add(event.item_id)
            await self._send({"type": "conversation.item.added", "previous_item_id": event.previous_item_id,
                              "item": item})  # fmt: skip
        await self._send({"type": "conversation.item.done", "previous_item_id": event.previous_item_id, "item": item})

    async def _reply_started(self, event: ReplyStarted) -> None:
        spoken = "audio" in event.modalities
        self._responses[event.response_id] = (event.modalities, time.monotonic(), 0.0, 0.0)
        if spoken:
            self._audio_items.add(event.item_id)
        self._announced.add(event.item_id)
        item = self._item(event.item_id, Message("assistant", ""), "in_progress")
        await self._send({"type": "response.created", "response": self._response(event.response_id, "in_progress",
                                                                                 event.modalities)})  # fmt: skip
        await self._send({"type": "response.output_item.added", "response_id": event.response_id, "output_index": 0,
                          "item": item})  # fmt: skip
        previous = self.voice.items[-1] if self.voice.items else None
        await self._send({"type": "conversation.item.added", "previous_item_id": previous, "item": item})
        part = {"type": "audio", "transcript": ""} if spoken else {"type": "text", "text": ""}
        await self._send({"type": "response.content_part.added", **self._where(event), "part": part})

    async def _reply_text(self, event: ReplyTextDelta) -> None:
        modalities, started, first_char, first_audio = self._responses[event.response_id]
        if not first_char:
            self._responses[event.response_id] = (modalities, started, time.monotonic(), first_audio)
        kind = "response.output_audio_transcript.delta" if "audio" in modalities else "response.output_text.delta"
        await self._send({"type": kind, **self._where(event), "delta": event.delta})

    async def _reply_audio(self, event: ReplyAudio) -> None:
        modalities, started, first_char, first_audio = self._responses[event.response_id]
        if not first_audio:
            self._responses[event.response_id] = (modalities, started, first_char, time.monotonic())
        data = await asyncio.to_thread(self._encode, event.audio)
        bytes_per_s = self._output.rate * 2 if self._output.type == "audio/pcm" else G711_RATE
        step = max(2, int(bytes_per_s * AUDIO_DELTA_S) // 2 * 2)
        for start in range(0, len(data), step):
            await self._send({"type": "response.output_audio.delta", **self._where(event),
                              "delta": base64.b64encode(data[start : start + step]).decode()})  # fmt: skip

    async def _reply_done(self, event: ReplyDone) -> None:
        if event.status != "failed":
            self._services.metrics.realtime_response(event.metrics, event.stats)
        modalities, _, _, _ = self._responses.pop(event.response_id, (("text",), 0.0, 0.0, 0.0))
        where = self._where(event)
        spoken = "audio" in modalities
        if event.status != "failed":
            if spoken:
                await self._send({"type": "response.output_audio.done", **where})
                await self._send({"type": "response.output_audio_transcript.done", **where,
                                  "transcript": event.text})  # fmt: skip
                part = {"type": "audio", "transcript": event.text}
            else:
                await self._send({"type": "response.output_text.done", **where, "text": event.text})
                part = {"type": "text", "text": event.text}
            await self._send({"type": "response.content_part.done", **where, "part": part})
        item = self._item(event.item_id, Message("assistant", event.text, cut=event.status != "completed"),
                          "completed" if event.status == "completed" else "incomplete")  # fmt: skip
        if event.status != "failed":
            await self._send({"type": "response.output_item.done", "response_id": event.response_id,
                              "output_index": 0, "item": item})  # fmt: skip
        else:
            error = event.error if isinstance(event.error, AssistantError) else AssistantError(str(event.error))
            await self._error(error)
            await self._forget(event.item_id)
        response = self._response(event.response_id, event.status, modalities, event, item)
        await self._save()
        await self._send({"type": "response.done", "response": response})

    def _response(self, response_id: str, status: str, modalities: tuple[str, ...], done: ReplyDone | None = None,
                  item: dict[str, Any] | None = None) -> dict[str, Any]:  # fmt: skip
        response: dict[str, Any] = {
            "id": response_id, "object": "realtime.response", "status": status, "output_modalities": list(modalities),
            "conversation_id": self._saved_as.stem if self._saved_as is not None else self._session_id,
            "output": [item] if item is not None and status != "failed" else [],
            "audio": {"output": {"format": self._output.describe(), "voice": self.voice.options.voice}},
            "max_output_tokens": self.voice.chat.sampling.max_new_tokens, "metadata": None, "usage": None,
            "status_details": None,
        }  # fmt: skip
        if done is None:
            return response
        stats = done.stats
        response["usage"] = {
            "total_tokens": stats.prompt_tokens + stats.completion_tokens, "input_tokens": stats.prompt_tokens,
            "output_tokens": stats.completion_tokens,
            "input_token_details": {"cached_tokens": stats.cached_tokens, "text_tokens": stats.prompt_tokens,
                                    "audio_tokens": 0},
            "output_token_details": {"text_tokens": stats.completion_tokens, "audio_tokens": 0},
        }  # fmt: skip
        if status != "completed":
            details: dict[str, Any] = {"type": status, "reason": done.reason}
            if done.error is not None:
                details["error"] = _error_fields(done.error)
                details["reason"] = None
            response["status_details"] = details
        metrics = done.metrics
        if metrics is not None:
            response["metrics"] = {
                "first_char_ms": round(metrics.speech_end_to_first_char_ms),
                "first_audio_ms": None if metrics.speech_end_to_first_audio_ms is None
                else round(metrics.speech_end_to_first_audio_ms),
                "transcript_ms": round(metrics.speech_end_to_transcript_ms),
                "tokens": stats.completion_tokens, "tokens_per_s": round(metrics.tokens_per_s, 1),
                "audio_s": round(done.audio_s, 3), "preemptive": metrics.preemptive,
                **{key: None if value is None else round(value) for key, value in (
                    ("endpoint_ms", metrics.endpoint_ms), ("asr_start_ms", metrics.asr_start_ms),
                    ("asr_ms", metrics.asr_ms), ("first_token_ms", metrics.first_token_ms))},
            }  # fmt: skip
        return response

    def _where(self, event: ReplyTextDelta | ReplyAudio | ReplyDone | ReplyStarted) -> dict[str, Any]:
        return {"response_id": event.response_id, "item_id": event.item_id, "output_index": 0, "content_index": 0}

    def _item(self, item_id: str, message: Message, status: str, *, transcript: Any = "") -> dict[str, Any]:
        """A conversation item in the Realtime API's shape."""
        if message.role == "user":
            if item_id in self._audio_items:
                content = [{"type": "input_audio", "transcript": message.content if transcript == "" else transcript}]
            else:
                content = [{"type": "input_text", "text": message.content}]
        elif item_id in self._audio_items:
            content = [{"type": "output_audio", "transcript": message.content}]
        else:
            content = [{"type": "output_text", "text": message.content}]
        return {"id": item_id, "object": "realtime.item", "type": "message", "role": message.role, "status": status,
                "content": content}  # fmt: skip

    # --- sending -----------------------------------------------------------------------------------------------------

    async def _send(self, event: dict[str, Any]) -> None:
        from starlette.websockets import WebSocketDisconnect

        if self._gone:
            return
        event = {"event_id": f"event_{uuid.uuid4().hex[:20]}", **event}
        async with self._send_lock:
            try:
                await asyncio.wait_for(self._ws.send_text(json.dumps(event, ensure_ascii=False)), SEND_TIMEOUT_S)
            except (TimeoutError, RuntimeError, ConnectionError, WebSocketDisconnect):
                self._gone = True  # the client stopped reading or left: stop working for it
                self.voice.cancel("client_cancelled")

    async def _error(self, exc: AssistantError, event_id: str | None = None, *, code: str | None = None) -> None:
        fields = _error_fields(exc, event_id, code)
        self._services.metrics.error(fields["code"])
        await self._send({"type": "error", "error": fields})


class _SessionUpdate:
    """One ``session.update``, read whole (GA and beta shapes) before anything changes: a bad value changes
    nothing and the error names it."""

    def __init__(self, owner: RealtimeSession, session: dict[str, Any]) -> None:
        self._owner = owner
        self._session = session
        voice = owner.voice
        self.options = voice.options
        self.instructions: str | None = None
        self.sampling = voice.chat.sampling
        self.input_format: AudioFormat | None = None
        self.output_format: AudioFormat | None = None

    def parse(self) -> None:
        session = dict(self._session)
        kind = session.pop("type", "realtime")
        if kind != "realtime":
            raise ConfigError(f"session.update: type {kind!r} is not supported; this server runs 'realtime' "
                              "sessions (transcription-only sessions: use /v1/audio/transcriptions)")  # fmt: skip
        session.pop("model", None)  # the loaded models answer whatever the client asks for
        for key in IGNORED_SESSION_KEYS:
            session.pop(key, None)
        self._instructions(session)
        self._modalities(session)
        self._audio(session.pop("audio", None))
        self._beta(session)
        self._sampling(session)
        self._unsupported(session)
        if session:
            raise ConfigError(f"session.update: unknown key {sorted(session)[0]!r}; see docs/protocol.md for the "
                              "session fields this server takes")  # fmt: skip

    def apply(self) -> None:
        owner = self._owner
        if self.instructions is not None:
            owner.voice.chat.conversation.system = self.instructions or None
        owner.voice.chat.sampling = self.sampling
        owner.voice.reconfigure(self.options)
        if self.input_format is not None:
            owner.set_input_format(self.input_format)
        if self.output_format is not None:
            owner._output = self.output_format

    def _replace(self, **changes: Any) -> None:
        self.options = dataclasses.replace(self.options, **changes)

    def _instructions(self, session: dict[str, Any]) -> None:
        if "instructions" in session:
            self.instructions = _optional_string(session, "instructions", "session.update") or ""
            session.pop("instructions")

    def _modalities(self, session: dict[str, Any]) -> None:
        for key in ("output_modalities", "modalities"):
            if key in session:
                self._replace(modalities=_modalities(session.pop(key), f"session.update {key}"))

    def _audio(self, audio: Any) -> None:
        if audio is None:
            return
        if not isinstance(audio, dict):
            raise ConfigError("session.update: 'audio' must be an object with 'input' and/or 'output'")
        for key in set(audio) - {"input", "output"}:
            raise ConfigError(f"session.update: unknown key audio.{key}; audio takes input and output")
        audio_input = audio.get("input") or {}
        audio_output = audio.get("output") or {}
        if not isinstance(audio_input, dict) or not isinstance(audio_output, dict):
            raise ConfigError("session.update: audio.input and audio.output must be objects")
        known_input = {"format", "transcription", "turn_detection", "noise_reduction"}
        for key in set(audio_input) - known_input:
            raise ConfigError(f"session.update: unknown key audio.input.{key}; it takes "
                              f"{', '.join(sorted(known_input))}")  # fmt: skip
        if "format" in audio_input:
            self.input_format = _audio_format(audio_input["format"], "audio.input.format")
        if "transcription" in audio_input:
            self._transcription(audio_input["transcription"], "audio.input.transcription")
        if "turn_detection" in audio_input:
            self._turn_detection(audio_input["turn_detection"], "audio.input.turn_detection")
        if audio_input.get("noise_reduction") is not None:
            raise ConfigError("session.update: audio.input.noise_reduction is not supported by this server; send "
                              "null (clean the audio before sending it)")  # fmt: skip
        for key in set(audio_output) - {"format", "voice", "speed"}:
            raise ConfigError(f"session.update: unknown key audio.output.{key}; it takes format, voice, speed")
        if "format" in audio_output:
            self.output_format = _audio_format(audio_output["format"], "audio.output.format")
        if "voice" in audio_output:
            self._replace(voice=self._owner._checked_voice(audio_output["voice"]))
        if "speed" in audio_output:
            self._speed(audio_output["speed"], "audio.output.speed")

    def _beta(self, session: dict[str, Any]) -> None:
        """The beta shape older clients send: flat audio settings."""
        beta_formats = {"pcm16": AudioFormat(), "g711_ulaw": AudioFormat("audio/pcmu", G711_RATE),
                        "g711_alaw": AudioFormat("audio/pcma", G711_RATE)}  # fmt: skip
        for key, target in (("input_audio_format", "input_format"), ("output_audio_format", "output_format")):
            if key in session:
                value = session.pop(key)
                if value not in beta_formats:
                    raise ConfigError(f"session.update: {key} {value!r} is not one of {', '.join(beta_formats)}")
                setattr(self, target, beta_formats[value])
        if "input_audio_transcription" in session:
            self._transcription(session.pop("input_audio_transcription"), "input_audio_transcription")
        if "turn_detection" in session:
            self._turn_detection(session.pop("turn_detection"), "turn_detection")
        if "voice" in session:
            self._replace(voice=self._owner._checked_voice(session.pop("voice")))
        if "speed" in session:
            self._speed(session.pop("speed"), "speed")
        if "input_audio_noise_reduction" in session and session.pop("input_audio_noise_reduction") is not None:
            raise ConfigError("session.update: input_audio_noise_reduction is not supported by this server; send null")
        if "language" in session:  # this server's older shape
            self._replace(language=self._language(session.pop("language"), "language"))

    def _sampling(self, session: dict[str, Any]) -> None:
        values: dict[str, Any] = {}
        extras = session.pop("sampling", None)
        if extras is not None:
            if not isinstance(extras, dict):
                raise ConfigError(f"session.update: 'sampling' must be an object with any of "
                                  f"{', '.join(SAMPLING_KEYS)}")  # fmt: skip
            for key in set(extras) - set(SAMPLING_KEYS):
                raise ConfigError(f"session.update: unknown key sampling.{key}; it takes {', '.join(SAMPLING_KEYS)}")
            values.update(extras)
        for key in SAMPLING_KEYS:  # the beta shape had temperature at the top (and this server's older clients)
            if key in session:
                values[key] = session.pop(key)
        for key in ("max_output_tokens", "max_response_output_tokens"):
            if key in session:
                tokens = _max_tokens(session.pop(key), f"session.update {key}")
                default = self._owner._config.llm.sampling.max_new_tokens
                values["max_new_tokens"] = tokens if tokens is not None else default
        if values:
            self.sampling = build(SamplingConfig, dataclasses.asdict(self.sampling) | values, "session.sampling")

    def _unsupported(self, session: dict[str, Any]) -> None:
        if session.pop("tools", None):
            raise ConfigError("session.update: 'tools' (function calling) is not supported by this server; send []")
        session.pop("tool_choice", None)
        if session.pop("prompt", None) is not None:
            raise ConfigError("session.update: 'prompt' (stored prompts) is not supported; send the text as "
                              "'instructions'")  # fmt: skip

    def _transcription(self, value: Any, where: str) -> None:
        if value is None:
            return  # transcripts are always made: the reply needs them
        if not isinstance(value, dict):
            raise ConfigError(f"session.update: {where} must be an object with model, language, prompt")
        for key in set(value) - {"model", "language", "prompt", "delay", "keywords", "languages"}:
            raise ConfigError(f"session.update: {where}.{key} is not supported; {where} takes model, language, prompt")
        # delay, keywords, languages: hints of OpenAI's own transcription models, accepted and ignored
        if "language" in value:
            self._replace(language=self._language(value["language"], f"{where}.language"))
        if "prompt" in value:
            prompt = _optional_string(value, "prompt", where) or None
            if prompt != self.options.transcription_prompt:  # the recogniser takes the server's prompt only
                raise ConfigError(f"session.update: {where}.prompt cannot be set per session here; set "
                                  "asr.initial_prompt in the server's configuration")  # fmt: skip

    def _language(self, language: Any, where: str) -> str | None:
        from assistant.asr.base import language_error
        from assistant.pipeline import normalize_language

        if language is not None and not isinstance(language, str):
            raise ConfigError(f"session.update: {where} must be a language code such as 'zh' or 'en', or null")
        code = normalize_language(language)
        if code and not self._owner._services.transcription.transcriber.supports_language(code):
            raise ConfigError(f"session.update: {where}: {language_error(code, self._owner._config.asr.model)}")
        return code

    def _turn_detection(self, value: Any, where: str) -> None:
        if value is None:
            self._replace(turn_detection=None)
            return
        if not isinstance(value, dict) or value.get("type", "semantic_vad") not in ("server_vad", "semantic_vad"):
            raise ConfigError(f"session.update: {where} must be null, {{type: server_vad, ...}} or "
                              "{type: semantic_vad, ...}")  # fmt: skip
        base = self.options.turn_detection or _default_detection(self._owner._config)
        known = {"type", "threshold", "silence_duration_ms", "prefix_padding_ms", "create_response",
                 "interrupt_response", "idle_timeout_ms", "eagerness"}  # fmt: skip
        for key in set(value) - known:
            raise ConfigError(f"session.update: unknown key {where}.{key}")
        changes: dict[str, Any] = {"type": value.get("type", base.type)}  # left out: as it is
        if value.get("eagerness") is not None:  # null: the default (auto)
            if changes["type"] != "semantic_vad" or value["eagerness"] not in EAGERNESS_SCALE:
                raise ConfigError(f"session.update: {where}.eagerness takes {', '.join(EAGERNESS_SCALE)}, with "
                                  "type semantic_vad")  # fmt: skip
            changes["eagerness"] = value["eagerness"]
        elif "eagerness" in value:
            changes["eagerness"] = "auto"
        if "threshold" in value:
            threshold = value["threshold"]
            if not isinstance(threshold, int | float) or isinstance(threshold, bool) or not 0 < threshold < 1:
                raise ConfigError(f"session.update: {where}.threshold must be a number between 0 and 1")
            changes["threshold"] = float(threshold)
        for key in ("silence_duration_ms", "prefix_padding_ms"):
            if key in value:
                number = value[key]
                if not isinstance(number, int) or isinstance(number, bool) or not 0 <= number <= 10_000:
                    raise ConfigError(f"session.update: {where}.{key} must be milliseconds between 0 and 10000")
                changes[key] = number
        for key in ("create_response", "interrupt_response"):
            if key in value:
                if not isinstance(value[key], bool):
                    raise ConfigError(f"session.update: {where}.{key} must be true or false")
                changes[key] = value[key]
        if value.get("idle_timeout_ms") is not None:
            raise ConfigError(f"session.update: {where}.idle_timeout_ms is not supported; send null")
        self._replace(turn_detection=dataclasses.replace(base, **changes))

    def _speed(self, value: Any, where: str) -> None:
        if not isinstance(value, int | float) or isinstance(value, bool) or not 0.25 <= value <= 4.0:
            raise ConfigError(f"session.update: {where} must be a number between 0.25 and 4.0")
        self._replace(speed=float(value))


def _default_detection(config: Any) -> TurnDetection:
    """The configured turn detection, for a session that turns it back on after ``null``."""
    detection = SessionOptions.from_config(config, modalities=("text",)).turn_detection
    return dataclasses.replace(detection or TurnDetection(), interrupt_response=True)


def _describe_detection(detection: TurnDetection | None) -> dict[str, Any] | None:
    """``turn_detection`` as the Realtime API reports it: semantic_vad with its eagerness, server_vad with its
    window (our semantic_vad also says the window it scales, which the API's has not)."""
    if detection is None:
        return None
    described: dict[str, Any] = {"type": detection.type, "threshold": detection.threshold,
                                 "silence_duration_ms": detection.silence_duration_ms,
                                 "prefix_padding_ms": detection.prefix_padding_ms,
                                 "create_response": detection.create_response,
                                 "interrupt_response": detection.interrupt_response}  # fmt: skip
    if detection.type == "semantic_vad":
        described["eagerness"] = detection.eagerness
    else:
        described["idle_timeout_ms"] = None
    return described


REFUSED_CLIENT_EVENTS = {
    "output_audio_buffer.clear": "WebRTC/SIP only in the Realtime API; over WebSocket stop playing and send "
    "conversation.item.truncate with what was played",
    "transcription_session.update": "transcription-only sessions are not supported; use /v1/audio/transcriptions "
    "or a realtime session",
}


def parse_event(text: str) -> dict[str, Any]:
    """A client message as an event: a JSON object with a string ``type`` (ConfigError otherwise)."""
    try:
        event = json.loads(text)
    except (ValueError, RecursionError):
        raise ConfigError('the message is not JSON; send events like {"type": "response.create"}') from None
    if not isinstance(event, dict) or not isinstance(event.get("type"), str):
        raise ConfigError("every event needs a string 'type'")
    return event


def _error_fields(exc: BaseException, event_id: str | None = None, code: str | None = None) -> dict[str, Any]:
    our_code = getattr(exc, "code", "error")
    client_side = our_code in ("config", "limit", "unauthorized", "conversation", "prompt-too-long",
                               "rate_limit_exceeded")  # fmt: skip
    kind = "invalid_request_error" if client_side else "server_error"
    return {"type": kind, "code": code or our_code, "message": public_message(exc),
            "param": getattr(exc, "param", None), "event_id": event_id}  # fmt: skip


def _string(event: dict[str, Any], key: str, where: str) -> str:
    value = event.get(key)
    if not isinstance(value, str) or not value:
        raise ConfigError(f"{where} needs '{key}': the id of a conversation item")
    return value


def _optional_string(values: dict[str, Any], key: str, where: str) -> str | None:
    value = values.get(key)
    if value is not None and not isinstance(value, str):
        raise ConfigError(f"{where}: '{key}' must be text")
    return value


def _modalities(value: Any, where: str) -> tuple[Any, ...]:
    if value in (["text"], ["audio"]):
        return tuple(value)
    if isinstance(value, list) and sorted(value) == ["audio", "text"]:  # the beta default: audio with its transcript
        return ("audio",)
    raise ConfigError(f'{where}: {value!r} is not valid; use ["text"] or ["audio"] (audio carries its transcript)')


def _max_tokens(value: Any, where: str) -> int | None:
    if value is None or value == "inf":
        return None
    if not isinstance(value, int) or isinstance(value, bool) or value < 1:
        raise ConfigError(f'{where}: max_output_tokens must be an integer >= 1 or "inf"')
    return value


def _audio_format(value: Any, where: str) -> AudioFormat:
    if not isinstance(value, dict):
        raise ConfigError(f'session.update: {where} must be an object like {{"type": "audio/pcm", "rate": 24000}}')
    kind = value.get("type", "audio/pcm")
    if kind in ("audio/pcmu", "audio/pcma"):
        return AudioFormat(kind, G711_RATE)
    if kind != "audio/pcm":
        raise ConfigError(f"session.update: {where}.type {kind!r} is not supported; use audio/pcm, audio/pcmu or "
                          "audio/pcma")  # fmt: skip
    rate = value.get("rate", DEFAULT_PCM_RATE)
    if not isinstance(rate, int) or isinstance(rate, bool) or not 8000 <= rate <= 48000:
        raise ConfigError(f"session.update: {where}.rate must be a sample rate in Hz between 8000 and 48000")
    return AudioFormat("audio/pcm", rate)


def _item_message(item: Any) -> Message:
    if not isinstance(item, dict):
        raise ConfigError("conversation.item.create needs item {type: message, role: user, content: [...]}")
    kind = item.get("type", "message")
    if kind != "message":
        raise ConfigError(f"conversation.item.create: items of type {kind!r} (function calls) are not supported; "
                          "send messages")  # fmt: skip
    role = item.get("role", "user")
    if role not in ("user", "assistant", "system"):
        raise ConfigError(f"conversation.item.create: role {role!r} is not one of user, assistant, system")
    content = item.get("content")
    if isinstance(content, str):
        text = content
    elif isinstance(content, list):
        parts = []
        for part in content:
            if not isinstance(part, dict):
                continue
            if part.get("type") in ("input_audio", "input_image"):
                raise ConfigError(f"conversation.item.create: {part.get('type')} content is not supported; send audio "
                                  "with input_audio_buffer.append and text as input_text")  # fmt: skip
            parts.append(str(part.get("text") or part.get("transcript") or ""))
        text = "".join(parts)
    else:
        text = ""
    return Message(role, text)
