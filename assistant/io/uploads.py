"""Uploaded audio: reading OpenAI's multipart transcription form, transcribing it beside the model worker (counted
against the client's audio allowance, stopped when the client leaves or the server stops), rendering the result in
OpenAI's formats, and transcription jobs (this server's addition: the same form, transcribed in the background,
with progress and every format of the result for a while)."""

from __future__ import annotations

import asyncio
import contextlib
import re
import shutil
import tempfile
import threading
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeVar

from fastapi import Request
from fastapi.responses import JSONResponse, PlainTextResponse, Response
from starlette.requests import ClientDisconnect

from assistant.asr.cues import CueOptions
from assistant.asr.writers import WRITERS, segment_json
from assistant.audio.decode import probe
from assistant.errors import (
    AssistantError,
    AudioDecodeError,
    ConfigError,
    ConflictError,
    LimitError,
    NotFoundError,
    UnsupportedMediaTypeError,
    public_message,
)
from assistant.messages import Transcript
from assistant.pipeline import AudioLimit, FileResult

if TYPE_CHECKING:
    from assistant.io.server import Services

T = TypeVar("T")
RESPONSE_FORMATS = ("json", "text", "srt", "vtt", "verbose_json")
GRANULARITIES = ("segment", "word")
AUDIO_RATE_SETTING = "server.rate_limit_audio_minutes_per_hour"
JOB_KEEP_S = 3600.0  # a finished job's result is kept this long
MAX_JOBS = 64  # jobs kept in all (the oldest finished ones are forgotten first); more running at once is refused


def timestamp_granularities(values: list[Any], response_format: str) -> frozenset[str]:
    """OpenAI's ``timestamp_granularities[]`` form field (the openai SDK's ``timestamp_granularities=[...]``):
    segment (the default), word, or both; only with ``verbose_json``, as OpenAI requires."""
    given = frozenset(str(value) for value in values)
    unknown = sorted(given - set(GRANULARITIES))
    if unknown:
        raise ConfigError(f"timestamp_granularities {unknown}: choose from {', '.join(GRANULARITIES)}")
    if given and response_format != "verbose_json":
        raise ConfigError("timestamp_granularities needs response_format=verbose_json")
    return given or frozenset({"segment"})


def verbose_json(transcript: Transcript, granularities: frozenset[str]) -> dict[str, Any]:
    """OpenAI's verbose_json: segments when asked for (the default), and the words of the whole file at the top
    level when ``word`` is asked for, as OpenAI returns them (``word``, ``start``, ``end``)."""
    document: dict[str, Any] = {
        "task": "transcribe", "language": transcript.language, "duration": transcript.audio_s, "text": transcript.text,
    }  # fmt: skip
    if "segment" in granularities:
        document["segments"] = [segment_json(i, s) for i, s in enumerate(transcript.segments)]
    if "word" in granularities:
        document["words"] = [
            {"word": w.word.strip(), "start": round(w.start_s, 3), "end": round(w.end_s, 3)}
            for s in transcript.segments for w in s.words
        ]  # fmt: skip
    return document


AUDIO_RATE_SETTING = "server.rate_limit_audio_minutes_per_hour"


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


@contextlib.asynccontextmanager
async def read_upload(request: Request, limit_bytes: int, max_mb: float, *,
                      keep: bool = False) -> AsyncIterator[Upload]:  # fmt: skip
    """OpenAI's transcription form, checked field by field, its file written to a temporary folder that is removed
    on leaving (unless ``keep``: a job removes it when done)."""
    content_type = request.headers.get("content-type", "")
    if not content_type.lower().startswith("multipart/form-data"):
        raise UnsupportedMediaTypeError(
            f"Content-Type {content_type or 'none'!r}: send the audio as multipart/form-data with a 'file' field"
        )
    # the body is counted as it arrives (AccessGuard); text fields are small, one file
    form = await request.form(max_files=1, max_fields=32, max_part_size=64 * 1024)
    upload = form.get("file")
    if upload is None or isinstance(upload, str):
        raise ConfigError("file: send the audio as a multipart file field named 'file'")
    response_format = str(form.get("response_format") or "json")
    if response_format not in RESPONSE_FORMATS:
        raise ConfigError(f"response_format {response_format!r}: choose one of {', '.join(RESPONSE_FORMATS)}")
    given = form.getlist("timestamp_granularities[]") + form.getlist("timestamp_granularities")  # SDK; curl -F
    granularities = timestamp_granularities(given, response_format)
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
        yield Upload(path, upload.filename or "the upload", str(form.get("language") or "") or None,
                     response_format, granularities)  # fmt: skip
    except BaseException:
        shutil.rmtree(folder, ignore_errors=True)
        raise
    else:
        if not keep:
            shutil.rmtree(folder, ignore_errors=True)


async def transcribe_upload(services: Services, client: str, upload: Upload, abandoned: threading.Event, *,
                            wait: Callable[[Awaitable[FileResult]], Awaitable[FileResult]] | None = None,
                            on_progress: Callable[[float], None] | None = None,
                            declared: float | None = None) -> FileResult:  # fmt: skip
    """Transcribe a saved upload: counted against ``client``'s audio allowance, one upload at a time beside the
    model worker, stopped before its next unit when ``abandoned`` is set or the server stops. ``wait`` awaits the
    work (the synchronous route watches for the client leaving meanwhile). ``declared``: the seconds the file
    declares when the caller probed it already (else it is probed here)."""
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


def rendered(transcript: Transcript, response_format: str, granularities: frozenset[str], cues: CueOptions) -> Response:
    """The transcript as OpenAI returns it for ``response_format``."""
    if response_format == "text":
        return PlainTextResponse(transcript.text + "\n")
    if response_format in ("srt", "vtt"):  # text/plain, as OpenAI answers them
        return PlainTextResponse(WRITERS[response_format](transcript, {}, cues))
    if response_format == "json":
        return JSONResponse({"text": transcript.text})
    if response_format == "verbose_json":
        return JSONResponse(verbose_json(transcript, granularities))
    raise ConfigError(f"format {response_format!r}: choose one of {', '.join(RESPONSE_FORMATS)}")


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
