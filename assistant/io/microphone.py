"""The microphone: sounddevice (PortAudio) capture at the device's own rate, resampled to 16 kHz with soxr.

The PortAudio callback only copies blocks into a bounded queue (it must never block); resampling happens in the
reading thread. A device that stops delivering audio (unplugged, taken by another program) ends the stream with an
``AudioSourceError`` naming it.
"""

from __future__ import annotations

import contextlib
import queue
import threading
from collections.abc import Iterator
from typing import Any

import numpy as np

from assistant.config import InputConfig
from assistant.errors import AudioSourceError
from assistant.messages import SAMPLE_RATE, EndOfRecording

BLOCK_S = 0.02  # capture block, seconds
QUEUE_BLOCKS = 500  # 10 s of audio buffered at most; older audio is dropped if the reader falls that far behind
STALL_S = 2.0  # no audio for this long from an open stream: the device is gone


def find_microphone(device: str | None) -> dict[str, Any]:
    """The input device ``device`` names (or the default one); AudioSourceError when there is none."""
    try:
        import sounddevice
    except (ImportError, OSError) as exc:
        raise AudioSourceError(
            f"cannot use the microphone ({exc}); install PortAudio ('apt-get install libportaudio2') and "
            "'pip install sounddevice', or chat with --text"
        ) from None
    selector: int | str | None = int(device) if device is not None and device.isdigit() else device
    try:
        return dict(sounddevice.query_devices(selector, kind="input"))
    except (ValueError, sounddevice.PortAudioError) as exc:
        where = f"'{device}'" if device else "a default input device"
        raise AudioSourceError(
            f"no microphone: {where} not found ({exc}); list devices with "
            "'python -m sounddevice', set input.device, or chat with --text"
        ) from None


class MicrophoneSource:
    live = True

    def __init__(self, config: InputConfig) -> None:
        import sounddevice
        import soxr

        self._device = find_microphone(config.device)
        self._rate = int(self._device["default_samplerate"])
        self._blocks: queue.Queue[np.ndarray] = queue.Queue(maxsize=QUEUE_BLOCKS)
        self._resampler: Any = soxr.ResampleStream(self._rate, SAMPLE_RATE, 1, dtype="float32")  # None once closed
        self._resampling = threading.Lock()  # close() frees the resampler while the reading thread may use it
        self._closed = False
        try:
            self._stream = sounddevice.InputStream(
                device=self._device["index"],
                channels=1,
                samplerate=self._rate,
                dtype="int16",
                blocksize=int(self._rate * BLOCK_S),
                callback=self._capture,
            )
        except sounddevice.PortAudioError as exc:
            raise AudioSourceError(f"cannot open microphone '{self._device['name']}': {exc}") from None

    @property
    def name(self) -> str:
        return f"{self._device['name']} ({self._rate} Hz)"

    def _capture(self, block: np.ndarray, frames: int, when: Any, status: Any) -> None:
        try:
            self._blocks.put_nowait(block[:, 0].copy())
        except queue.Full:  # the reader is far behind: drop the oldest audio rather than block PortAudio
            with contextlib.suppress(queue.Empty):
                self._blocks.get_nowait()

    def chunks(self) -> Iterator[np.ndarray | EndOfRecording | Exception]:
        self._stream.start()
        while not self._closed:
            try:
                block = self._blocks.get(timeout=STALL_S)
            except queue.Empty:
                if self._closed:
                    return
                raise AudioSourceError(
                    f"the microphone '{self._device['name']}' stopped delivering audio (unplugged or taken by "
                    "another program?)"
                ) from None
            resampled = self._resample(block)
            if resampled is None:
                return
            yield resampled

    def _resample(self, block: np.ndarray) -> np.ndarray | None:
        """One captured block at 16 kHz; None once the source is closed. The reading thread's frames hold only the
        source, never the resampler itself, so that ``close`` can free it."""
        with self._resampling:
            if self._resampler is None:
                return None
            return np.asarray(self._resampler.resample_chunk(block.astype(np.float32) / 32768.0))

    def close(self) -> None:
        """Stop capturing and free the native resampler now, whatever thread still reads (safe to call again).

        A soxr object still alive when the interpreter exits (the reading thread, a daemon, was waiting for a block)
        made nanobind print some twenty lines of "nanobind: leaked instance ..." after Ctrl-C, which read like a
        crash. The waiting reader is woken with an empty block and returns."""
        self._closed = True
        with contextlib.suppress(Exception):  # a vanished device may fail to close; nothing is left to free
            self._stream.abort()
            self._stream.close()
        with self._resampling:
            self._resampler = None
        with contextlib.suppress(queue.Full):
            self._blocks.put_nowait(np.zeros(0, dtype=np.int16))
