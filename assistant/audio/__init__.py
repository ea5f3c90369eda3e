"""The audio stage below every front end: decoding files (``decode``), levels (``level``), and the pure-numpy
helpers here: cutting a stream into blocks at quiet points, grouping speech; and where the ffmpeg programs are."""

from __future__ import annotations

import shutil
import warnings
from collections.abc import Iterable, Iterator, Sequence

import numpy as np

from assistant.errors import AudioDecodeError
from assistant.messages import Audio, Span

FFMPEG_MISSING = "ffmpeg not found; install it with 'apt-get install ffmpeg' (Debian/Ubuntu) or 'brew install ffmpeg'"

QUIET_FRAME_S = 0.1  # resolution of the quiet-point search, seconds
QUIET_SEARCH_S = 10.0  # how far back from a block's end the cut may move, seconds


def blocks_at_quiet_points(pieces: Iterable[Audio], block_s: float) -> Iterator[Audio]:
    """Regroup consecutive pieces into blocks of about ``block_s`` seconds.

    Each cut is moved back to the quietest 100 ms within the last 10 s of the block, so that a cut between blocks
    falls in a pause rather than inside a word; the rest carries over into the next block.
    """
    pending: list[np.ndarray] = []
    pending_len = 0
    start_s = 0.0
    sample_rate = 0
    for piece in pieces:
        sample_rate = piece.sample_rate
        if not pending:
            start_s = piece.start_s
        pending.append(piece.samples)
        pending_len += len(piece.samples)
        if pending_len >= block_s * sample_rate:
            samples = np.concatenate(pending)
            cut = quietest_point(samples, sample_rate, search_from=len(samples) - int(QUIET_SEARCH_S * sample_rate))
            yield Audio(samples[:cut], sample_rate, start_s)
            start_s += cut / sample_rate
            pending = [samples[cut:]]
            pending_len = len(samples) - cut
    if pending_len:
        yield Audio(np.concatenate(pending), sample_rate, start_s)


def quietest_point(samples: np.ndarray, sample_rate: int, *, search_from: int) -> int:
    """Index of the middle of the lowest-energy frame at or after ``search_from``."""
    frame = max(1, int(QUIET_FRAME_S * sample_rate))
    search_from = max(0, search_from)
    region = samples[search_from:]
    count = len(region) // frame
    if count < 2:
        return len(samples)
    energy = np.square(region[: count * frame].reshape(count, frame)).mean(axis=1)
    return search_from + int(np.argmin(energy)) * frame + frame // 2


def group_spans(spans: Sequence[Span], max_s: float, *, max_gap_s: float = float("inf")) -> list[Span]:
    """Merge neighbouring speech spans into windows of at most ``max_s`` seconds (a longer span stays whole), never
    across a pause longer than ``max_gap_s``: a window that spans a long silence gives a segment shown over it."""
    groups: list[Span] = []
    for span in spans:
        if groups and span.end_s - groups[-1].start_s <= max_s and span.start_s - groups[-1].end_s <= max_gap_s:
            groups[-1] = Span(groups[-1].start_s, span.end_s)
        else:
            groups.append(span)
    return groups


def tool_path(name: str) -> str:
    """The ``ffmpeg`` or ``ffprobe`` program as pydub finds it (honouring its overrides); AudioDecodeError if absent."""
    from pydub.utils import get_encoder_name, get_prober_name

    with warnings.catch_warnings():  # pydub warns when it finds neither; we raise a clearer error below
        warnings.simplefilter("ignore", RuntimeWarning)
        found = get_encoder_name() if name == "ffmpeg" else get_prober_name()
    resolved = shutil.which(found)
    if resolved is None:
        raise AudioDecodeError(FFMPEG_MISSING)
    return resolved
