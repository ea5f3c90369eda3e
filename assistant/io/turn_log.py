"""A JSONL log of voice turns: one line per turn with transcript, reply and latency metrics (and one per error)."""

from __future__ import annotations

import dataclasses
import json
import time
from pathlib import Path
from typing import Any

from assistant.config import OutputConfig
from assistant.errors import OutputError
from assistant.messages import Audio, TurnMetrics


class JsonlSink:
    def __init__(self, output: OutputConfig, *, verbose: bool = False) -> None:
        self._path = Path(output.log).expanduser()
        try:
            self._path.parent.mkdir(parents=True, exist_ok=True)
            self._path.touch()
        except OSError as exc:
            raise OutputError(f"cannot write the turn log '{self._path}': {exc.strerror}; set output.log") from None

    def _write(self, record: dict[str, Any]) -> None:
        line = json.dumps({"time": time.strftime("%Y-%m-%dT%H:%M:%S%z"), **record}, ensure_ascii=False)
        with self._path.open("a", encoding="utf-8") as log:  # one whole line per write; reopened so rotation works
            log.write(line + "\n")

    def partial(self, text: str) -> None:
        pass

    def transcript(self, text: str) -> None:
        pass

    def delta(self, text: str) -> None:
        pass

    def audio(self, audio: Audio) -> None:
        pass

    def interrupted(self) -> None:
        pass

    def turn_done(self, transcript: str, reply: str, metrics: TurnMetrics) -> None:
        self._write({"transcript": transcript, "reply": reply, **dataclasses.asdict(metrics)})

    def error(self, message: str) -> None:
        self._write({"error": message})

    def notice(self, message: str) -> None:
        pass
