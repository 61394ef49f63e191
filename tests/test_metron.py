"""Metron metrics against hand-computed timelines (times chosen exact in binary)."""

from __future__ import annotations

import math

import pytest

from vllm_ext.ab.metron import (Timeline, deadline_misses, fluidity_index, percentile,
                                pooled_gaps)


def test_multi_token_and_empty_events():
    # sent at 0; tokens at 1.0, 1.5, 2.5 (x2, one event), an empty event, then 3.0
    tl = Timeline.of(0.0, [(1.0, 1), (1.5, 1), (2.5, 2), (2.75, 0), (3.0, 1)])
    assert tl.num_tokens == 5
    assert tl.ttft == 1.0 and tl.e2e == 3.0
    assert tl.gaps == (0.5, 1.0, 0.0, 0.5)  # the 2-token event: one gap, one zero gap
    assert tl.tpot == 0.5  # (3.0 - 1.0) / 4
    assert tl.normalized_latency == 0.6


def test_aborted_before_any_token():
    tl = Timeline.of(5.0, [(6.0, 0)], completed=False)
    assert (tl.ttft, tl.e2e, tl.tpot, tl.normalized_latency) == (None, None, None, None)
    assert tl.gaps == () and deadline_misses(tl, 1.0, 0.5) == (0, 0)
    assert fluidity_index(tl, 1.0, 0.5) is None


def test_single_token_has_no_tpot():
    tl = Timeline.of(0.0, [(0.25, 1)])
    assert tl.ttft == 0.25 and tl.tpot is None and tl.gaps == ()


def test_deadlines_bank_slack_and_count_every_overrun():
    # D_p = 1.0, D_d = 0.5. Tokens at 0.75 (0.25 early), 1.25 (on time, slack 0.25),
    # 2.0 (0.75 gap uses the slack up), 3.5 (1.5 gap: floor(1.5 / 0.5) = 3 misses).
    tl = Timeline.of(0.0, [(0.75, 1), (1.25, 1), (2.0, 1), (3.5, 1)])
    assert deadline_misses(tl, 1.0, 0.5) == (3, 6)
    assert fluidity_index(tl, 1.0, 0.5) == 0.5


def test_late_first_token_counts_from_its_own_deadline():
    # First token 2.25 after sending: floor((2.25 - 0 - 1.0) / 0.5) + 1 = 3 misses;
    # the next token, 0.25 later, is on time.
    tl = Timeline.of(0.0, [(2.25, 1), (2.5, 1)])
    assert deadline_misses(tl, 1.0, 0.5) == (3, 4)


def test_a_chunk_meets_its_deadlines_together():
    tl = Timeline.of(0.0, [(0.5, 3)])
    assert deadline_misses(tl, 1.0, 0.5) == (0, 3)


def test_late_tokens_reset_the_slack():
    # 0.25 early, then a 1.0 gap: misses floor((1.0 - 0.25) / 0.5) = 1 and slack resets,
    # so the next 0.75 gap misses again (it would not have with the old slack).
    tl = Timeline.of(0.0, [(0.75, 1), (1.75, 1), (2.5, 1)])
    assert deadline_misses(tl, 1.0, 0.5) == (2, 3)


def test_pooled_gaps_and_percentiles():
    a = Timeline.of(0.0, [(1.0, 1), (2.0, 1)])
    b = Timeline.of(0.0, [(1.0, 2), (4.0, 1)])
    assert sorted(pooled_gaps([a, b])) == [0.0, 1.0, 3.0]
    assert percentile([1.0, 2.0, 3.0, 4.0], 50) == 2.5
    assert percentile([5.0], 99) == 5.0
    assert math.isnan(percentile([], 50))


@pytest.mark.parametrize("q,expected", [(0, 0.0), (100, 3.0), (75, 1.5)])
def test_percentile_bounds(q, expected):
    assert percentile([0.0, 1.0, 1.0, 3.0], q) == expected
