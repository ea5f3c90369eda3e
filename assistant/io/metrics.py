"""What an operator watches: the server's counters, latencies and queue, in Prometheus' text format.

One registry per server (``prometheus_client.CollectorRegistry``), not the library's global one: two servers in one
process (the tests) keep their own figures. ``GET /metrics`` serves it, behind the API key when one is set.
"""

from __future__ import annotations

from collections.abc import Callable

from assistant.messages import ReplyStats, TurnMetrics

LATENCY_BUCKETS_S = (0.05, 0.1, 0.25, 0.5, 0.75, 1.0, 1.5, 2.0, 3.0, 5.0, 10.0, 30.0, 60.0)


class ServerMetrics:
    def __init__(self, *, open_sessions: Callable[[], float], queue_depth: Callable[[], float]) -> None:
        from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

        self.registry = CollectorRegistry()
        registry = self.registry
        self.chat_completions = Counter("assistant_chat_completions", "Chat completions answered over HTTP",
                                        ["stream"], registry=registry)  # fmt: skip
        self.preemptive_replies = Counter("assistant_preemptive_replies", "Replies started in a pause before the "
                                          "turn ended (turn.preemptive), by outcome: used, wasted (other words), "
                                          "cancelled (the user went on)", ["outcome"], registry=registry)  # fmt: skip
        self.transcriptions = Counter("assistant_transcriptions", "Files transcribed over HTTP", registry=registry)
        self.realtime_responses = Counter("assistant_realtime_responses",
                                          "Responses completed over the Realtime WebSocket (spoken or typed turns)",
                                          registry=registry)  # fmt: skip
        self.audio_seconds = Counter("assistant_audio_seconds", "Seconds of audio recognised", ["source"],
                                     registry=registry)  # fmt: skip
        self.tokens = Counter("assistant_tokens", "Tokens of chat completions and voice replies", ["kind"],
                              registry=registry)  # fmt: skip
        self.errors = Counter("assistant_errors", "Requests answered with an error, by its code", ["code"],
                              registry=registry)  # fmt: skip
        self.first_token = Histogram("assistant_time_to_first_token_seconds", "Request to the first generated token",
                                     buckets=LATENCY_BUCKETS_S, registry=registry)  # fmt: skip
        self.speech_end_to_first_text = Histogram(
            "assistant_speech_end_to_first_text_seconds",
            "End of the user's speech to the reply's first text",
            buckets=LATENCY_BUCKETS_S,
            registry=registry,
        )
        self.speech_end_to_first_audio = Histogram(
            "assistant_speech_end_to_first_audio_seconds",
            "End of the user's speech to the reply's first audio",
            buckets=LATENCY_BUCKETS_S,
            registry=registry,
        )
        self.queue_wait = Histogram("assistant_queue_wait_seconds", "Time a model job waited for the worker",
                                    buckets=LATENCY_BUCKETS_S, registry=registry)  # fmt: skip
        for labelled, values in ((self.chat_completions, ("true", "false")), (self.audio_seconds, ("upload", "voice")),
                                 (self.tokens, ("prompt", "completion"))):  # fmt: skip
            for value in values:
                labelled.labels(value)  # a series exists (at 0) before its first event: dashboards see 0, not no data
        Gauge("assistant_open_sessions", "Open WebSocket sessions", registry=registry).set_function(open_sessions)
        Gauge("assistant_queue_depth", "Model jobs waiting for the worker", registry=registry).set_function(queue_depth)

    def error(self, code: str) -> None:
        """One error answered to a client (HTTP, SSE or WebSocket), by its code."""
        self.errors.labels(code=code).inc()

    def completion(self, stats: ReplyStats, *, stream: bool) -> None:
        self.chat_completions.labels(stream=str(stream).lower()).inc()
        self._reply(stats)

    def transcription(self, audio_s: float) -> None:
        self.transcriptions.inc()
        self.audio_seconds.labels(source="upload").inc(audio_s)

    def realtime_response(self, metrics: TurnMetrics | None, stats: ReplyStats | None) -> None:
        self.realtime_responses.inc()
        if metrics is not None and metrics.audio_s > 0:  # a spoken turn (a typed one has no end of speech)
            self.audio_seconds.labels(source="voice").inc(metrics.audio_s)
            self.speech_end_to_first_text.observe(metrics.speech_end_to_first_char_ms / 1000)
            if metrics.speech_end_to_first_audio_ms is not None:
                self.speech_end_to_first_audio.observe(metrics.speech_end_to_first_audio_ms / 1000)
        if stats is not None:
            self._reply(stats)

    def _reply(self, stats: ReplyStats) -> None:
        self.tokens.labels(kind="prompt").inc(stats.prompt_tokens)
        self.tokens.labels(kind="completion").inc(stats.completion_tokens)
        if stats.completion_tokens:
            self.first_token.observe(stats.first_token_s)

    def exposition(self) -> tuple[bytes, str]:
        """The text format and its content type."""
        from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

        return generate_latest(self.registry), CONTENT_TYPE_LATEST
