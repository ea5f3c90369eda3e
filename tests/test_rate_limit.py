"""Rate limits per client: the sliding window's arithmetic on a fake clock, and the server's defaults."""

from __future__ import annotations

import math

import pytest

from assistant.errors import LimitError, RateLimitError
from assistant.io.rate_limit import RateLimits, SlidingWindow


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def test_a_request_over_the_limit_waits_exactly_until_the_oldest_leaves_the_window() -> None:
    clock = Clock()
    window = SlidingWindow(3, 60.0, clock)
    for _ in range(3):
        assert window.take("a", 1) == 0.0
        clock.now += 10
    # used at 1000, 1010, 1020; now 1030: the first leaves at 1060
    assert window.take("a", 1) == pytest.approx(30.0)
    assert window.take("b", 1) == 0.0  # another client has its own window
    clock.now = 1060.0
    assert window.take("a", 1) == 0.0
    assert window.take("a", 1) == pytest.approx(10.0)  # the second leaves at 1070


def test_an_amount_waits_until_enough_has_left_and_a_refusal_takes_nothing() -> None:
    clock = Clock()
    window = SlidingWindow(100.0, 3600.0, clock)
    assert window.take("a", 40.0) == 0.0
    clock.now += 100
    assert window.take("a", 50.0) == 0.0
    clock.now += 100
    # 90 used; 60 more fit only once both entries have left (the first alone frees 40: 50 + 60 > 100)
    assert window.take("a", 60.0) == pytest.approx(1000 + 100 + 3600 - clock.now)
    assert window.take("a", 10.0) == 0.0  # the refusal above took nothing
    assert window.take("a", 101.0) == math.inf


def test_pieces_close_together_are_merged_and_given_back_from_the_newest() -> None:
    clock = Clock()
    window = SlidingWindow(3600.0, 3600.0, clock)
    for _ in range(1000):  # 20 ms pieces of audio sent every 20 ms
        assert window.take("a", 0.02) == 0.0
        clock.now += 0.02
    assert len(window._used["a"]) <= 21  # one entry per second of the window's 1/3600
    window.give_back("a", 5.0)
    assert window.take("a", 3600.0 - 15.0) == 0.0


def test_defaults_are_off_on_loopback_on_when_exposed_and_zero_turns_them_off() -> None:
    assert RateLimits.from_settings(None, None, exposed=False) == RateLimits(None, None)
    exposed = RateLimits.from_settings(None, None, exposed=True)
    assert exposed.requests is not None and exposed.requests.limit == 120
    assert exposed.audio is not None and exposed.audio.limit == 240 * 60  # a 3-hour upload fits
    assert RateLimits.from_settings(0, 0, exposed=True) == RateLimits(None, None)


def test_errors_name_the_setting_and_when_to_retry() -> None:
    limits = RateLimits.from_settings(1, 1.0, exposed=False)
    limits.request("k")
    with pytest.raises(RateLimitError, match=r"rate_limit_requests_per_minute.*in 60 s") as refused:
        limits.request("k")
    assert refused.value.retry_after_s == pytest.approx(60.0, abs=0.5)
    limits.audio_seconds("k", 50.0)
    with pytest.raises(RateLimitError, match="rate_limit_audio_minutes_per_hour"):
        limits.audio_seconds("k", 20.0)
    with pytest.raises(LimitError, match="more than the 1 audio minutes per hour"):
        limits.audio_seconds("k", 61.0)
    limits.settle_audio("k", 50.0, 30.0)  # the file held less than it declared
    limits.audio_seconds("k", 20.0)
