"""Uploaded audio: reading OpenAI's multipart transcription and translation forms (every field of OpenAI's reference
honoured or refused by name: docs/openai-compat.md), transcribing the file beside the model worker (counted against
the client's audio allowance, stopped when the client leaves or the server stops), answering in OpenAI's formats or
as its streamed events, and transcription jobs (this server's addition: the same form, transcribed in the
background, with progress and every format of the result for a while)."""

from __future__ import annotations

import asyncio
import contextlib
import json
import math
import re
import shutil
import tempfile
import threading
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal, TypeVar

from fastapi import Request
from fastapi.responses import JSONResponse, PlainTextResponse, Response, StreamingResponse
from starlette.datastructures import FormData
from starlette.requests import ClientDisconnect

from assistant.asr.cues import CueOptions
from assistant.asr.language import WHISPER_LANGUAGES, language_code
from assistant.asr.writers import WRITERS, segment_json
from assistant.audio.decode import probe
from assistant.config import Task
from assistant.errors import (
    AssistantError,
    AudioDecodeError,
    ConflictError,
    InvalidRequestError,
    LimitError,
    NotFoundError,
    UnsupportedMediaTypeError,
    public_message,
)
from assistant.messages import Segment, Transcript
from assistant.pipeline import AudioLimit, FileResult

if TYPE_CHECKING:
    from assistant.io.server import Services

T = TypeVar("T")
Kind = Literal["transcription", "translation", "job"]  # which route's form
RESPONSE_FORMATS = ("json", "text", "srt", "vtt", "verbose_json")
GRANULARITIES = ("segment", "word")
STREAM_FORMATS = ("json", "text")  # stream=true sends text events, which is what these two hold
ROUTES: dict[Kind, str] = {
    "transcription": "POST /v1/audio/transcriptions",
    "translation": "POST /v1/audio/translations",
    "job": "POST /v1/transcription_jobs",
}
# the form fields of OpenAI's API reference, by route (a job takes the transcription form)
TRANSCRIPTION_FIELDS = ("file", "model", "chunking_strategy", "include", "keywords", "known_speaker_names",
                        "known_speaker_references", "language", "languages", "prompt", "response_format", "stream",
                        "temperature", "timestamp_granularities")  # fmt: skip
TRANSLATION_FIELDS = ("file", "model", "prompt", "response_format", "temperature")
# OpenAI's fields this server does not do, refused by name whenever they ask for something, and why
REFUSED = {
    "include": "token log-probabilities (include[]=logprobs) are not returned here (OpenAI returns them only from "
    "gpt-4o-transcribe models); leave include out: verbose_json segments carry avg_logprob and no_speech_prob",
    "keywords": "keywords are a gpt-transcribe feature that Whisper does not have; give the words in prompt instead",
    "known_speaker_names": "speaker diarization is not done here; leave known_speaker_names out",
    "known_speaker_references": "speaker diarization is not done here; leave known_speaker_references out",
    "languages": "a list of possible languages is not taken here; give one in language, or leave both out to "
    "have each speech window's language detected",
}
AUDIO_RATE_SETTING = "server.rate_limit_audio_minutes_per_hour"
JOB_KEEP_S = 3600.0  # a finished job's result is kept this long
MAX_JOBS = 64  # jobs kept in all (the oldest finished ones are forgotten first); more running at once is refused


def timestamp_granularities(values: list[Any], response_format: str) -> frozenset[str]:
    """OpenAI's ``timestamp_granularities[]`` form field (the openai SDK's ``timestamp_granularities=[...]``):
    segment (the default), word, or both; only with ``verbose_json``, as OpenAI requires."""
    given = frozenset(str(value) for value in values)
    unknown = sorted(given - set(GRANULARITIES))
    if unknown:
        raise InvalidRequestError(f"timestamp_granularities {unknown}: choose from {', '.join(GRANULARITIES)}",
                                  param="timestamp_granularities")  # fmt: skip
    if given and response_format != "verbose_json":
        raise InvalidRequestError(
            "timestamp_granularities needs response_format=verbose_json", param="timestamp_granularities"
        )
    return given or frozenset({"segment"})


