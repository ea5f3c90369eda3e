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
DEFAULT_EXPOSED_AUDIO_MINUTES_PER_HOUR = 120.0


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
        allowance = f"{self.audio.limit / 60:g} audio minutes per hour (server.rate_limit_audio_minutes_per_hour)"
        if wait == math.inf:
            raise LimitError(f"this audio lasts {seconds / 60:.1f} min, more than the {allowance}; send it in parts")
        if wait:
            raise RateLimitError(f"over {allowance}; {seconds / 60:.1f} min more fit in {math.ceil(wait)} s", wait)

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
