"""Batch transcription on Ray (``assistant transcribe PATH... --ray [ADDRESS]``).

A pool of Ray actors, each loading the transcription pipeline (model and VAD) once: one per GPU when the cluster has
GPUs, else ``transcribe.ray_workers`` (0 = half the cluster's CPUs, at least one), each given an equal share of the
CPUs as its threads. Files go to whichever actor is free; results (transcripts, not outputs) come back to this
process, which writes the outputs where a local run writes them and prints the same lines. Inputs are read by the
actors, so on a cluster they must be on storage every node mounts at the same path. ``local`` starts a Ray instance
on this machine for the run; an address (``ray://host:10001`` or ``host:6379``) joins a running cluster whose nodes
have this package installed.
"""

from __future__ import annotations

import dataclasses
import socket
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

from assistant.config import Config
from assistant.errors import AssistantError, ConfigError, ModelLoadError
from assistant.pipeline import FileResult, TranscriptionPipeline

LOCAL = "local"
POLL_S = 0.5  # how often running actors are asked how far they are (the progress bar)
LOCAL_OBJECT_STORE_BYTES = 256 * 1024 * 1024  # transcripts are small: a local instance needs little shared memory


Done = tuple[Path, "FileResult | Failure"]  # a file and what became of it


@dataclasses.dataclass(frozen=True)
class Failure:
    """A file an actor could not transcribe: the exception, as it was raised there."""

    error: Exception


class _Worker:
    """One Ray actor: the pipeline loaded once, files transcribed one at a time. Threaded (two calls at once) so that
    ``progress`` answers while ``transcribe`` runs."""

    def __init__(self, config: Config) -> None:
        self._pipeline = TranscriptionPipeline.from_config(config)
        self._done_s: dict[str, float] = {}

    def description(self) -> str:
        return str(self._pipeline.transcriber.description)

    def transcribe(self, path: str) -> FileResult | Failure:
        def seen(seconds: float) -> None:
            self._done_s[path] = seconds

        try:
            return self._pipeline.transcribe_file(path, on_progress=seen)
        except Exception as exc:  # reported per file by the driver, as a local run reports it
            return Failure(exc)
        finally:
            self._done_s.pop(path, None)

    def progress(self) -> dict[str, float]:
        return dict(self._done_s)


class RayPool:
    """The actors of one run; ``close`` (or the context manager) ends them and a local Ray instance."""

    def __init__(self, config: Config, address: str) -> None:
        try:
            import ray
        except ImportError:
            raise ModelLoadError("--ray needs Ray: pip install 'assistant[ray]' (or pip install ray)") from None
        self._ray = ray
        _check_reachable(address)
        try:
            if address == LOCAL:
                ray.init(include_dashboard=False, log_to_driver=False, logging_level="ERROR",
                         object_store_memory=LOCAL_OBJECT_STORE_BYTES)  # fmt: skip
            else:
                ray.init(address=address, log_to_driver=False, logging_level="ERROR")
        except (ConnectionError, RuntimeError, ValueError) as exc:
            raise ConfigError(f"--ray {address}: cannot join the Ray cluster ({exc}); give a running cluster's "
                              "address (ray://HOST:10001 or HOST:6379) or 'local'") from None  # fmt: skip
        resources = ray.cluster_resources()
        gpus, cpus = int(resources.get("GPU", 0)), max(1, int(resources.get("CPU", 1)))
        count = gpus or config.transcribe.ray_workers or max(1, cpus // 2)
        threads = max(1, cpus // count)
        actor_config = dataclasses.replace(config, asr=dataclasses.replace(config.asr, threads=threads))
        # a share of the CPUs each (fractional when there are more workers than CPUs), so every actor is placed
        share = 1 if gpus else min(float(threads), cpus / count)
        actor = ray.remote(_Worker).options(num_cpus=share, num_gpus=1 if gpus else 0, max_concurrency=2)
        self.workers = [actor.remote(actor_config) for _ in range(count)]
        self.description = f"ray: {count} workers ({'1 GPU' if gpus else f'{threads} CPU threads'} each)"
        try:
            self.model = ray.get(self.workers[0].description.remote())
        except ray.exceptions.RayActorError as exc:  # the model could not be loaded there
            self.close()
            raise ModelLoadError(f"a Ray worker could not load the pipeline: {exc}") from None

    def __enter__(self) -> RayPool:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        self._ray.shutdown()

    def transcribe(self, paths: Sequence[Path], on_progress: Callable[[dict[Path, float]], None]) -> Iterator[Done]:
        """Each file's result (or Failure) as it completes, every actor kept busy; ``on_progress`` is told the seconds
        done of each file in flight every POLL_S."""
        ray = self._ray
        waiting = list(paths)
        running: dict[Any, tuple[Any, Path]] = {}

        def start(worker: Any) -> None:
            if waiting:
                path = waiting.pop(0)
                running[worker.transcribe.remote(str(path.resolve()))] = (worker, path)  # the actors' cwd may differ

        for worker in self.workers:
            start(worker)
        while running:
            done, _ = ray.wait(list(running), num_returns=1, timeout=POLL_S)
            for ref in done:
                worker, path = running.pop(ref)
                start(worker)
                yield path, _as_given(_result(ray, ref), path)
            on_progress(self._progress({path for _, path in running.values()}))

    def _progress(self, paths: set[Path]) -> dict[Path, float]:
        """Seconds done of each file in flight, from the actors that answer within POLL_S (a progress bar must
        never hold the run up)."""
        by_name = {str(path.resolve()): path for path in paths}
        seconds: dict[Path, float] = {}
        asked = [worker.progress.remote() for worker in self.workers]
        answered, _ = self._ray.wait(asked, num_returns=len(asked), timeout=POLL_S)
        for answer in self._ray.get(answered):
            seconds.update({by_name[name]: value for name, value in answer.items() if name in by_name})
        return seconds


def _check_reachable(address: str) -> None:
    """A cluster address that nothing answers fails now with one line (Ray itself would wait for minutes)."""
    if address == LOCAL:
        return
    host, _, port = address.removeprefix("ray://").rpartition(":")
    if not host or not port.isdigit():
        raise ConfigError(f"--ray {address}: give 'local', ray://HOST:10001 (Ray Client) or HOST:6379 (on a node)")
    try:
        socket.create_connection((host.strip("[]"), int(port)), timeout=5).close()
    except OSError as exc:
        raise ConfigError(f"--ray {address}: nothing answers there ({exc.strerror or exc}); start the cluster "
                          "('ray start --head') or check the address") from None  # fmt: skip


def _as_given(result: FileResult | Failure, path: Path) -> FileResult | Failure:
    """An actor's error names the file as the path the user gave, as a local run's does."""
    if isinstance(result, Failure) and isinstance(result.error, AssistantError):
        result.error.message = result.error.message.replace(str(path.resolve()), str(path))
        result.error.args = (result.error.message,)
    return result


def _result(ray: Any, ref: Any) -> FileResult | Failure:
    try:
        return ray.get(ref)  # type: ignore[no-any-return]
    except ray.exceptions.RayError as exc:  # the actor died (out of memory, node lost): this file fails
        return Failure(RuntimeError(f"the Ray worker was lost: {str(exc).splitlines()[0][:300]}"))