def language_name(code: str | None) -> str | None:
    """A language as OpenAI's verbose_json names it (``en`` -> ``english``); a code Whisper does not know stays."""
    return None if code is None else WHISPER_LANGUAGES.get(code, code)


def verbose_json(transcript: Transcript, granularities: frozenset[str], task: Task = "transcribe") -> dict[str, Any]:
    """OpenAI's verbose_json: the language as OpenAI names it (``english``; a translation's is always English),
    segments when asked for (the default) with Whisper's decoding values, and the words of the whole file at the
    top level when ``word`` is asked for, as OpenAI returns them (``word``, ``start``, ``end``)."""
    language = "english" if task == "translate" else language_name(transcript.language)
    document: dict[str, Any] = {"task": task, "language": language, "duration": transcript.audio_s,
                                "text": transcript.text}  # fmt: skip
    if "segment" in granularities:
        document["segments"] = [segment_json(i, s) for i, s in enumerate(transcript.segments)]
        for segment in document["segments"]:  # our addition, named as the top level is
            if "language" in segment:
                segment["language"] = language_name(segment["language"])
    if "word" in granularities:
        document["words"] = [
            {"word": w.word.strip(), "start": round(w.start_s, 3), "end": round(w.end_s, 3)}
            for s in transcript.segments for w in s.words
        ]  # fmt: skip
    return document


def count_upload_audio(services: Services, client: str, declared: float,
                       limit: AudioLimit) -> tuple[float, AudioLimit]:  # fmt: skip
    """Count an upload's ``declared`` seconds against the client's audio allowance before any work (RateLimitError
    when over it). A file that declares no duration is held, while it is decoded, to what the allowance has left
    (the AudioLimit returned; RateLimitError now when nothing is left) and counted once transcribed."""
    if services.rate_limits.audio is None:
        return 0.0, limit
    if declared > 0:
        services.rate_limits.audio_seconds(client, declared)
        return declared, limit
    room = services.rate_limits.audio_room(client)
    if room is not None and room < limit.seconds:
        return 0.0, AudioLimit(room, AUDIO_RATE_SETTING)
    return 0.0, limit


async def until_disconnected(request: Request, work: Awaitable[T], abandoned: threading.Event) -> T:
    """``work``'s result; if the client goes away first, ``abandoned`` is set (the work stops at its next check)
    and its end is awaited all the same."""
    task = asyncio.ensure_future(work)
    while True:
        done, _ = await asyncio.wait({task}, timeout=0.5)
        if done:
            return task.result()
        if await request.is_disconnected():
            abandoned.set()
            return await task


@dataclass(frozen=True)
class Upload:
    """One validated transcription form: the file saved under a name of ours, and the fields that shape the work
    and the answer."""

    path: Path
    filename: str  # as the client named it, for messages and downloads
    language: str | None
    response_format: str
    granularities: frozenset[str]
    task: Task = "transcribe"
    prompt: str | None = None  # over asr.initial_prompt
    temperature: float | None = None  # where the fallback ladder starts
    stream: bool = False  # OpenAI's transcript.text.delta / done events


@dataclass(frozen=True)
class _Fields:
    """The text fields of an upload form, checked."""

    language: str | None
    response_format: str
    granularities: frozenset[str]
    prompt: str | None
    temperature: float | None
    stream: bool


