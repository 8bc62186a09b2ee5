"""Histograms with fixed buckets, and the bucket bounds the metrics use.

Compiled (setup.py's COMPILED, with histogram.pxd beside it): Histogram and PhaseGroup
are then extension types whose sums are C doubles, so the manager's compiled timing walk
(forkproxy/manager/recordpass.py) updates them without a Python attribute lookup. As
plain Python they are ``__slots__`` classes with the same attributes.
"""

from __future__ import annotations

from array import array
from bisect import bisect_left
from types import FunctionType

from forkproxy.context import PHASES

#: request duration buckets (seconds)
DURATION_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0,
                    10.0, 30.0, 60.0)
#: phase buckets: finer at the low end, a pooled connection or a loopback send take us
PHASE_BUCKETS = (0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25,
                 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)

#: the critical-path report's finer buckets (16 per decade from 50 us to 60 s, PHASE_BUCKETS
#: among them): its p99 estimates are within a bucket's ~15%
FINE_BUCKETS = tuple(sorted(set(PHASE_BUCKETS) | {
    float(f"{10 ** (k / 16):.3g}") for k in range(-69, 30)}))
#: FINE_BUCKETS index (the last: +Inf) -> PHASE_BUCKETS index of the same observation:
#: a value in fine bucket i is above fine bound i-1 and at most fine bound i, and no phase
#: bound lies between two neighbouring fine bounds, so its phase bucket is that of bound i
FINE_TO_PHASE = (*(bisect_left(PHASE_BUCKETS, b) for b in FINE_BUCKETS), len(PHASE_BUCKETS))


def _compiled_probe():
    """A function to look at: Cython's functions are not Python functions."""


#: True when this module runs compiled
COMPILED = not isinstance(_compiled_probe, FunctionType)


def _zeros(n: int):
    """n zero counts: an array('q') compiled (a typed view in histogram.pxd), else a list."""
    return array("q", bytes(8 * n)) if COMPILED else [0] * n


class Histogram:
    """Bucket counts (per bucket, not cumulative), sum of observations, and the sum of
    their squares (kept by the critical-path report's histograms: the deviation).

    The batch passes (recordpass.py) inline :meth:`observe` (it runs for every request
    and phase). The counts live in ``buckets``: compiled, an ``array('q')`` seen through
    a typed view, so that an increment is one C addition instead of a new int object; as
    Python, a list (the interpreter's list subscripts are faster than an array's).
    ``counts`` is a list copy of them.
    """

    __slots__ = ("bounds", "buckets", "sum", "sumsq")

    def __init__(self, bounds: tuple[float, ...]):
        self.bounds = bounds
        self.buckets = _zeros(len(bounds) + 1)  # the last one is +Inf
        self.sum = 0.0
        self.sumsq = 0.0

    @property
    def counts(self) -> list[int]:
        """Observations per bucket (not cumulative), the last one +Inf's."""
        return list(self.buckets)

    def observe(self, value: float) -> None:
        # Prometheus buckets are "le": a value equal to a bound belongs to that bucket
        self.buckets[bisect_left(self.bounds, value)] += 1
        self.sum += value
        self.sumsq += value * value

    def add(self, counts: list[int], total: float, sumsq: float = 0.0) -> None:
        """Add another histogram's bucket counts (same bounds), sum and sum of squares."""
        buckets = self.buckets
        if len(counts) != len(buckets):
            raise ValueError("histograms with different buckets")
        for i, n in enumerate(counts):
            buckets[i] += n
        self.sum += total
        self.sumsq += sumsq

    @property
    def count(self) -> int:
        return sum(self.buckets)

    def cumulative(self) -> list[tuple[float, int]]:
        """[(upper bound, observations <= bound)], ending with (inf, count)."""
        out = []
        acc = 0
        for bound, n in zip((*self.bounds, float("inf")), self.buckets, strict=True):
            acc += n
            out.append((bound, acc))
        return out

    def quantile(self, q: float) -> float:
        """Estimate like PromQL's histogram_quantile (linear within the bucket)."""
        if not self.count:
            return float("nan")
        rank = q * self.count
        prev_bound, prev_acc = 0.0, 0
        for bound, acc in self.cumulative():
            if acc >= rank:
                if bound == float("inf"):
                    return prev_bound
                in_bucket = acc - prev_acc
                if not in_bucket:
                    return bound
                return prev_bound + (bound - prev_bound) * (rank - prev_acc) / in_bucket
            prev_bound, prev_acc = bound, acc
        return prev_bound


class PhaseGroup:
    """The critical-path report's histograms of one (route, upstream): each phase's and
    the whole request's (from its first byte, or the accept, to the end of the response),
    FINE_BUCKETS, with sums of squares."""

    __slots__ = ("hdr", "tls", "conn", "send", "fb", "body", "total")

    def __init__(self):
        for name in self.__slots__:
            setattr(self, name, Histogram(FINE_BUCKETS))

    @property
    def phases(self) -> dict[str, Histogram]:
        """Phase name (as PHASES) -> histogram."""
        return dict(zip(PHASES, (self.hdr, self.tls, self.conn, self.send, self.fb,
                                 self.body), strict=True))

    def state(self) -> list[tuple[list[int], float, float]]:
        return [(h.counts, h.sum, h.sumsq) for h in (getattr(self, n) for n in self.__slots__)]

    def add(self, state: list[tuple[list[int], float, float]]) -> None:
        for name, (counts, total, sumsq) in zip(self.__slots__, state, strict=True):
            getattr(self, name).add(counts, total, sumsq)
