"""Audio files played in as if spoken (``input.source: file``): a front end over the audio stage's decoder."""

from __future__ import annotations

import time
from collections.abc import Iterator, Sequence
from pathlib import Path

import numpy as np

from assistant.audio.decode import stream_audio
from assistant.config import InputConfig
from assistant.errors import AudioDecodeError
from assistant.messages import EndOfRecording

_LIVE_PIECE_S = 0.1  # seconds per piece when files are played in as speech


class FileSource:
    """Audio files played in as if spoken: each file (or each VAD utterance of a long one) is a turn."""

    def __init__(self, config: InputConfig, paths: Sequence[str | Path]) -> None:
        self.live = config.realtime
        self._paths = [Path(p) for p in paths]
        self._closed = False

    def chunks(self) -> Iterator[np.ndarray | EndOfRecording | Exception]:
        for path in self._paths:
            started = time.monotonic()
            played_s = 0.0
            try:
                for piece in stream_audio(path, piece_s=_LIVE_PIECE_S):
                    if self._closed:
                        return
                    if self.live:  # speaking pace: a piece is ready only once it has "been said"
                        played_s += piece.duration_s
                        time.sleep(max(0.0, started + played_s - time.monotonic()))
                    yield piece.samples
            except AudioDecodeError as exc:
                yield exc
            yield EndOfRecording(str(path))

    def close(self) -> None:
        self._closed = True