@contextlib.asynccontextmanager
async def read_upload(request: Request, limit_bytes: int, max_mb: float, *, keep: bool = False,
                      kind: Kind = "transcription") -> AsyncIterator[Upload]:  # fmt: skip
    """OpenAI's transcription (or translation) form, checked field by field before any work (every field of
    OpenAI's reference honoured or refused by name, any other refused too), its file written to a temporary folder
    that is removed on leaving (unless ``keep``: the caller removes it with ``discard``)."""
    content_type = request.headers.get("content-type", "")
    if not content_type.lower().startswith("multipart/form-data"):
        raise UnsupportedMediaTypeError(
            f"Content-Type {content_type or 'none'!r}: send the audio as multipart/form-data with a 'file' field"
        )
    # the body is counted as it arrives (AccessGuard); text fields are small, one file
    form = await request.form(max_files=1, max_fields=32, max_part_size=64 * 1024)
    upload = form.get("file")
    if upload is None or isinstance(upload, str):
        raise InvalidRequestError("file: send the audio as a multipart file field named 'file'", param="file")
    fields = form_fields(form, kind)
    folder = Path(tempfile.mkdtemp(prefix="assistant-upload-"))
    try:
        path = folder / "upload"  # our own name: nothing the client sends becomes a path
        size = 0
        with path.open("wb") as out:
            while block := await upload.read(1 << 20):
                size += len(block)
                if size > limit_bytes:
                    raise LimitError(f"the file is over server.max_upload_mb ({max_mb} MB)")
                out.write(block)
        yield Upload(path, upload.filename or "the upload", fields.language, fields.response_format,
                     fields.granularities, "translate" if kind == "translation" else "transcribe", fields.prompt,
                     fields.temperature, fields.stream)  # fmt: skip
    except BaseException:
        shutil.rmtree(folder, ignore_errors=True)
        raise
    else:
        if not keep:
            shutil.rmtree(folder, ignore_errors=True)


def discard(upload: Upload) -> None:
    """Remove a kept upload's folder."""
    shutil.rmtree(upload.path.parent, ignore_errors=True)


def form_fields(form: FormData, kind: Kind) -> _Fields:
    """The form's text fields checked against OpenAI's reference for the route; ConfigError names the field.
    Array fields come as ``name[]`` (the openai SDK) or ``name`` (curl -F), object fields as ``name[key]``."""
    allowed = TRANSLATION_FIELDS if kind == "translation" else TRANSCRIPTION_FIELDS
    for key in form:
        name = key.split("[", 1)[0]
        if name not in allowed:
            raise InvalidRequestError(f"{name}: {ROUTES[kind]} has no such field; its fields are {', '.join(allowed)}",
                                      param=name, code="unknown_parameter")  # fmt: skip
        if name in REFUSED and any(str(value).strip() for value in form.getlist(key)):
            raise InvalidRequestError(f"{name}: {REFUSED[name]}", param=name, code="unsupported_parameter")
    response_format = _response_format(_text(form, "response_format") or "json", kind)
    given = form.getlist("timestamp_granularities[]") + form.getlist("timestamp_granularities")
    _check_chunking(form)
    stream = _stream(_text(form, "stream"), response_format, kind)
    return _Fields(language=language_code(_text(form, "language")), response_format=response_format,
                   granularities=timestamp_granularities(given, response_format), prompt=_text(form, "prompt"),
                   temperature=_temperature(_text(form, "temperature")), stream=stream)  # fmt: skip


def _text(form: FormData, name: str) -> str | None:
    """A text field's value, stripped; None when absent or empty. A file sent in a text field is refused."""
    value = form.get(name)
    if value is not None and not isinstance(value, str):
        raise InvalidRequestError(f"{name}: expected text, got a file", param=name)
    return (value or "").strip() or None


def _response_format(value: str, kind: Kind) -> str:
    if value == "diarized_json" and kind != "translation":
        raise InvalidRequestError("response_format 'diarized_json': speaker diarization is not done here; choose one "
                                  f"of {', '.join(RESPONSE_FORMATS)}", param="response_format",
                                  code="unsupported_value")  # fmt: skip
    if value not in RESPONSE_FORMATS:
        raise InvalidRequestError(f"response_format {value!r}: choose one of {', '.join(RESPONSE_FORMATS)}",
                                  param="response_format")  # fmt: skip
    return value


def _temperature(value: str | None) -> float | None:
    """OpenAI's ``temperature``, 0 to 1: where the fallback ladder starts (0: the whole configured ladder)."""
    if value is None:
        return None
    try:
        temperature = float(value)
    except ValueError:
        temperature = math.nan
    if not 0.0 <= temperature <= 1.0:  # NaN too
        raise InvalidRequestError(f"temperature {value!r}: give a number from 0 to 1", param="temperature")
    return temperature


