"""bench.bench_serving.p99_interval: the distribution-free 95 % interval of a p99 (hand-computed ranks)."""
import numpy as np

from bench.bench_serving import p99_interval


def test_p99_interval_ranks():
    # n = 2000: rank 0.99 n = 1980 -/+ 1.96 sqrt(2000 x 0.99 x 0.01) = 8.72 -> ranks 1971 and 1989.
    assert p99_interval(np.arange(1, 2001) / 1e3) == (1971.0, 1989.0)
    # n = 277: 274.23 -/+ 3.26 -> ranks 270 and 278, clipped to the slowest (277).
    assert p99_interval(np.arange(1, 278) / 1e3) == (270.0, 277.0)
    lo, hi = p99_interval([])
    assert np.isnan(lo) and np.isnan(hi)
