"""``assistant serve``: one FastAPI app on uvicorn. OpenAI-compatible HTTP, a WebSocket voice/text session, a page.

Models are loaded once and shared; all model work goes through one ModelWorker (bounded queue: overload is a clear
``busy`` error, HTTP 503); speech synthesis has a worker of its own, so a reply being generated and a text being
spoken never wait for each other. Security: 127.0.0.1 by default; any other address needs an API key (Bearer header for
HTTP; header, ``?api_key=`` or the first message for WebSockets); request bodies, WebSocket messages, audio per turn
and open sessions are limited; browsers must come from an allowed Origin; no endpoint opens a path a client sends.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import hashlib
import hmac
import json
import math
import os
import sys
import threading
import time
import uuid
from collections.abc import AsyncIterator, Callable, Iterator
from pathlib import Path
from typing import Any

from fastapi import FastAPI, Request, WebSocket
from fastapi.responses import FileResponse, JSONResponse, PlainTextResponse, Response, StreamingResponse
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.requests import ClientDisconnect

from assistant import registry
from assistant.asr.cues import CueOptions
from assistant.chat import ChatSession
from assistant.config import Config
from assistant.conversation import Conversation, load_persona
from assistant.errors import (
    AssistantError,
    AudioDecodeError,
    AuthError,
    BusyError,
    ConfigError,
    ConflictError,
    InvalidRequestError,
    LimitError,
    NotFoundError,
    PromptTooLongError,
    RateLimitError,
    ShutdownError,
    UnsupportedMediaTypeError,
    public_message,
)
from assistant.files import ExclusiveLock
from assistant.io.access import AccessGuard, AccessPolicy, is_loopback, openai_type
from assistant.io.chat_request import ChatRequest, chat_request
from assistant.io.conversations import ConversationStore, describe, items
from assistant.io.metrics import ServerMetrics
from assistant.io.rate_limit import RateLimits
from assistant.io.shutdown import SHUTDOWN_MESSAGE, GracefulServer, Shutdown
from assistant.io.uploads import (
    TranscriptionJobs,
    answer,
    declared_seconds,
    read_upload,
    rendered,
    transcribe_upload,
    until_disconnected,
)
from assistant.llm.base import ChatModel, generation_failed
from assistant.messages import ReplyStats, ToolCall, Transcript
from assistant.pipeline import FileResult, TranscriptionPipeline
from assistant.session import Services as SessionServices
from assistant.tts.base import Speech, check_speed
from assistant.tts.encode import FORMATS, encode
from assistant.worker import ModelWorker

SPEECH_FORMATS = tuple(FORMATS)  # POST /v1/audio/speech response_format: mp3 (default), opus, aac, flac, wav, pcm
MAX_SPEECH_CHARS = 4096  # POST /v1/audio/speech input, OpenAI's limit
_STATUS = {"config": 400, "prompt-too-long": 400, "audio-decode": 400, "limit": 413, "busy": 503,
           "unauthorized": 401, "template": 400, "conversation": 400, "rate_limit_exceeded": 429,
           "shutting-down": 503, "unsupported-media-type": 415, "not-found": 404, "conflict": 409,
           "model_not_found": 404}  # fmt: skip
WEB_DIR = Path(__file__).with_name("web")
CLOSING_WAIT_S = 10.0  # how long a claim waits for an ending session's last save (Services.claim_conversation_soon)
REPLICA_WAIT_S = 1.0  # ... and for a conversation another process holds


@dataclasses.dataclass
class Services:
    """What the app shares between all requests: the configuration, the models, the model worker and the speech
    worker, and the counts behind the session and request limits."""

    config: Config
    chat_model: ChatModel
    transcription: TranscriptionPipeline
    worker: ModelWorker
    api_keys: tuple[str, ...]
    speech: Speech  # voice out; its synthesizers are loaded on first use
    speech_worker: ModelWorker  # synthesis, apart from the model worker: neither waits behind the other
    sessions: int = 0
    sessions_by_key: dict[str, int] = dataclasses.field(default_factory=dict)
    requests: int = 0
    open_conversations: dict[Path, ExclusiveLock | None] = dataclasses.field(default_factory=dict)  # with its lock
    closing_conversations: set[Path] = dataclasses.field(default_factory=set)  # their sessions are ending
    lock: threading.Lock = dataclasses.field(default_factory=threading.Lock)
    # uploads are transcribed one at a time (decoding and the VAD run beside the worker; their memory is a block's)
    bulk: asyncio.Semaphore = dataclasses.field(default_factory=lambda: asyncio.Semaphore(1))
    shutdown: Shutdown = dataclasses.field(default_factory=Shutdown)
    jobs: TranscriptionJobs = dataclasses.field(default_factory=TranscriptionJobs)
    metrics: ServerMetrics = dataclasses.field(init=False)
    rate_limits: RateLimits = dataclasses.field(init=False)

    def __post_init__(self) -> None:
        self.metrics = ServerMetrics(open_sessions=lambda: self.sessions, queue_depth=lambda: self.worker.pending)
        self.worker.on_wait = self.metrics.queue_wait.observe
        limits = self.config.server
        self.rate_limits = RateLimits.from_settings(limits.rate_limit_requests_per_minute,
                                                    limits.rate_limit_audio_minutes_per_hour,
                                                    exposed=not is_loopback(limits.host))  # fmt: skip

    async def stop(self, timeout_s: float) -> None:
        """The first SIGTERM/SIGINT: refuse queued and new model work, cancel generations, let sessions say goodbye
        (their cut replies saved), all within ``timeout_s``."""
        error = ShutdownError(SHUTDOWN_MESSAGE)
        self.worker.stop(error)
        self.speech_worker.stop(error)
        await self.shutdown.begin(timeout_s)

    def transcribe_file(self, path: Path, abandoned: threading.Event, **options: Any) -> FileResult:
        """Transcribe an upload off the event loop, each unit (a batch of windows) on the worker's bulk queue:
        voice turns and chat completions go between the units; a server stop, or ``abandoned`` (the client left),
        ends it before the next unit."""

        def run_model(call: Callable[[], list[Transcript]]) -> list[Transcript]:
            self.shutdown.check()
            if abandoned.is_set():
                raise ClientDisconnect()
            return self.worker.submit(call, bulk=True).result()

        return self.transcription.transcribe_file(path, run_model=run_model, **options)

    @classmethod
    def load(cls, config: Config) -> Services:
        check_exposure(config)
        persona_dir = config.server.persona_dir
        if persona_dir is not None and not Path(persona_dir).expanduser().is_dir():
            raise ConfigError(f"server.persona_dir: {persona_dir!r} is not a directory (relative paths start from "
                              f"{Path.cwd()}); give the folder of persona YAML files")  # fmt: skip
        chat_model = registry.create("llm", config.llm.backend, config.llm)
        transcription = TranscriptionPipeline.from_config(config)
        pending = config.server.max_pending
        return cls(config, chat_model, transcription, ModelWorker(pending), api_keys_of(config),
                   Speech.from_config(config.tts),
                   # each spoken reply keeps up to two sentences queued for synthesis (session.SYNTHESIS_AHEAD)
                   ModelWorker(max(pending, 2 * config.server.max_sessions), name="speech-worker"))  # fmt: skip

    def key_of(self, offered: str) -> str | None:
        """The configured key ``offered`` matches (compared in constant time); "" when the server has no keys."""
        if not self.api_keys:
            return ""
        matches = [key for key in self.api_keys if hmac.compare_digest(offered.encode(), key.encode())]
        return matches[0] if matches else None

    def open_session(self, key: str) -> None:
        """Count a new WebSocket session for ``key``, or refuse it when the server or that key is at its limit."""
        limits = self.config.server
        with self.lock:
            if self.sessions >= limits.max_sessions:
                raise LimitError(
                    f"the server holds its maximum of {limits.max_sessions} sessions (server.max_sessions)"
                )
            if key and self.sessions_by_key.get(key, 0) >= limits.max_sessions_per_key:
                raise LimitError(
                    f"this API key holds its maximum of {limits.max_sessions_per_key} sessions "
                    "(server.max_sessions_per_key); close one first"
                )
            self.sessions += 1
            self.sessions_by_key[key] = self.sessions_by_key.get(key, 0) + 1

    def close_session(self, key: str) -> None:
        with self.lock:
            self.sessions -= 1
            self.sessions_by_key[key] -= 1
            if not self.sessions_by_key[key]:
                del self.sessions_by_key[key]

    def claim_conversation(self, path: Path) -> None:
        """One session at a time per saved conversation, across processes: two writers would each drop the other's
        turns. Replicas sharing ``server.conversation_dir`` hold an OS file lock (``<id>.json.lock``, flock) for
        the session's life; the OS frees it if the process dies. A directory where no lock file can be made
        (read-only, full) leaves the claim to this process: saves then fail with their own error."""
        busy = ConflictError(f"conversation '{path.stem}' is open in another session; close that one first")
        with self.lock:
            if path in self.open_conversations:
                raise busy
            held: ExclusiveLock | None = ExclusiveLock(path.with_name(path.name + ".lock"))
            try:
                path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
                acquired = held.acquire()
            except OSError:
                held, acquired = None, True
            if not acquired:
                raise busy
            self.open_conversations[path] = held

    async def claim_conversation_soon(self, path: Path) -> None:
        """``claim_conversation``, waiting for a session that may be ending: a client that closes its WebSocket and
        at once renames, deletes or reopens the conversation is not refused for the server's own clean-up (the
        ending session's last save). A session of this process that is ending is waited for up to
        ``CLOSING_WAIT_S``; a lock held by another process (a replica) up to ``REPLICA_WAIT_S``, since whether
        that session is ending cannot be seen from here. A session still open is refused at once."""
        started = time.monotonic()
        while True:
            try:
                self.claim_conversation(path)
                return
            except ConflictError:
                waited = time.monotonic() - started
                ending_here = path in self.closing_conversations and waited < CLOSING_WAIT_S
                elsewhere = path not in self.open_conversations and waited < REPLICA_WAIT_S
                if not (ending_here or elsewhere):
                    raise
            await asyncio.sleep(0.02)

    @contextlib.asynccontextmanager
    async def conversation_free(self, path: Path) -> AsyncIterator[None]:
        """Hold ``path`` for a change made outside any session (rename, delete): ConflictError (409) while a session,
        here or on another replica, has it open."""
        await self.claim_conversation_soon(path)
        try:
            yield
        finally:
            self.release_conversation(path)

    def conversation_closing(self, path: Path) -> None:
        """The session holding ``path`` is ending: claims wait for it (``claim_conversation_soon``)."""
        with self.lock:
            if path in self.open_conversations:
                self.closing_conversations.add(path)

    def release_conversation(self, path: Path) -> None:
        with self.lock:
            held = self.open_conversations.pop(path, None)
            self.closing_conversations.discard(path)
        if held is not None:
            held.release()

    def session_services(self) -> SessionServices:
        """What a voice session uses: the recogniser, the workers, the voice, a new VAD per stream."""
        vad = self.config.vad

        def probability() -> Any:
            return registry.create("vad", vad.backend, vad).frame_probability()

        turn = self.config.turn
        return SessionServices(self.transcription.transcriber, self.worker, self.speech, self.speech_worker,
                               probability, self.config.asr.zh_script,
                               registry.create("turn", turn.detector, turn))  # fmt: skip


def api_keys_of(config: Config) -> tuple[str, ...]:
    """The keys clients may present: ``server.api_key`` (else the ASSISTANT_API_KEY environment variable) and
    ``server.api_keys``."""
    first = config.server.api_key or os.environ.get("ASSISTANT_API_KEY") or None
    return tuple(dict.fromkeys(key for key in (first, *config.server.api_keys) if key))


MIN_KEY_CHARS = 16  # an API key guessable in a few tries is no key


def check_exposure(config: Config) -> None:
    """Binding beyond loopback without an API key would hand the models to the whole network; a short key barely
    less so."""
    if is_loopback(config.server.host):
        return
    keys = api_keys_of(config)
    if not keys:
        raise ConfigError(
            f"server.host {config.server.host!r} is reachable from other machines: set server.api_key (or "
            "ASSISTANT_API_KEY) so that only your clients can use it, or bind 127.0.0.1"
        )
    if any(len(key) < MIN_KEY_CHARS for key in keys):
        raise ConfigError(
            f"server.host {config.server.host!r} is reachable from other machines and an API key is shorter than "
            f'{MIN_KEY_CHARS} characters; use long random keys, e.g. python -c "import secrets; '
            'print(secrets.token_urlsafe(24))"'
        )


def status_of(exc: AssistantError, default: int = 500) -> int:
    """The HTTP status of an error: by its code; any other refused request field is a 400."""
    return _STATUS.get(exc.code) or (400 if isinstance(exc, ConfigError) else default)


def error_body(exc: AssistantError, status: int | None = None) -> dict[str, Any]:
    """OpenAI's error shape (message, type, param, code) with OpenAI's codes where OpenAI has one (a prompt over
    the window is ``context_length_exceeded`` on ``messages``, with OpenAI's wording) and our stable code elsewhere;
    no absolute server paths, no console hints."""
    message, code, param = public_message(exc), exc.code, exc.param
    if isinstance(exc, PromptTooLongError):
        code, param = "context_length_exceeded", param or "messages"
        if exc.prompt_tokens is not None:
            message = (
                f"This model's maximum context length is {exc.context_tokens} tokens. However, your messages "
                f"resulted in {exc.prompt_tokens} tokens, leaving no room for the reply. Please reduce the length of "
                "the messages."
            )
    kind = openai_type(status if status is not None else status_of(exc))
    return {"error": {"message": message, "type": kind, "param": param, "code": code}}


@dataclasses.dataclass(frozen=True)
class SpeechRequest:
    """A validated ``POST /v1/audio/speech`` body."""

    text: str
    voice: str | None  # None = tts.voice
    speed: float | None  # None = tts.speed
    response_format: str


SPEECH_FIELDS = ("input", "model", "voice", "instructions", "response_format", "speed", "stream_format")


def speech_from_request(body: dict[str, Any], speech: Speech) -> SpeechRequest:
    """OpenAI's speech request checked field by field before any work starts; InvalidRequestError names the field
    (a field OpenAI does not define included)."""
    for name in body:
        if name not in SPEECH_FIELDS:
            raise InvalidRequestError(f"Unrecognized request argument supplied: {name}", param=name,
                                      code="unknown_parameter")  # fmt: skip
    text = body.get("input")
    if not isinstance(text, str) or not text.strip():
        raise InvalidRequestError("input: give the text to speak as a non-empty string", param="input")
    if len(text) > MAX_SPEECH_CHARS:
        raise InvalidRequestError(f"input: {len(text)} characters is over the limit of {MAX_SPEECH_CHARS}; send "
                                  "less text", param="input")  # fmt: skip
    model = body.get("model")
    if model is not None and not isinstance(model, str):
        raise InvalidRequestError(f"model: expected a model name ({speech.description} speaks whichever is named), "
                                  f"got {model!r}", param="model", code="invalid_type")  # fmt: skip
    if body.get("instructions"):
        raise InvalidRequestError("instructions: the speech engine here cannot be told how to speak; choose a voice "
                                  "and speed instead", param="instructions", code="unsupported_parameter")  # fmt: skip
    voice = body.get("voice")
    if isinstance(voice, dict):  # OpenAI's custom voices are sent as {"id": ...}
        voice = voice.get("id")
    response_format = body.get("response_format") or "mp3"
    if response_format not in SPEECH_FORMATS:
        raise InvalidRequestError(f"response_format: {response_format!r} is not valid; choose one of "
                                  f"{', '.join(FORMATS)}", param="response_format")  # fmt: skip
    stream_format = body.get("stream_format") or "audio"
    if stream_format != "audio":
        raise InvalidRequestError(f"stream_format: {stream_format!r} is not supported; use 'audio' (the whole file)",
                                  param="stream_format", code="unsupported_value")  # fmt: skip
    speed = body.get("speed")
    try:
        voice = None if voice is None else speech.check_voice(voice)
    except ConfigError as exc:
        raise InvalidRequestError(exc.message, param="voice") from None
    try:
        speed = None if speed is None else check_speed(speed)
    except ConfigError as exc:
        raise InvalidRequestError(exc.message, param="speed") from None
    return SpeechRequest(text=text, voice=voice, speed=speed, response_format=response_format)


def create_app(services: Services) -> FastAPI:
    config = services.config
    listing = config.server.docs  # the route listing only when asked for (and behind the key)
    app = FastAPI(title="assistant", version="0.1.0", docs_url="/docs" if listing else None, redoc_url=None,
                  openapi_url="/openapi.json" if listing else None)  # fmt: skip
    limit_bytes = int(config.server.max_upload_mb * 1024 * 1024)

    @app.exception_handler(AssistantError)
    async def assistant_error(request: Request, exc: AssistantError) -> JSONResponse:
        return error_response(services, exc, 500)

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        """Starlette's own refusals (unknown route 404, wrong method 405, a malformed multipart body 400) in our
        error shape, not its ``{"detail": ...}``."""
        code = {400: "bad-request", 404: "not-found", 405: "method-not-allowed"}.get(exc.status_code, "http-error")
        services.metrics.error(code)
        where = f"{request.method} {request.url.path}"
        message = {404: f"Invalid URL ({where})", 405: f"Invalid method for URL ({where})"}.get(
            exc.status_code, f"{where}: {exc.detail}"
        )  # OpenAI's words for an unknown route and a wrong method
        body = {"error": {"message": message, "type": "invalid_request_error", "param": None, "code": code}}
        return JSONResponse(body, status_code=exc.status_code, headers=exc.headers)

    @app.exception_handler(ClientDisconnect)
    async def client_left(request: Request, exc: ClientDisconnect) -> Response:
        """The client went away mid-request (killed, cable pulled): nobody to answer, nothing to log."""
        return Response(status_code=400)

    @app.exception_handler(Exception)
    async def unexpected_error(request: Request, exc: Exception) -> JSONResponse:
        """A failure we did not foresee still answers in our error shape; the server goes on."""
        failure = AssistantError(f"the request failed: {type(exc).__name__}: {str(exc)[:300]}")
        services.metrics.error("internal")
        return JSONResponse(error_body(failure, 500), status_code=500)

    @app.get("/metrics")
    async def metrics() -> Response:
        """Prometheus' text format: counters, latency histograms, open sessions and queue depth."""
        body, media_type = services.metrics.exposition()
        return Response(body, media_type=media_type)

    @app.get("/health")
    async def health(request: Request) -> dict[str, Any]:
        """Up or not, for anyone; the models and open sessions only for a caller with the API key."""
        if not services.api_keys or not services.key_of(bearer_token(request.headers.get("authorization"))):
            return {"status": "ok"}
        return {"status": "ok", "asr": config.asr.model, "llm": config.llm.model, "sessions": services.sessions}

    @app.get("/v1/models")
    async def models() -> dict[str, Any]:
        created = int(time.time())
        return {"object": "list", "data": [
            {"id": config.llm.model, "object": "model", "created": created, "owned_by": "assistant"},
            {"id": config.asr.model, "object": "model", "created": created, "owned_by": "assistant"},
        ]}  # fmt: skip

    @app.get("/v1/models/{model_id:path}")
    async def model(model_id: str) -> dict[str, Any]:
        """OpenAI's model retrieve (the SDK's ``client.models.retrieve``): one of the served models, else 404."""
        listed = {item["id"]: item for item in (await models())["data"]}
        if model_id not in listed:
            raise InvalidRequestError(f"The model `{model_id}` does not exist here; see GET /v1/models",
                                      param="model", code="model_not_found")  # fmt: skip
        return dict(listed[model_id])

    @app.post("/v1/audio/transcriptions")
    async def transcriptions(request: Request) -> Response:
        """OpenAI's transcription, every form field honoured or refused by name (assistant/io/uploads.py): the file
        is transcribed while the request waits (a client that leaves stops it), or streamed with stream=true."""
        async with read_upload(request, limit_bytes, config.server.max_upload_mb, keep=True) as upload:
            return await answer(services, request, upload, CueOptions.from_config(config.transcribe))

    @app.post("/v1/audio/translations")
    async def translations(request: Request) -> Response:
        """OpenAI's translation: the speech as English text (Whisper's translate task), on the same terms."""
        async with read_upload(request, limit_bytes, config.server.max_upload_mb, keep=True,
                               kind="translation") as upload:  # fmt: skip
            return await answer(services, request, upload, CueOptions.from_config(config.transcribe))

    @app.post("/v1/transcription_jobs")
    async def start_job(request: Request) -> JSONResponse:
        """This server's addition: the same form as /v1/audio/transcriptions, transcribed in the background; the
        job says how far it is and keeps its result in every format for a while (the page's file queue)."""
        async with read_upload(request, limit_bytes, config.server.max_upload_mb, keep=True, kind="job") as upload:
            services.transcription.check_language(upload.language)  # refused now, as the synchronous route does
            declared: float | None = None  # unknown: an unreadable file, whose job fails saying why
            with contextlib.suppress(AudioDecodeError):
                declared = await declared_seconds(upload)
            job = services.jobs.start(request.state.client, upload, declared or 0.0,
                                      lambda job: transcribe_upload(services, job.client, upload, job.abandoned,
                                                                    on_progress=job.progress,
                                                                    declared=declared))  # fmt: skip
        return JSONResponse(job.describe(), status_code=202)

    @app.get("/v1/transcription_jobs/{job_id}")
    async def get_job(job_id: str, request: Request) -> dict[str, Any]:
        return services.jobs.get(request.state.client, job_id).describe()

    @app.get("/v1/transcription_jobs/{job_id}/result")
    async def job_result(job_id: str, request: Request, format: str = "json") -> Response:
        """The finished job's transcript as ``format``: text, json, verbose_json, srt, vtt (409 until done)."""
        job = services.jobs.get(request.state.client, job_id)
        transcript = job.transcript()
        response = rendered(transcript, format, job.granularities, CueOptions.from_config(config.transcribe))
        suffix = {"text": "txt", "verbose_json": "json"}.get(format, format)
        response.headers["content-disposition"] = f'attachment; filename="{job.download_name}.{suffix}"'
        return response

    @app.delete("/v1/transcription_jobs/{job_id}")
    async def cancel_job(job_id: str, request: Request) -> dict[str, Any]:
        """Stop the job (before its next unit) and forget it."""
        services.jobs.cancel(request.state.client, job_id)
        return {"id": job_id, "object": "transcription.job.deleted", "deleted": True}

    @app.post("/v1/chat/completions")
    async def completions(request: Request) -> Any:
        """OpenAI's chat completions: every field honoured or refused by name (assistant/io/chat_request.py); the
        reply streams as OpenAI streams it, tool calls included. Errors, a prompt over the window among them, come
        before any byte of a stream, as an HTTP status the SDK raises."""
        body = await json_object(request, "an OpenAI chat completions request")
        asked = chat_request(body, config.llm.sampling)
        check_chat_model(body.get("model"), config.llm.model)
        reply_of = ChatReplyWriter(f"chatcmpl-{uuid.uuid4().hex[:24]}", int(time.time()), config.llm.model)
        if not asked.stream:
            with services.shutdown.cancellable() as cancel:
                try:  # a client that leaves (a timeout) cancels its reply within a token: the worker is not held
                    work = services.worker.run(lambda: list(generate(services, asked, cancel)))
                    items = await until_disconnected(request, work, cancel)
                except AssistantError:
                    raise
                except Exception as exc:
                    raise generation_failed(exc) from exc
            services.shutdown.check()  # stopped mid-reply: 503, not a cut answer passed off as complete
            if cancel.is_set():
                raise ClientDisconnect()  # nobody is waiting for the answer
            stats = items[-1]
            services.metrics.completion(stats, stream=False)
            return reply_of.whole(items)
        # queued now and read up to the first token before any byte is sent: a full queue, a prompt over the window
        # or a refused request is a plain HTTP error the client can act on, not an event inside a 200 stream
        cancel = threading.Event()
        items = aiter(services.worker.stream(lambda: generate(services, asked, cancel), cancel))
        with services.shutdown.cancellable(cancel):
            try:
                first = await anext(items)
            except AssistantError:
                raise
            except Exception as exc:
                raise generation_failed(exc) from exc

        def failed(exc: AssistantError) -> str:
            services.metrics.error(exc.code)
            return f"data: {json.dumps(error_body(exc))}\n\n"

        async def events() -> AsyncIterator[str]:
            yield reply_of.chunk({"role": "assistant", "content": ""})
            stats = None
            with services.shutdown.cancellable(cancel):
                try:
                    async for item in prepend(first, items):
                        if isinstance(item, ReplyStats):
                            stats = item
                        elif await request.is_disconnected():
                            return  # leaving the stream sets cancel: generation stops, the worker is free
                        else:
                            for chunk in reply_of.delta(item):
                                yield chunk
                except AssistantError as exc:  # the server is stopping, or the generation was refused
                    yield failed(exc)
                    return
                except Exception as exc:  # the stream ends with an error event; the server goes on
                    yield failed(generation_failed(exc))
                    return
            if services.shutdown.stopping or stats is None:  # cut by the stop: say so instead of finishing
                yield failed(ShutdownError(SHUTDOWN_MESSAGE))
                return
            services.metrics.completion(stats, stream=True)
            for chunk in reply_of.end(stats, include_usage=asked.include_usage):
                yield chunk

        return StreamingResponse(events(), media_type="text/event-stream")

    @app.post("/v1/audio/speech")
    async def speech(request: Request) -> Response:
        body = await json_object(request, "an OpenAI speech request: a JSON object with input, voice, response_format")
        asked = speech_from_request(body, services.speech)

        def speak() -> tuple[bytes, str]:
            audio = services.speech.synthesize(asked.text, voice=asked.voice, speed=asked.speed)
            return encode(audio, asked.response_format)

        data, media_type = await services.speech_worker.run(speak)
        return Response(data, media_type=media_type)

    @app.websocket("/v1/realtime")
    async def realtime(websocket: WebSocket) -> None:
        from assistant.io.realtime import RealtimeSession

        await RealtimeSession(services, websocket).run()

    def store() -> ConversationStore:
        if config.server.conversation_dir is None:
            raise NotFoundError("this server keeps no conversations; start it with server.conversation_dir set")
        return ConversationStore(Path(config.server.conversation_dir).expanduser())

    def key_of_request(request: Request) -> str:
        """The key RequestGate found on this /v1 request ("" when the server has none)."""
        return str(request.state.key)

    @app.get("/v1/personas")
    async def personas() -> dict[str, Any]:
        """This server's addition: the characters in ``server.persona_dir`` (a file that cannot be read is listed
        with its error, so whoever manages the folder sees what is wrong)."""
        folder = config.server.persona_dir
        found: list[dict[str, Any]] = []
        for path in sorted(Path(folder).expanduser().glob("*.y*ml")) if folder else ():
            try:
                persona = load_persona(path)
            except AssistantError as exc:
                found.append({"id": path.stem, "object": "persona", "error": public_message(exc)})
                continue
            found.append({"id": path.stem, "object": "persona", "name": persona.name, "greeting": persona.greeting,
                          "instructions": persona.system})  # fmt: skip
        return {"object": "list", "data": found}

    @app.get("/v1/conversations")
    async def list_conversations(request: Request) -> dict[str, Any]:
        """This server's addition to OpenAI's Conversations API: the caller's saved conversations, newest first."""
        found = await asyncio.to_thread(store().listing, key_of_request(request))
        return {"object": "list", "data": found, "first_id": found[0]["id"] if found else None,
                "last_id": found[-1]["id"] if found else None, "has_more": False}  # fmt: skip

    @app.get("/v1/conversations/{conversation_id}")
    async def get_conversation(conversation_id: str, request: Request) -> dict[str, Any]:
        saved = store()
        key = key_of_request(request)
        conversation = await asyncio.to_thread(saved.load, key, conversation_id)
        return describe(conversation_id, conversation, saved.path_of(key, conversation_id).stat().st_mtime)

    @app.get("/v1/conversations/{conversation_id}/items")
    async def conversation_items(conversation_id: str, request: Request) -> dict[str, Any]:
        """OpenAI's item list: ``order`` (desc by default), ``limit``, ``after``; ``include`` is refused by name."""
        query = request.query_params
        if query.getlist("include") or query.getlist("include[]"):
            raise ConfigError("include: no extra item data exists here (the items are text messages)")
        limit = query.get("limit", "20")
        if not limit.isdigit():
            raise ConfigError(f"limit {limit!r}: give a whole number from 1 to 100")
        conversation = await asyncio.to_thread(store().load, key_of_request(request), conversation_id)
        return items(conversation_id, conversation, order=query.get("order", "desc"), limit=int(limit),
                     after=query.get("after"))  # fmt: skip

    @app.post("/v1/conversations/{conversation_id}")
    async def update_conversation(conversation_id: str, request: Request) -> dict[str, Any]:
        """OpenAI's update (``metadata``): the title. Refused (409) while a session has the conversation open."""
        body = await json_object(request, 'a conversation update: {"metadata": {"title": "..."}}')
        saved, key = store(), key_of_request(request)
        async with services.conversation_free(saved.path_of(key, conversation_id)):
            return await asyncio.to_thread(saved.rename, key, conversation_id, body.get("metadata"))

    @app.delete("/v1/conversations/{conversation_id}")
    async def delete_conversation(conversation_id: str, request: Request) -> dict[str, Any]:
        saved, key = store(), key_of_request(request)
        async with services.conversation_free(saved.path_of(key, conversation_id)):
            await asyncio.to_thread(saved.delete, key, conversation_id)
        return {"id": conversation_id, "object": "conversation.deleted", "deleted": True}

    @app.get("/v1/conversations/{conversation_id}/export")
    async def export_conversation(conversation_id: str, request: Request, format: str = "markdown") -> Response:
        """This server's addition: the conversation as a download, ``format`` markdown (for people) or json (the
        saved file, which ``assistant chat --set chat.load=FILE`` resumes)."""
        if format not in ("markdown", "json"):
            raise ConfigError(f"format {format!r}: choose markdown or json")
        conversation = await asyncio.to_thread(store().load, key_of_request(request), conversation_id)
        if format == "json":
            body, media_type, suffix = (
                json.dumps(conversation.to_json(), ensure_ascii=False, indent=2),
                "application/json",
                "json",
            )
        else:
            body, media_type, suffix = conversation.to_markdown(), "text/markdown; charset=utf-8", "md"
        disposition = f'attachment; filename="{conversation_id}.{suffix}"'
        return Response(body, media_type=media_type, headers={"content-disposition": disposition})

    @app.get("/")
    async def page() -> Any:
        index = WEB_DIR / "index.html"
        if not index.is_file():
            return PlainTextResponse("assistant server: see /v1/models and /v1/realtime")
        return FileResponse(index, media_type="text/html")

    @app.get("/static/{name}")
    async def page_file(name: str) -> Any:
        """The page's own files beside index.html (its script, style, worklet, the vendored Markdown renderer): a
        plain name of letters, digits, '.', '-' or '_' (no folders, no dot files), never a path a client makes."""
        allowed = all(c.isascii() and (c.isalnum() or c in ".-_") for c in name)
        path = WEB_DIR / name
        if not allowed or name.startswith(".") or name == "index.html" or not path.is_file():
            raise NotFoundError("no such page file")
        return FileResponse(path, headers={"cache-control": "no-cache"})

    app.add_middleware(RequestGate, services=services)
    # added last, so outermost: it sees every request first, and whatever a stop cancels inside it
    policy = AccessPolicy.for_server(config.server.host, config.server.port, config.server.allowed_hosts,
                                     config.server.allowed_origins)  # fmt: skip
    app.add_middleware(AccessGuard, policy=policy, limit_bytes=limit_bytes,
                       on_refused=services.metrics.error,
                       stopping=lambda: SHUTDOWN_MESSAGE if services.shutdown.stopping else None)  # fmt: skip
    return app


class RequestGate:
    """ASGI middleware admitting each HTTP request: not while stopping, the API key (``/v1``, ``/metrics``, the
    route listing), the client's request rate, and ``server.max_requests`` in progress (body sizes are
    AccessGuard's). Plain ASGI, not Starlette's BaseHTTPMiddleware, whose task group hides a client's disconnect from
    ``Request.is_disconnected`` (an abandoned upload must notice)."""

    def __init__(self, app: Any, services: Services) -> None:
        self._app = app
        self._services = services

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            await self._app(scope, receive, send)
            return
        services, limits = self._services, self._services.config.server
        request = Request(scope)
        try:
            services.shutdown.check()
            api = request.url.path.startswith("/v1/")
            listing = ("/docs", "/openapi.json") if limits.docs else ()  # else they do not exist: 404 for anyone
            if api or request.url.path == "/metrics" or request.url.path in listing:
                request.state.key = _check_key(services, request.headers.get("authorization"))
                request.state.client = client_of(request.state.key, request.client)
                if api:
                    services.rate_limits.request(request.state.client)
            with services.lock:
                if services.requests >= limits.max_requests:
                    raise BusyError(f"the server is busy ({limits.max_requests} requests in progress, "
                                    "server.max_requests); try again shortly")  # fmt: skip
                services.requests += 1
        except AssistantError as exc:
            await error_response(services, exc, 400)(scope, receive, send)
            return
        try:
            await self._app(scope, receive, send)
        finally:
            with services.lock:
                services.requests -= 1


async def json_object(request: Request, expected: str) -> dict[str, Any]:
    """The request's JSON body, which must be an object sent as JSON (a page's ``text/plain`` POST, which needs no
    CORS preflight, is refused: 415); ConfigError naming ``expected`` otherwise."""
    media_type = request.headers.get("content-type", "").partition(";")[0].strip().lower()
    if media_type != "application/json" and not media_type.endswith("+json"):
        raise UnsupportedMediaTypeError(f"Content-Type {media_type or 'none'!r}: send {expected} as application/json")
    try:
        body = await request.json()
        json.dumps(body, ensure_ascii=False).encode()  # a lone surrogate escape ("\ud800") is no text to work on
    except UnicodeEncodeError:
        raise ConfigError("the body holds text that is not valid Unicode (a lone surrogate such as \\ud800)") from None
    except RecursionError:
        raise ConfigError("the body is nested too deeply to read; send a flat JSON object") from None
    except ValueError:
        raise ConfigError(f"the body is not valid JSON; send {expected}") from None
    if not isinstance(body, dict):
        raise ConfigError(f"the body must be a JSON object; send {expected}")
    return body


def check_chat_model(model: Any, served: str) -> None:
    """``model`` must name the chat model this server serves (its id in /v1/models), as OpenAI and vLLM refuse
    others; left out, the served model answers."""
    if model is not None and model != served:
        raise InvalidRequestError(f"The model `{model}` does not exist here; this server serves `{served}` (see "
                                  "GET /v1/models)", param="model", code="model_not_found")  # fmt: skip


def generate(services: Services, asked: ChatRequest, cancel: threading.Event) -> Iterator[str | ToolCall | ReplyStats]:
    """One reply on the worker thread: its text deltas and tool calls as they come, then its ReplyStats."""
    reply = services.chat_model.stream(asked.messages, asked.sampling, continue_last=asked.continue_last,
                                       cancel=cancel, output=asked.output, tool_use=asked.tool_use)  # fmt: skip
    made = 0
    for delta in reply:
        if delta:
            yield delta
        while made < len(reply.tool_calls):
            yield reply.tool_calls[made]
            made += 1
    yield from reply.tool_calls[made:]
    yield reply.stats


async def prepend(first: Any, rest: AsyncIterator[Any]) -> AsyncIterator[Any]:
    yield first
    async for item in rest:
        yield item


@dataclasses.dataclass
class ChatReplyWriter:
    """A reply in OpenAI's chat completion shapes: the whole object, or ``chat.completion.chunk`` SSE events (tool
    calls as OpenAI streams them: id, type and name first, then the arguments)."""

    request_id: str
    created: int
    model: str
    calls_sent: int = 0

    def chunk(self, delta: dict[str, Any], finish: str | None = None) -> str:
        data = {"id": self.request_id, "object": "chat.completion.chunk", "created": self.created, "model": self.model,
                "system_fingerprint": None, "service_tier": "default",
                "choices": [{"index": 0, "delta": delta, "logprobs": None,
                                                         "finish_reason": finish}]}  # fmt: skip
        return f"data: {json.dumps(data, ensure_ascii=False)}\n\n"

    def delta(self, item: str | ToolCall) -> Iterator[str]:
        if isinstance(item, str):
            yield self.chunk({"content": item})
            return
        index, self.calls_sent = self.calls_sent, self.calls_sent + 1
        yield self.chunk({"tool_calls": [{"index": index, "id": item.id, "type": "function",
                                          "function": {"name": item.name, "arguments": ""}}]})  # fmt: skip
        yield self.chunk({"tool_calls": [{"index": index, "function": {"arguments": item.arguments}}]})

    def end(self, stats: ReplyStats, *, include_usage: bool) -> Iterator[str]:
        yield self.chunk({}, finish_reason(stats))
        if include_usage:
            usage = {"id": self.request_id, "object": "chat.completion.chunk", "created": self.created,
                     "model": self.model, "system_fingerprint": None, "choices": [],
                     "usage": _usage(stats)}  # fmt: skip
            yield f"data: {json.dumps(usage)}\n\n"
        yield "data: [DONE]\n\n"

    def whole(self, items: list[Any]) -> dict[str, Any]:
        stats: ReplyStats = items[-1]
        text = "".join(item for item in items if isinstance(item, str))
        calls = [item for item in items if isinstance(item, ToolCall)]
        message: dict[str, Any] = {"role": "assistant", "content": text if text or not calls else None,
                                   "refusal": None}  # fmt: skip
        if calls:
            message["tool_calls"] = [call.to_openai() for call in calls]
        return {"id": self.request_id, "object": "chat.completion", "created": self.created, "model": self.model,
                "system_fingerprint": None, "service_tier": "default",
                "choices": [{"index": 0, "message": message, "logprobs": None, "finish_reason": finish_reason(stats)}],
                "usage": _usage(stats)}  # fmt: skip


def finish_reason(stats: ReplyStats) -> str:
    """OpenAI's finish_reason: ``tool_calls``, ``length`` (max_tokens or the window), else ``stop``."""
    return stats.finish_reason if stats.finish_reason in ("tool_calls", "length") else "stop"


def _usage(stats: Any) -> dict[str, int]:
    return {"prompt_tokens": stats.prompt_tokens, "completion_tokens": stats.completion_tokens,
            "total_tokens": stats.prompt_tokens + stats.completion_tokens}  # fmt: skip


def bearer_token(authorization: str | None) -> str:
    """The token of an ``Authorization: Bearer TOKEN`` header ("" for none or another scheme)."""
    scheme, _, token = (authorization or "").partition(" ")
    return token.strip() if scheme.lower() == "bearer" else ""


def _check_key(services: Services, authorization: str | None) -> str:
    """The configured key the request carries ("" when the server has none); AuthError otherwise."""
    key = services.key_of(bearer_token(authorization))
    if key is None:
        raise AuthError("missing or wrong API key: send 'Authorization: Bearer <server.api_key>'")
    return key


def client_of(key: str, address: Any) -> str:
    """Who a rate limit counts: the API key when the server has keys, else the client's address."""
    if key:
        return "key " + hashlib.sha256(key.encode()).hexdigest()[:16]
    return f"address {address.host if address is not None else 'unknown'}"


def error_response(services: Services, exc: AssistantError, default_status: int) -> JSONResponse:
    """An error in OpenAI's shape, counted in the metrics; 429 carries Retry-After (and the openai SDK's
    retry-after-ms); 503 on stopping and 413 close the connection (the rest of a body too big is not read)."""
    services.metrics.error(exc.code)
    headers = {}
    if isinstance(exc, RateLimitError):
        wait = exc.retry_after_s
        headers = {"retry-after": str(math.ceil(wait)), "retry-after-ms": str(round(wait * 1000))}
    elif isinstance(exc, ShutdownError | LimitError):  # stopping; or a body too big to read on: hang up
        headers = {"connection": "close"}
    status = status_of(exc, default_status)
    return JSONResponse(error_body(exc, status), status_code=status, headers=headers)


def new_session(services: Services) -> ChatSession:
    """A fresh conversation on the shared model, with the server's system prompt and sampling."""
    llm = services.config.llm
    return ChatSession(services.chat_model, Conversation(llm.system), llm.sampling)


def deadline_protocol(timeout_s: float) -> type:
    """uvicorn's HTTP/1.1 protocol with a deadline per request. uvicorn closes idle kept-alive connections but waits
    without end for a request that arrives slowly (slow loris: a byte of header now and then, or a trickled body),
    each such client holding a connection; here a request must arrive whole within ``timeout_s`` of the connection
    opening or of its first byte, or it gets 408 and the connection is closed."""
    import h11
    from uvicorn.protocols.http.h11_impl import H11Protocol

    arriving = (h11.IDLE, h11.SEND_BODY)  # the client's side of h11's state machine while a request comes in
    timeout = json.dumps(error_body(LimitError(
        f"the request did not arrive within server.request_timeout_s ({timeout_s:g} s); send it whole, faster"
    ))).encode()  # fmt: skip
    response = b"HTTP/1.1 408 Request Timeout\r\ncontent-type: application/json\r\nconnection: close\r\n"
    response += b"content-length: %d\r\n\r\n%s" % (len(timeout), timeout)

    class DeadlineH11Protocol(H11Protocol):
        _deadline: asyncio.TimerHandle | None = None

        def connection_made(self, transport: Any) -> None:
            super().connection_made(transport)
            self._deadline = self.loop.call_later(timeout_s, self._expired)

        def data_received(self, data: bytes) -> None:
            super().data_received(data)
            upgraded = self.transport.get_protocol() is not self  # a WebSocket now owns the connection
            if upgraded or self.conn.their_state not in arriving:
                self._disarm()
            elif self._deadline is None:  # the first bytes of the next request on a kept-alive connection
                self._deadline = self.loop.call_later(timeout_s, self._expired)

        def connection_lost(self, exc: Exception | None) -> None:
            self._disarm()
            super().connection_lost(exc)

        def _disarm(self) -> None:
            if self._deadline is not None:
                self._deadline.cancel()
                self._deadline = None

        def _expired(self) -> None:
            self._deadline = None
            if self.transport.is_closing() or self.transport.get_protocol() is not self:
                return
            if self.conn.their_state not in arriving:
                return
            cycle = self.cycle  # the last request's, until the next one's headers are complete
            if cycle is None or cycle.response_complete or not cycle.response_started:
                self.transport.write(response)
            self.transport.close()

    return DeadlineH11Protocol


def serve(config: Config) -> None:
    import uvicorn

    services = Services.load(config)
    limits = config.server
    shown = f"[{limits.host}]" if ":" in limits.host else limits.host  # an IPv6 address in a URL
    print(f"assistant serving on http://{shown}:{limits.port}/ (Ctrl-C to stop)", flush=True)
    if not is_loopback(limits.host):
        print("assistant serve: reachable from other machines over plain HTTP: API keys and conversations travel in "
              "clear text; put it behind a TLS reverse proxy (docs/reliability.md, Security) and set "
              "server.allowed_hosts to the proxy's name", file=sys.stderr, flush=True)  # fmt: skip
    # frames up to 4x the message limit reach the session, which answers with an `error` event and goes on;
    # beyond that the WebSocket layer closes the connection with 1009 (message too big) before buffering it.
    # limit_concurrency is the last guard (plain 503) behind our own session and request limits.
    server_config = uvicorn.Config(
        create_app(services), host=limits.host, port=limits.port, log_level="warning",
        http=deadline_protocol(limits.request_timeout_s), ws_max_size=limits.max_message_kb * 1024 * 4,
        limit_concurrency=limits.max_sessions + limits.max_requests + 16,
        timeout_graceful_shutdown=limits.shutdown_timeout_s / 2,  # after GracefulServer's own half
    )  # fmt: skip
    server = GracefulServer(server_config, services.stop, limits.shutdown_timeout_s)
    server.run()
    print("assistant serve: stopped", flush=True)
    server.exit_after_stop()