def _stream(value: str | None, response_format: str, kind: Kind) -> bool:
    if value is None or value.lower() == "false":
        return False
    if value.lower() != "true":
        raise InvalidRequestError(f"stream {value!r}: give true or false", param="stream")
    if kind == "job":
        raise InvalidRequestError(
            "stream: a job is not streamed; fetch its result from /v1/transcription_jobs/{id}/result, or stream "
            "from /v1/audio/transcriptions",
            param="stream",
            code="unsupported_value",
        )
    if response_format not in STREAM_FORMATS:
        raise InvalidRequestError(f"stream: transcript.text events carry text only; use response_format "
                                  f"{' or '.join(STREAM_FORMATS)} with stream=true", param="stream")  # fmt: skip
    return True


def _check_chunking(form: FormData) -> None:
    """``chunking_strategy``: ``auto`` is what this server always does (loudness brought up, then Silero VAD
    windows); a ``server_vad`` object (``chunking_strategy[type]=...``, or as JSON text) is refused: the VAD's
    settings are the server's (``vad.*``)."""
    keys = [key for key in form if key.split("[", 1)[0] == "chunking_strategy"]
    values = [str(value).strip() for key in keys for value in form.getlist(key)]
    if any(key != "chunking_strategy" for key in keys) or any(value not in ("", "auto") for value in values):
        raise InvalidRequestError(
            "chunking_strategy: only 'auto' is taken (loudness normalisation, then the server's own VAD, set by its "
            "vad.* settings); a server_vad object is not",
            param="chunking_strategy",
            code="unsupported_value",
        )


async def transcribe_upload(services: Services, client: str, upload: Upload, abandoned: threading.Event, *,
                            wait: Callable[[Awaitable[FileResult]], Awaitable[FileResult]] | None = None,
                            on_progress: Callable[[float], None] | None = None,
                            on_segments: Callable[[Sequence[Segment]], None] | None = None,
                            declared: float | None = None) -> FileResult:  # fmt: skip
    """Transcribe a saved upload: counted against ``client``'s audio allowance, one upload at a time beside the
    model worker, stopped before its next unit when ``abandoned`` is set or the server stops. ``wait`` awaits the
    work (the synchronous route watches for the client leaving meanwhile). ``on_segments`` gets each block's
    final segments (in the worker's thread). ``declared``: the seconds the file declares when the caller probed it
    already (else it is probed here)."""
    limit = AudioLimit(services.config.server.max_upload_audio_s, "server.max_upload_audio_s")
    try:
        if declared is None:
            declared = await declared_seconds(upload)
        counted, limit = count_upload_audio(services, client, declared, limit)
        try:
            async with services.bulk:
                services.shutdown.check()  # the stop came while this upload waited for the one before
                if on_progress is not None:
                    on_progress(0.0)
                work = asyncio.to_thread(
                    services.transcribe_file, upload.path, abandoned, on_progress=on_progress,
                    language=upload.language, word_timestamps="word" in upload.granularities, limit=limit,
                    task=upload.task, prompt=upload.prompt, temperature=upload.temperature, on_segments=on_segments,
                )  # fmt: skip
                result = await (wait(work) if wait is not None else work)
        except LimitError:
            services.rate_limits.refund_audio(client, counted)
            if limit.setting == AUDIO_RATE_SETTING:  # it held more than the client's allowance left
                raise services.rate_limits.over_room(client, limit.seconds) from None
            raise
        except BaseException:
            services.rate_limits.refund_audio(client, counted)
            raise
    except AudioDecodeError as exc:  # name the client's file, not our temporary path
        raise AudioDecodeError(exc.message.replace(str(upload.path), upload.filename)) from None
    services.rate_limits.settle_audio(client, counted, result.transcript.audio_s)
    services.metrics.transcription(result.transcript.audio_s)
    return result


