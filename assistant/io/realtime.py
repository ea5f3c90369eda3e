"""The WebSocket session (``/v1/realtime``): events named after the OpenAI Realtime API; see docs/protocol.md.

One conversation per connection. Audio comes in as PCM16 mono 16 kHz (base64 in ``input_audio_buffer.append`` or
binary frames); with server VAD (the default) the session cuts turns itself, otherwise the client commits. Typed turns
are ``conversation.item.create`` + ``response.create``. While a reply streams, the receive loop keeps reading: a
``response.cancel`` or speech (barge-in) stops it within a token. Every bad message gets an ``error`` event and the
session goes on; nothing one session does reaches another.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import contextlib
import dataclasses
import hashlib
import json
import re
import threading
import time
import uuid
from pathlib import Path
from typing import Any

import numpy as np

from assistant.config import VadConfig, build
from assistant.conversation import Conversation
from assistant.endpointing import Endpointer
from assistant.errors import AsrError, AssistantError, AuthError, ConfigError, LimitError, OutputError
from assistant.llm.base import generation_failed
from assistant.messages import SAMPLE_RATE, Audio, SpeechStarted, Utterance

CLOSE_POLICY = 1008  # WebSocket close code: policy violation (bad origin, no key)
CLOSE_TRY_LATER = 1013
CLOSE_GOING_AWAY = 1001
CLOSE_INTERNAL_ERROR = 1011
CONVERSATION_ID = re.compile(r"[A-Za-z0-9_-]{1,64}")  # a file name under server.conversation_dir, nothing more


class RealtimeSession:
    def __init__(self, services: Any, websocket: Any) -> None:
        from assistant.io.server import new_session

        self._services = services
        self._config = services.config
        self._ws = websocket
        self._chat = new_session(services)
        self._language = self._config.asr.language
        self._server_vad = True
        self._endpointer: Endpointer | None = None
        self._buffer: list[np.ndarray] = []  # audio since the last turn (manual commit mode)
        self._response: asyncio.Task[None] | None = None
        self._cancel = threading.Event()
        self._pending_text: str | None = None
        self._send_lock = asyncio.Lock()
        self._saved_as: Path | None = None  # server.conversation_dir/<id>.json

    # --- connection --------------------------------------------------------------------------------------------------

    async def run(self) -> None:
        if not self._origin_allowed():
            await self._ws.close(code=CLOSE_POLICY, reason="origin not allowed")
            return
        await self._ws.accept()
        key = await self._authorized()
        if key is None:
            return
        try:
            self._services.open_session(key)
        except LimitError as exc:
            await self._error(exc)
            await self._ws.close(code=CLOSE_TRY_LATER)
            return
        try:
            self._saved_as = self._resume(self._ws.query_params.get("conversation"), key)
        except AssistantError as exc:
            self._services.close_session(key)
            await self._error(exc)
            await self._ws.close(code=CLOSE_POLICY)
            return
        try:
            await self._send({"type": "session.created", "session": self._describe()})
            await self._receive_loop()
        except Exception as exc:  # a fault of ours ends this session with a reason, never the server
            await self._error(AssistantError(f"the session failed: {type(exc).__name__}: {str(exc)[:300]}"))
            with contextlib.suppress(RuntimeError, ConnectionError):  # the client may be gone already
                await self._ws.close(code=CLOSE_INTERNAL_ERROR)
        finally:
            self._cancel.set()
            if self._response is not None:
                await asyncio.gather(self._response, return_exceptions=True)
            if self._saved_as is not None:
                self._services.release_conversation(self._saved_as)
            self._services.close_session(key)

    def _resume(self, requested: str | None, key: str) -> Path | None:
        """With ``server.conversation_dir``: the file this session's conversation is saved to after every turn,
        ``?conversation=ID`` resuming a saved one (a new id when none is given). None without a directory. With API
        keys, each key's conversations live in a folder of their own: one client cannot open another's."""
        folder = self._config.server.conversation_dir
        if folder is None:
            if requested is not None:
                raise ConfigError("?conversation=: this server keeps no conversations (server.conversation_dir)")
            return None
        if requested is not None and not CONVERSATION_ID.fullmatch(requested):
            raise ConfigError("?conversation= takes the id from session.created: 1-64 letters, digits, '-' or '_'")
        conversation_id = requested or uuid.uuid4().hex
        folder_of_key = hashlib.sha256(key.encode()).hexdigest()[:16] if key else ""
        path = Path(folder).expanduser() / folder_of_key / f"{conversation_id}.json"
        self._services.claim_conversation(path)
        if path.is_file():
            try:
                self._chat.resume(Conversation.load(path))
            except AssistantError:
                self._services.release_conversation(path)
                raise
        return path

    async def _save(self) -> None:
        """Write the conversation after a turn; a failure (disk full, read-only) is this turn's error only."""
        if self._saved_as is None:
            return
        try:
            await asyncio.to_thread(self._chat.conversation.save, self._saved_as)
        except AssistantError as exc:
            await self._error(OutputError(f"the reply was not saved: {exc.message}"))

    def _origin_allowed(self) -> bool:
        origin = self._ws.headers.get("origin")
        if origin is None:  # not a browser
            return True
        host = self._ws.headers.get("host", "")
        allowed = {f"http://{host}", f"https://{host}", *self._config.server.allowed_origins}
        return origin in allowed

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
            await self._ws.close(code=CLOSE_POLICY)
        return key

    async def _receive_loop(self) -> None:
        from starlette.websockets import WebSocketDisconnect

        limit = self._config.server.max_message_kb * 1024
        idle_s = self._config.server.idle_timeout_s
        while True:
            try:
                message = await asyncio.wait_for(self._ws.receive(), timeout=idle_s)
            except TimeoutError:
                if self._response is not None and not self._response.done():
                    continue  # a long reply is still streaming to a client that has nothing to say
                await self._error(LimitError(f"no message for {idle_s:g} s (server.idle_timeout_s); session closed"))
                await self._ws.close(code=CLOSE_GOING_AWAY)
                return
            except WebSocketDisconnect:
                return
            if message["type"] == "websocket.disconnect":
                return
            data, text = message.get("bytes"), message.get("text")
            size = len(data) if data is not None else len((text or "").encode())
            try:
                if size > limit:
                    raise LimitError(f"message of {size} bytes is over server.max_message_kb ({limit // 1024} KB)")
                if data is not None:
                    await self._audio(_pcm16(data))
                else:
                    await self._event(text or "")
            except AssistantError as exc:
                await self._error(exc)

    # --- events ------------------------------------------------------------------------------------------------------

    async def _event(self, text: str) -> None:
        event = parse_event(text)
        kind = event["type"]
        if kind == "input_audio_buffer.append":
            audio = event.get("audio")
            if not isinstance(audio, str):
                raise ConfigError("input_audio_buffer.append needs 'audio': base64 PCM16 mono 16 kHz")
            try:
                raw = base64.b64decode(audio, validate=True)
            except (binascii.Error, ValueError):
                raise ConfigError("input_audio_buffer.append: 'audio' is not valid base64") from None
            await self._audio(_pcm16(raw))
        elif kind == "input_audio_buffer.commit":
            await self._commit()
        elif kind == "input_audio_buffer.clear":
            self._buffer, self._endpointer = [], None
        elif kind == "conversation.item.create":
            self._pending_text = _item_text(event.get("item"))
        elif kind == "response.create":
            if self._pending_text is None:
                raise ConfigError("response.create: add a user message first (conversation.item.create or audio)")
            text, self._pending_text = self._pending_text, None
            await self._respond(text, time.monotonic())
        elif kind == "response.cancel":
            self._cancel.set()
        elif kind == "session.update":
            await self._update(event.get("session"))
        else:
            raise ConfigError(
                f"unknown event type {kind!r}; the session understands session.update, input_audio_buffer.append, "
                "input_audio_buffer.commit, input_audio_buffer.clear, conversation.item.create, response.create, "
                "response.cancel"
            )

    async def _update(self, session: Any) -> None:
        if not isinstance(session, dict):
            raise ConfigError("session.update needs a 'session' object")
        if "instructions" in session:
            self._chat.conversation.system = str(session["instructions"]) or None
        if "language" in session:
            self._language = self._checked_language(session["language"])
        if "turn_detection" in session:
            self._server_vad = session["turn_detection"] is not None
        sampling = {k: session[k] for k in ("temperature", "top_p", "top_k", "repetition_penalty", "seed")
                    if k in session}  # fmt: skip
        if "max_response_output_tokens" in session:
            sampling["max_new_tokens"] = session["max_response_output_tokens"]
        if sampling:
            values = dataclasses.asdict(self._chat.sampling) | sampling
            self._chat.sampling = build(type(self._chat.sampling), values, "session")
        await self._send({"type": "session.updated", "session": self._describe()})

    def _checked_language(self, language: Any) -> str | None:
        from assistant.asr.base import language_error
        from assistant.pipeline import normalize_language

        if language is not None and not isinstance(language, str):
            raise ConfigError("session.update: 'language' must be a language code such as 'zh' or 'en', or null")
        code = normalize_language(language)
        if code and not self._services.transcription.transcriber.supports_language(code):
            raise ConfigError(f"session.update: {language_error(code, self._config.asr.model)}")
        return code

    def _describe(self) -> dict[str, Any]:
        return {
            "conversation_id": self._saved_as.stem if self._saved_as is not None else None,
            "history_messages": len(self._chat.conversation.messages()),
            "model": self._config.llm.model, "transcription_model": self._config.asr.model,
            "instructions": self._chat.conversation.system, "language": self._language,
            "turn_detection": {"type": "server_vad"} if self._server_vad else None,
            "temperature": self._chat.sampling.temperature,
            "max_response_output_tokens": self._chat.sampling.max_new_tokens,
            "input_audio_format": "pcm16", "sample_rate": SAMPLE_RATE,
        }  # fmt: skip

    # --- audio and turns ---------------------------------------------------------------------------------------------

    async def _audio(self, samples: np.ndarray) -> None:
        if not self._server_vad:
            self._buffer.append(samples)
            if sum(len(b) for b in self._buffer) > self._config.server.max_turn_audio_s * SAMPLE_RATE:
                self._buffer = []
                raise LimitError(f"the turn is over server.max_turn_audio_s ({self._config.server.max_turn_audio_s} s)")
            return
        # the VAD model runs in a thread: on the event loop, every session's frames would delay all other sessions'
        # events and their keepalive pongs
        endpointer = self._endpointer or await asyncio.to_thread(self._new_endpointer)
        for event in await asyncio.to_thread(lambda: list(endpointer.push(samples))):
            await self._segmented(event)

    def _new_endpointer(self) -> Endpointer:
        from assistant import registry

        vad_config: VadConfig = self._config.vad
        detector = registry.create("vad", vad_config.backend, vad_config)
        max_s = min(self._config.input.max_utterance_s, self._config.server.max_turn_audio_s)
        self._endpointer = Endpointer(detector.frame_probability(), vad_config, max_utterance_s=max_s)
        return self._endpointer

    async def _segmented(self, event: SpeechStarted | Utterance) -> None:
        if isinstance(event, SpeechStarted):
            if self._response is not None and not self._response.done():
                self._cancel.set()  # barge-in
            await self._send({"type": "input_audio_buffer.speech_started", "audio_start_ms": int(event.at_s * 1000)})
            return
        await self._send({"type": "input_audio_buffer.speech_stopped",
                          "audio_end_ms": int(event.audio.end_s * 1000)})  # fmt: skip
        await self._turn(event.audio, event.speech_end_clock)

    async def _commit(self) -> None:
        if self._server_vad and self._endpointer is not None:
            for event in list(self._endpointer.flush()):
                await self._segmented(event)
            return
        if not self._buffer:
            raise ConfigError("input_audio_buffer.commit: the buffer is empty; append audio first")
        samples, self._buffer = np.concatenate(self._buffer), []
        await self._send({"type": "input_audio_buffer.committed"})
        await self._turn(Audio(samples), time.monotonic())

    async def _turn(self, audio: Audio, speech_end: float) -> None:
        services = self._services
        language = self._language
        transcriber = services.transcription.transcriber

        def transcribe_many(audios: list[Audio]) -> list[str]:
            results = transcriber.transcribe_many(audios, language=language, timestamps=False)
            return [result.text.strip() for result in results]

        # utterances of several sessions waiting together are transcribed in one batch (whisper-hf batches them)
        try:
            text = await services.worker.batch(("asr", language), audio, transcribe_many, limit=transcriber.batch_size)
        except AssistantError:
            raise
        except Exception as exc:  # the recogniser failed on this turn only: say so, keep the session
            raise AsrError(f"transcription failed: {type(exc).__name__}: {exc}") from None
        if not text:
            return  # noise: no turn
        await self._send({"type": "conversation.item.input_audio_transcription.completed", "transcript": text,
                          "audio_s": round(audio.duration_s, 3),
                          "latency_ms": round((time.monotonic() - speech_end) * 1000)})  # fmt: skip
        await self._respond(text, speech_end)

    async def _respond(self, text: str, started: float) -> None:
        if self._response is not None and not self._response.done():
            self._cancel.set()
            await asyncio.gather(self._response, return_exceptions=True)
        self._cancel = threading.Event()
        self._response = asyncio.create_task(self._stream_reply(text, started, self._cancel))

    async def _stream_reply(self, text: str, started: float, cancel: threading.Event) -> None:
        response_id = f"resp_{int(started * 1000)}"
        await self._send({"type": "response.created", "response": {"id": response_id}})
        holder: dict[str, Any] = {}
        chat = self._chat

        def deltas() -> Any:
            reply = chat.send(text, cancel=cancel)
            holder["reply"] = reply
            yield from reply

        first = 0.0
        try:
            async for delta in self._services.worker.stream(deltas, cancel):
                first = first or time.monotonic()
                await self._send({"type": "response.text.delta", "response_id": response_id, "delta": delta})
        except Exception as exc:  # this turn fails; the session and its history go on
            await self._error(generation_failed(exc))
            return
        reply = holder.get("reply")
        stats = reply.stats if reply is not None else None
        status = "cancelled" if stats is None or stats.finish_reason == "cancelled" else "completed"
        metrics = {"first_char_ms": round(((first or time.monotonic()) - started) * 1000),
                   "tokens": stats.completion_tokens if stats else 0,
                   "tokens_per_s": round(stats.decode_tokens_per_s, 1) if stats else 0.0}  # fmt: skip
        await self._save()
        await self._send({"type": "response.text.done", "response_id": response_id,
                          "text": reply.text if reply is not None else ""})  # fmt: skip
        await self._send({"type": "response.done",
                          "response": {"id": response_id, "status": status, "metrics": metrics}})  # fmt: skip

    # --- sending -----------------------------------------------------------------------------------------------------

    async def _send(self, event: dict[str, Any]) -> None:
        async with self._send_lock:
            try:
                await asyncio.wait_for(self._ws.send_text(json.dumps(event, ensure_ascii=False)), timeout=30)
            except (TimeoutError, RuntimeError, ConnectionError):
                self._cancel.set()  # the client stopped reading or left: stop working for it

    async def _error(self, exc: AssistantError) -> None:
        await self._send({"type": "error", "error": {"code": exc.code, "message": exc.message}})


def parse_event(text: str) -> dict[str, Any]:
    """A client message as an event: a JSON object with a string ``type`` (ConfigError otherwise)."""
    try:
        event = json.loads(text)
    except (ValueError, RecursionError):
        raise ConfigError('the message is not JSON; send events like {"type": "response.create"}') from None
    if not isinstance(event, dict) or not isinstance(event.get("type"), str):
        raise ConfigError("every event needs a string 'type'")
    return event


def _pcm16(data: bytes) -> np.ndarray:
    if len(data) % 2:
        raise ConfigError("audio must be PCM16 (2 bytes per sample); got an odd number of bytes")
    return np.frombuffer(data, dtype="<i2").astype(np.float32) / 32768.0


def _item_text(item: Any) -> str:
    if not isinstance(item, dict) or item.get("role", "user") != "user":
        raise ConfigError("conversation.item.create needs item {type: message, role: user, content: [...]}")
    content = item.get("content")
    if isinstance(content, str):
        text = content
    elif isinstance(content, list):
        text = "".join(str(p.get("text", "")) for p in content if isinstance(p, dict))
    else:
        text = ""
    if not text.strip():
        raise ConfigError("conversation.item.create: the message has no text (content: [{type: input_text, text}])")
    return text
