"""Rate limits per client: requests per minute and audio minutes per hour (``server.rate_limit_*``).

A sliding-window log per client: each window holds what a client used, with when; a request is taken when what is
still inside the window plus its own amount fits the limit, and otherwise the refusal says exactly when enough will
have left the window (``Retry-After``). Entries closer together than 1/3600 of the window are merged, so a
client streaming audio in 20 ms pieces keeps at most 3600 entries per window. The ``limits`` package was considered:
its moving window keeps one timestamp per unit of cost (an hour of audio in milliseconds would be millions) and its
reset time is the oldest entry's, not the moment the asked amount fits.
"""

from __future__ import annotations

import math
import threading
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass

from assistant.errors import LimitError, RateLimitError

DEFAULT_EXPOSED_REQUESTS_PER_MINUTE = 120  # when server.host is not loopback and the setting is left unset
DEFAULT_EXPOSED_AUDIO_MINUTES_PER_HOUR = 240.0  # room for one upload of server.max_upload_audio_s (3 h) an hour


class SlidingWindow:
    """At most ``limit`` units per client in any ``window_s`` seconds. Thread-safe."""

    def __init__(self, limit: float, window_s: float, clock: Callable[[], float] = time.monotonic) -> None:
        self.limit = limit
        self.window_s = window_s
        self._merge_s = window_s / 3600
        self._clock = clock
        self._used: dict[str, deque[list[float]]] = {}  # client -> [time, amount], oldest first
        self._lock = threading.Lock()

    def take(self, client: str, amount: float) -> float:
        """Use ``amount`` for ``client`` and return 0.0, or use nothing and return the seconds until it would fit.
        An amount over the whole limit never fits: ``math.inf``."""
        if amount > self.limit:
            return math.inf
        now = self._clock()
        with self._lock:
            entries = self._expire(client, now)
            used = sum(amount for _, amount in entries)
            if used + amount <= self.limit:
                if entries and now - entries[-1][0] < self._merge_s:
                    entries[-1][1] += amount
                else:
                    entries.append([now, amount])
                return 0.0
            freed = 0.0
            for at, old in entries:  # oldest first: the moment enough has left the window
                freed += old
                if used - freed + amount <= self.limit:
                    return at + self.window_s - now
            return self.window_s  # not reached: amount <= limit frees at the latest with the newest entry

    def room(self, client: str) -> float:
        """What ``client`` may still use now."""
        with self._lock:
            return self.limit - sum(amount for _, amount in self._expire(client, self._clock()))

    def wait_until_empty(self, client: str) -> float:
        """Seconds until everything ``client`` used has left the window (the whole limit is free again)."""
        with self._lock:
            entries = self._expire(client, self._clock())
            return max(0.0, entries[-1][0] + self.window_s - self._clock()) if entries else 0.0

    def add(self, client: str, amount: float) -> None:
        """Count ``amount`` for ``client`` whatever the limit (use that was found only after the work was done)."""
        with self._lock:
            self._expire(client, self._clock()).append([self._clock(), amount])

    def give_back(self, client: str, amount: float) -> None:
        """Return ``amount`` of what ``client`` took (work that was refused or failed after it was counted)."""
        with self._lock:
            entries = self._used.get(client)
            while entries and amount > 0:
                back = min(amount, entries[-1][1])
                entries[-1][1] -= back
                amount -= back
                if entries[-1][1] <= 0:
                    entries.pop()

    def _expire(self, client: str, now: float) -> deque[list[float]]:
        if len(self._used) > 4096:  # many clients (addresses) once: forget those whose window is empty
            for other in [c for c, e in self._used.items() if not e or e[-1][0] <= now - self.window_s]:
                del self._used[other]
        entries = self._used.setdefault(client, deque())
        while entries and entries[0][0] <= now - self.window_s:
            entries.popleft()
        return entries