async def declared_seconds(upload: Upload) -> float:
    """The seconds the upload's container declares (0.0: none), probed off the event loop (ffprobe); a file ffprobe
    cannot read raises AudioDecodeError naming the client's file."""
    try:
        return (await asyncio.to_thread(probe, upload.path)).declared_s
    except AudioDecodeError as exc:
        raise AudioDecodeError(exc.message.replace(str(upload.path), upload.filename)) from None


def rendered(transcript: Transcript, response_format: str, granularities: frozenset[str], cues: CueOptions,
             task: Task = "transcribe") -> Response:  # fmt: skip
    """The transcript as OpenAI returns it for ``response_format``."""
    if response_format == "text":
        return PlainTextResponse(transcript.text + "\n")
    if response_format in ("srt", "vtt"):  # text/plain, as OpenAI answers them
        return PlainTextResponse(WRITERS[response_format](transcript, {}, cues))
    if response_format == "json":
        return JSONResponse({"text": transcript.text})
    if response_format == "verbose_json":
        return JSONResponse(verbose_json(transcript, granularities, task))
    raise InvalidRequestError(
        f"format {response_format!r}: choose one of {', '.join(RESPONSE_FORMATS)}", param="format"
    )


async def answer(services: Services, request: Request, upload: Upload, cues: CueOptions) -> Response:
    """The answer of the transcription and translation routes, for a kept upload (``read_upload(keep=True)``),
    whose folder is removed when the work ends: the file transcribed while the request waits (a client that
    leaves stops it) and rendered as asked, or, with ``stream``, OpenAI's transcript.text events."""
    if upload.stream:
        return await _streamed(services, request, upload)
    abandoned = threading.Event()  # set when the client goes away: the work stops before its next unit
    try:
        result = await transcribe_upload(services, request.state.client, upload, abandoned,
                                         wait=lambda work: until_disconnected(request, work, abandoned))  # fmt: skip
    finally:
        discard(upload)
    return rendered(result.transcript, upload.response_format, upload.granularities, cues, upload.task)


async def _streamed(services: Services, request: Request, upload: Upload) -> Response:
    """OpenAI's streamed transcription (``stream=true``): a ``transcript.text.delta`` event as each block of the
    file (``transcribe.block_s``, 10 min) is done, then ``transcript.text.done`` with the whole text; the deltas
    add up to it. An error before the first event is an HTTP error, as without streaming; after it, an event the
    SDK raises (``{"error": ...}``). A client that leaves stops the work before its next unit."""
    loop = asyncio.get_running_loop()
    events: asyncio.Queue[tuple[str, Any]] = asyncio.Queue()
    abandoned = threading.Event()
    texts: list[str] = []

    def on_segments(segments: Sequence[Segment]) -> None:  # in the worker's thread
        before = " ".join(texts).strip()
        texts.extend(segment.text for segment in segments)
        now = " ".join(texts).strip()
        if len(now) > len(before):
            loop.call_soon_threadsafe(events.put_nowait, ("delta", now[len(before) :]))

    async def work() -> None:
        try:
            result = await transcribe_upload(services, request.state.client, upload, abandoned,
                                             on_segments=on_segments)  # fmt: skip
            events.put_nowait(("done", result.transcript.text))
        except Exception as exc:  # reported to the client, before or in the stream
            events.put_nowait(("error", exc))
        finally:
            discard(upload)

    running = asyncio.ensure_future(work())
    first = await until_disconnected(request, events.get(), abandoned)
    if first[0] == "error":
        raise first[1]

    async def stream() -> AsyncIterator[str]:
        item = first
        try:
            while item[0] == "delta":
                yield _event({"type": "transcript.text.delta", "delta": item[1]})
                item = await events.get()
            yield _event({"type": "transcript.text.done", "text": item[1]} if item[0] == "done" else _failure(item[1]))
        finally:  # the work itself reports to the queue and removes the upload, whenever it ends
            if not running.done():  # the client left: stop before the next unit
                abandoned.set()

    return StreamingResponse(stream(), media_type="text/event-stream")


def _event(data: dict[str, Any]) -> str:
    return f"data: {json.dumps(data, ensure_ascii=False)}\n\n"


