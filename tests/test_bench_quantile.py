"""The bench's reading of a histogram between two scrapes (load/bench.py `histogram_quantile`): the relay's part of
ack -> ledger in each phase's `stages`. It must agree with Prometheus's histogram_quantile over the same counts."""
from __future__ import annotations

import math

from load.bench import histogram_quantile

INF = math.inf
BEFORE = {0.01: 5.0, 0.05: 5.0, 0.1: 5.0, INF: 5.0}   # five observations before the phase, all under 10 ms
AFTER = {0.01: 15.0, 0.05: 95.0, 0.1: 104.0, INF: 105.0}  # the phase added 10, 80, 9 and 1 over 100 ms


def test_it_counts_only_what_the_phase_observed_and_interpolates_within_a_bucket():
    # 100 observations in the phase: the 50th lies in (0.01, 0.05], 40 of its 80 in: 0.01 + 0.04 * 40/80
    assert math.isclose(histogram_quantile(0.5, BEFORE, AFTER), 0.03)
    # the 99th lies in (0.05, 0.1]: 9 of its 9
    assert math.isclose(histogram_quantile(0.99, BEFORE, AFTER), 0.1)
    assert math.isclose(histogram_quantile(0.05, BEFORE, AFTER), 0.005)


def test_the_last_bucket_answers_its_lower_bound_and_an_empty_phase_answers_none():
    assert histogram_quantile(0.999, BEFORE, AFTER) == 0.1   # in (0.1, +Inf]: as Prometheus, the largest finite bound
    assert histogram_quantile(0.99, AFTER, AFTER) is None
    assert histogram_quantile(0.5, {}, {}) is None