@dataclass
class RateLimits:
    """The server's two allowances per client (an API key, or an address when the server has no keys)."""

    requests: SlidingWindow | None  # requests per minute
    audio: SlidingWindow | None  # audio seconds per hour

    @classmethod
    def from_settings(cls, requests_per_minute: int | None, audio_minutes_per_hour: float | None,
                      *, exposed: bool) -> RateLimits:  # fmt: skip
        """None takes the default: unset on loopback, a generous limit when the server is reachable from other
        machines; 0 turns a limit off."""
        if requests_per_minute is None and exposed:
            requests_per_minute = DEFAULT_EXPOSED_REQUESTS_PER_MINUTE
        if audio_minutes_per_hour is None and exposed:
            audio_minutes_per_hour = DEFAULT_EXPOSED_AUDIO_MINUTES_PER_HOUR
        return cls(
            SlidingWindow(requests_per_minute, 60.0) if requests_per_minute else None,
            SlidingWindow(audio_minutes_per_hour * 60, 3600.0) if audio_minutes_per_hour else None,
        )

    def request(self, client: str) -> None:
        """Count one request; RateLimitError when the client is over ``server.rate_limit_requests_per_minute``."""
        if self.requests is None:
            return
        wait = self.requests.take(client, 1)
        if wait:
            raise RateLimitError(
                f"over {self.requests.limit:g} requests per minute (server.rate_limit_requests_per_minute); "
                f"try again in {math.ceil(wait)} s",
                wait,
            )

    def audio_seconds(self, client: str, seconds: float) -> None:
        """Count ``seconds`` of audio; RateLimitError when the client is over
        ``server.rate_limit_audio_minutes_per_hour``, LimitError when this audio alone is over it."""
        if self.audio is None or seconds <= 0:
            return
        wait = self.audio.take(client, seconds)
        if wait == math.inf:
            raise LimitError(f"this audio lasts {_duration(seconds)}, more than the {self._allowance()}; send it in "
                             "parts")  # fmt: skip
        if wait:
            raise RateLimitError(f"over the {self._allowance()}; {_duration(seconds)} more fit in {math.ceil(wait)} s",
                                 wait)  # fmt: skip

    def audio_room(self, client: str) -> float | None:
        """Seconds of audio ``client`` may still send now (None: no audio limit); RateLimitError when none is left.
        For a file that declares no duration: it is then held to this while it is decoded."""
        if self.audio is None:
            return None
        room = self.audio.room(client)
        if room <= 0:
            wait = self.audio.wait_until_empty(client)
            raise RateLimitError(f"over the {self._allowance()}; try again in {math.ceil(wait)} s", wait)
        return room

    def over_room(self, client: str, room: float) -> RateLimitError:
        """The refusal of a file found (while decoding) to hold more than the ``room`` it had: try again when the
        whole allowance is free."""
        assert self.audio is not None
        wait = max(self.audio.wait_until_empty(client), 1.0)
        return RateLimitError(f"this file holds more than the {_duration(room)} left of the {self._allowance()}; "
                              f"try again in {math.ceil(wait)} s", wait)  # fmt: skip

    def _allowance(self) -> str:
        assert self.audio is not None
        return f"{self.audio.limit / 60:g} audio minutes per hour (server.rate_limit_audio_minutes_per_hour)"

    def refund_audio(self, client: str, seconds: float) -> None:
        """Give back audio counted for work that failed or was refused."""
        if self.audio is not None and seconds > 0:
            self.audio.give_back(client, seconds)

    def settle_audio(self, client: str, counted: float, actual: float) -> None:
        """After a file is transcribed: count what it really held instead of what it declared (a file that declares
        no duration, or a wrong one, is counted here: it may end over the allowance, the next request waits)."""
        if self.audio is None:
            return
        if actual > counted:
            self.audio.add(client, actual - counted)
        else:
            self.audio.give_back(client, counted - actual)


def _duration(seconds: float) -> str:
    return f"{seconds / 60:.1f} min" if seconds >= 60 else f"{seconds:.1f} s"
