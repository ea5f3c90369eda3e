"""Progress bars for long transcriptions: audio seconds done, per file and overall (tqdm, on stderr)."""

from __future__ import annotations

import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from types import TracebackType

from assistant.errors import AssistantError
from assistant.files import printable


class Progress:
    def __init__(self, paths: Sequence[Path], *, enabled: bool = True) -> None:
        from assistant.audio.decode import probe

        self._enabled = enabled and sys.stderr.isatty()
        self._durations: dict[Path, float] = {}
        if self._enabled:
            for path in paths:
                try:
                    self._durations[path] = probe(path).duration_s or 0.0
                except AssistantError:
                    self._durations[path] = 0.0
        self._overall = None
        self._file = None
        self._done_before = 0.0

    def __enter__(self) -> Progress:
        if self._enabled:
            from tqdm import tqdm

            total = round(sum(self._durations.values()), 1)
            self._overall = tqdm(total=total, unit="s", desc="all files", position=0, file=sys.stderr, disable=False)
        return self

    def __exit__(self, *exc: type[BaseException] | BaseException | TracebackType | None) -> None:
        for bar in (self._file, self._overall):
            if bar is not None:
                bar.close()

    def file_progress(self, path: Path) -> Callable[[float], None]:
        if not self._enabled:
            return lambda seconds: None
        from tqdm import tqdm

        if self._file is not None:
            self._file.close()
        total = round(self._durations.get(path, 0.0), 1)
        name = printable(path.name)[:30]
        self._file = tqdm(total=total, unit="s", desc=name, position=1, leave=False, file=sys.stderr, disable=False)
        start = self._done_before

        def update(seconds: float) -> None:
            assert self._file is not None and self._overall is not None
            self._file.n = min(round(seconds, 1), total)
            self._file.refresh()
            self._overall.n = min(round(start + seconds, 1), self._overall.total)
            self._overall.refresh()

        return update

    def running(self, seconds: dict[Path, float]) -> None:
        """Several files at once (Ray workers): the overall bar shows finished files plus the seconds done of each
        file in flight."""
        if self._overall is not None:
            self._overall.n = min(round(self._done_before + sum(seconds.values()), 1), self._overall.total)
            self._overall.refresh()

    def file_done(self, path: Path) -> None:
        self._done_before += self._durations.get(path, 0.0)
        if self._overall is not None:
            self._overall.n = round(self._done_before, 1)
            self._overall.refresh()

    def print(self, line: str) -> None:
        """One line on stderr above the bars; a file name's bytes that are not UTF-8 are shown as ``\\xNN``."""
        line = printable(line)
        if self._enabled:
            from tqdm import tqdm

            tqdm.write(line, file=sys.stderr)
        else:
            print(line, file=sys.stderr)
