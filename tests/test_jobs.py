"""Transcription jobs (``/v1/transcription_jobs``, this server's addition): the transcription form, transcribed in
the background with progress, its result downloadable in every format (SRT read back with pysubs2), cancellable,
and visible only to the key that started it. A real server on 127.0.0.1."""

from __future__ import annotations

import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.conftest import meeting_speech, require_offline_models, speak
from tests.test_server import start_server

pytestmark = [pytest.mark.real_model, pytest.mark.slow]
requests = pytest.importorskip("requests")
pysubs2 = pytest.importorskip("pysubs2")

ALPHA, BETA = "alpha-key-for-jobs-0001", "beta-key-for-jobs-0002"


@pytest.fixture(scope="module")
def server() -> Iterator[str]:
    require_offline_models("smollm2-135m", "whisper-base")
    process, base = start_server("--set", f"server.api_keys=[{ALPHA}, {BETA}]")
    yield base
    process.terminate()
    process.wait(timeout=30)


class Client:
    """requests with the API's base address and a key."""

    def __init__(self, base: str, key: str) -> None:
        self._base, self._session = f"{base}/v1", requests.Session()
        self._session.headers["Authorization"] = f"Bearer {key}"

    def get(self, path: str, **options: Any) -> Any:
        return self._session.get(self._base + path, timeout=60, **options)

    def post(self, path: str, **options: Any) -> Any:
        return self._session.post(self._base + path, timeout=60, **options)

    def delete(self, path: str) -> Any:
        return self._session.delete(self._base + path, timeout=60)


def client(base: str, key: str) -> Client:
    return Client(base, key)


def start(http: Any, path: Path) -> dict[str, Any]:
    with path.open("rb") as audio:
        answer = http.post("/transcription_jobs", files={"file": (path.name, audio, "audio/mp4")},
                           data={"language": "en"})  # fmt: skip
    assert answer.status_code == 202, answer.text
    return dict(answer.json())


def wait_done(http: Any, job_id: str, timeout_s: float = 300) -> tuple[dict[str, Any], list[float]]:
    seen = []
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        job = http.get(f"/transcription_jobs/{job_id}").json()
        seen.append(job["progress"])
        if job["status"] in ("completed", "failed"):
            return job, seen
        time.sleep(0.5)
    raise AssertionError(f"job {job_id} did not finish in {timeout_s} s")


def test_a_job_reports_progress_and_its_result_comes_in_every_format(server: str, tmp_path: Path) -> None:
    long_file, _ = meeting_speech(2, tmp_path)
    http = client(server, ALPHA)
    job = start(http, long_file)
    assert job["object"] == "transcription.job" and job["status"] in ("queued", "running")
    assert job["duration"] == pytest.approx(120, abs=10) and job["filename"] == "speech.m4a"
    early = http.get(f"/transcription_jobs/{job['id']}/result", params={"format": "srt"})
    assert early.status_code == 409 and early.json()["error"]["code"] == "conflict"
    assert client(server, BETA).get(f"/transcription_jobs/{job['id']}").status_code == 404  # not the other key's
    done, progress = wait_done(http, job["id"])
    assert done["status"] == "completed" and done["error"] is None
    assert any(0 < seconds < 120 for seconds in progress), progress  # seen part way through
    srt = http.get(f"/transcription_jobs/{job['id']}/result", params={"format": "srt"})
    assert srt.headers["content-disposition"] == 'attachment; filename="speech.srt"'
    subtitles = pysubs2.SSAFile.from_string(srt.text)
    assert len(subtitles) > 5 and subtitles[-1].end / 1000 > 100
    verbose = http.get(f"/transcription_jobs/{job['id']}/result", params={"format": "verbose_json"}).json()
    assert verbose["segments"] and "budget" in verbose["text"].lower()
    text = http.get(f"/transcription_jobs/{job['id']}/result", params={"format": "text"})
    assert text.text.strip() == verbose["text"].strip()
    bad = http.get(f"/transcription_jobs/{job['id']}/result", params={"format": "docx"})
    assert bad.status_code == 400


def test_a_cancelled_job_stops_and_the_next_one_is_not_kept_waiting(server: str, tmp_path: Path) -> None:
    long_file, _ = meeting_speech(10, tmp_path)
    short = speak("What is the capital of France?", tmp_path / "short.wav", words_per_minute=120)
    http = client(server, ALPHA)
    long_job = start(http, long_file)
    time.sleep(3)
    assert http.delete(f"/transcription_jobs/{long_job['id']}").json()["deleted"] is True
    assert http.get(f"/transcription_jobs/{long_job['id']}").status_code == 404
    started = time.monotonic()
    done, _ = wait_done(http, start(http, short)["id"], timeout_s=60)
    assert done["status"] == "completed" and time.monotonic() - started < 20
    with short.open("rb") as audio:  # refused at once, as the synchronous route refuses it
        refused = http.post("/transcription_jobs", files={"file": ("q.wav", audio)}, data={"language": "xx"})
    assert refused.status_code == 400 and refused.json()["error"]["code"] == "config"
    broken = tmp_path / "broken.mp3"
    broken.write_bytes(b"not audio")
    failed, _ = wait_done(http, start(http, broken)["id"], timeout_s=60)
    assert failed["status"] == "failed" and failed["error"]["code"] == "audio-decode"
    assert "broken.mp3" in failed["error"]["message"] and "/tmp" not in failed["error"]["message"]