def _failure(exc: BaseException) -> dict[str, Any]:
    """An error met mid-stream, in OpenAI's error shape (the SDK raises it as an APIError)."""
    from assistant.io.server import error_body  # the server's one error shape; it imports this module

    if isinstance(exc, AssistantError):
        return error_body(exc)
    return error_body(AssistantError(f"the transcription failed: {type(exc).__name__}: {exc}"))


@dataclass
class Job:
    """One background transcription."""

    id: str
    client: str
    filename: str
    granularities: frozenset[str]
    created_at: float = field(default_factory=time.time)
    status: str = "queued"  # queued | running | completed | failed | cancelled
    done_s: float = 0.0
    duration_s: float | None = None
    result: FileResult | None = None
    error: AssistantError | None = None
    finished_at: float | None = None
    abandoned: threading.Event = field(default_factory=threading.Event)

    def progress(self, seconds: float) -> None:
        self.status, self.done_s = "running", seconds

    @property
    def download_name(self) -> str:
        stem = re.sub(r"[^\w.-]+", "_", Path(self.filename).stem)[:80].strip("._")
        return stem or "transcript"

    def describe(self) -> dict[str, Any]:
        error = {"message": public_message(self.error), "code": self.error.code} if self.error else None
        return {"id": self.id, "object": "transcription.job", "status": self.status, "filename": self.filename,
                "created_at": int(self.created_at), "duration": self.duration_s, "progress": round(self.done_s, 1),
                "error": error}  # fmt: skip

    def transcript(self) -> Transcript:
        if self.result is None and self.error is not None:
            raise ConflictError(f"job {self.id} failed, so it has no result: {public_message(self.error)}")
        if self.result is None:
            raise ConflictError(f"job {self.id} is {self.status}; its result is ready when it is completed")
        return self.result.transcript


class TranscriptionJobs:
    """The server's background transcriptions, each visible only to the client that started it."""

    def __init__(self) -> None:
        self._jobs: dict[str, Job] = {}
        self._tasks: set[asyncio.Task[None]] = set()

    def start(self, client: str, upload: Upload, declared: float,
              run: Callable[[Job], Awaitable[FileResult]]) -> Job:  # fmt: skip
        self._forget_old()
        if len(self._jobs) >= MAX_JOBS:
            raise LimitError(f"{MAX_JOBS} transcription jobs are kept already; wait for some to finish, or delete "
                             "finished ones")  # fmt: skip
        job = Job(f"tjob_{uuid.uuid4().hex[:20]}", client, upload.filename, upload.granularities,
                  duration_s=declared or None)  # fmt: skip
        self._jobs[job.id] = job
        task = asyncio.ensure_future(self._run(job, upload, run))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
        return job

    def get(self, client: str, job_id: str) -> Job:
        job = self._jobs.get(job_id)
        if job is None or job.client != client:
            raise NotFoundError(f"no transcription job {job_id!r}; a job is kept {JOB_KEEP_S / 60:g} min after it ends")
        return job

    def cancel(self, client: str, job_id: str) -> None:
        job = self.get(client, job_id)
        job.abandoned.set()
        if job.finished_at is None:
            job.status = "cancelled"
        del self._jobs[job_id]

    async def _run(self, job: Job, upload: Upload, run: Callable[[Job], Awaitable[FileResult]]) -> None:
        try:
            job.result = await run(job)
            job.status = "completed"
        except ClientDisconnect:  # cancelled by its client (DELETE)
            job.status = "cancelled"
        except AssistantError as exc:
            job.status, job.error = "failed", exc
        except Exception as exc:  # a fault of ours fails this job only
            job.status, job.error = "failed", AssistantError(f"the transcription failed: {type(exc).__name__}: {exc}")
        except BaseException:  # the task itself cancelled: the server's end
            job.status = "cancelled"
            raise
        finally:
            job.finished_at = time.time()
            shutil.rmtree(upload.path.parent, ignore_errors=True)

    def _forget_old(self) -> None:
        now = time.time()
        for job_id in [i for i, j in self._jobs.items() if j.finished_at and now - j.finished_at > JOB_KEEP_S]:
            del self._jobs[job_id]
