import itertools

import numpy as np

from assistant.audio import blocks_at_quiet_points, group_spans, quietest_point
from assistant.messages import SAMPLE_RATE, Audio, Span
from tests.conftest import silence, tone


def _pieces(samples, piece_s=7.0):
    size = int(piece_s * SAMPLE_RATE)
    for start in range(0, len(samples), size):
        yield Audio(samples[start : start + size], SAMPLE_RATE, start / SAMPLE_RATE)


def test_group_spans_merges_up_to_the_window():
    spans = [Span(0, 5), Span(6, 12), Span(13, 29), Span(31, 40), Span(41, 100)]
    assert group_spans(spans, 30) == [Span(0, 29), Span(31, 40), Span(41, 100)]
    assert group_spans([], 30) == []


def test_quietest_point_finds_the_pause():
    samples = np.concatenate([tone(8), silence(0.5), tone(3)])
    cut = quietest_point(samples, SAMPLE_RATE, search_from=0)
    assert 8.0 * SAMPLE_RATE <= cut <= 8.5 * SAMPLE_RATE


def test_blocks_cut_in_pauses_and_lose_nothing():
    samples = np.concatenate([np.concatenate([tone(7.3), silence(0.4)]) for _ in range(20)])
    blocks = list(blocks_at_quiet_points(_pieces(samples), block_s=60))
    assert np.array_equal(np.concatenate([b.samples for b in blocks]), samples)
    for block in blocks[:-1]:
        assert np.abs(block.samples[-800:]).max() < 1e-6, "cut must fall inside a pause"
    for before, after in itertools.pairwise(blocks):
        assert abs(before.end_s - after.start_s) < 1e-9
