"""The server's metrics on their own: a fresh registry, read back with Prometheus' parser."""

from prometheus_client.parser import text_string_to_metric_families

from assistant.io.metrics import ServerMetrics
from assistant.messages import ReplyStats, TurnMetrics


def samples(metrics: ServerMetrics) -> dict[str, float]:
    body, _media_type = metrics.exposition()
    return {f"{s.name}{sorted(s.labels.items())}": s.value
            for family in text_string_to_metric_families(body.decode()) for s in family.samples}  # fmt: skip


def test_labelled_series_exist_at_zero_before_their_first_event():
    found = samples(ServerMetrics(open_sessions=lambda: 3, queue_depth=lambda: 1))
    assert found["assistant_tokens_total[('kind', 'prompt')]"] == 0
    assert found["assistant_chat_completions_total[('stream', 'true')]"] == 0
    assert found["assistant_audio_seconds_total[('source', 'voice')]"] == 0
    assert found["assistant_open_sessions[]"] == 3 and found["assistant_queue_depth[]"] == 1


def test_a_spoken_turn_is_counted_and_timed_and_a_typed_one_has_no_end_of_speech():
    metrics = ServerMetrics(open_sessions=lambda: 0, queue_depth=lambda: 0)
    stats = ReplyStats(prompt_tokens=10, completion_tokens=5, first_token_s=0.2, total_s=0.5)
    spoken = TurnMetrics(
        audio_s=2.0,
        speech_end_to_transcript_ms=300,
        transcript_to_first_char_ms=400,
        speech_end_to_first_char_ms=700,
        tokens_per_s=20,
        speech_end_to_first_audio_ms=900,
    )
    metrics.realtime_response(spoken, stats)
    metrics.realtime_response(TurnMetrics(0.0, 0, 100, 100, 20), stats)  # typed
    found = samples(metrics)
    assert found["assistant_realtime_responses_total[]"] == 2
    assert found["assistant_speech_end_to_first_text_seconds_count[]"] == 1
    assert found["assistant_speech_end_to_first_audio_seconds_sum[]"] == 0.9
    assert found["assistant_audio_seconds_total[('source', 'voice')]"] == 2.0
    assert found["assistant_tokens_total[('kind', 'completion')]"] == 10
