"""Latency histograms: log-linear buckets (HdrHistogram's layout), sparse, mergeable.

A value v (nanoseconds) falls in a bucket whose width is at most v / 2**SUB_BUCKET_BITS, so a
reported percentile is within ~0.8 % above the true value. Buckets live in a dict, so a
histogram is small, crosses process boundaries as JSON, and merges by adding counts.
"""

from __future__ import annotations

import math
from typing import Any

from keyval.bench.errors import LoadGeneratorError

# 2**7 sub-buckets per power of two: <= 1/128 relative error, at most ~128 buckets per octave;
# latencies from 1 us to 100 s span 27 octaves, so a full histogram is a few thousand entries.
SUB_BUCKET_BITS = 7
_SUB_BUCKETS = 1 << SUB_BUCKET_BITS
_EXACT_LIMIT = _SUB_BUCKETS << 1  # values below this have a bucket of their own


def bucket_index(value_ns: int) -> int:
    """The bucket of a non-negative value; monotonic in the value."""
    if value_ns < _EXACT_LIMIT:
        return max(value_ns, 0)
    shift = value_ns.bit_length() - (SUB_BUCKET_BITS + 1)
    return shift * _SUB_BUCKETS + (value_ns >> shift)


def bucket_bounds(index: int) -> tuple[int, int]:
    """(lowest, highest) value that falls in bucket `index`."""
    if index < _EXACT_LIMIT:
        return index, index
    shift = index // _SUB_BUCKETS - 1
    mantissa = index - shift * _SUB_BUCKETS
    return mantissa << shift, ((mantissa + 1) << shift) - 1


class Histogram:
    """Counts of latencies in nanoseconds."""

    def __init__(self) -> None:
        self.counts: dict[int, int] = {}
        self.count = 0
        self.total_ns = 0
        self.min_ns = 0
        self.max_ns = 0

    def record(self, value_ns: int) -> None:
        index = bucket_index(value_ns)
        self.counts[index] = self.counts.get(index, 0) + 1
        if self.count == 0 or value_ns < self.min_ns:
            self.min_ns = value_ns
        if value_ns > self.max_ns:
            self.max_ns = value_ns
        self.count += 1
        self.total_ns += value_ns

    def merge(self, other: Histogram) -> None:
        for index, count in other.counts.items():
            self.counts[index] = self.counts.get(index, 0) + count
        if other.count:
            self.min_ns = other.min_ns if self.count == 0 else min(self.min_ns, other.min_ns)
            self.max_ns = max(self.max_ns, other.max_ns)
        self.count += other.count
        self.total_ns += other.total_ns

    def percentile_ns(self, fraction: float) -> int:
        """The value at or below which `fraction` (0..1] of the samples lie (bucket top,
        capped at the true maximum); 0 when empty."""
        if not 0.0 < fraction <= 1.0:
            raise ValueError(f"percentile fraction must be in (0, 1], not {fraction!r}")
        if self.count == 0:
            return 0
        rank = max(1, math.ceil(fraction * self.count))
        seen = 0
        for index in sorted(self.counts):
            seen += self.counts[index]
            if seen >= rank:
                return min(bucket_bounds(index)[1], self.max_ns)
        return self.max_ns

    def mean_ns(self) -> float:
        return self.total_ns / self.count if self.count else 0.0

    def to_json(self) -> dict[str, Any]:
        return {
            "counts": [[index, count] for index, count in sorted(self.counts.items())],
            "total_ns": self.total_ns,
            "min_ns": self.min_ns,
            "max_ns": self.max_ns,
        }

    @classmethod
    def from_json(cls, data: Any) -> Histogram:
        """Rebuild from `to_json`; raises LoadGeneratorError on anything malformed."""
        if not isinstance(data, dict) or not isinstance(data.get("counts"), list):
            raise LoadGeneratorError("histogram report is not an object with counts")
        histogram = cls()
        for pair in data["counts"]:
            if (
                not isinstance(pair, list)
                or len(pair) != 2
                or not all(type(item) is int and item >= 0 for item in pair)
            ):
                raise LoadGeneratorError(f"histogram bucket {pair!r} is not [index, count]")
            histogram.counts[pair[0]] = histogram.counts.get(pair[0], 0) + pair[1]
            histogram.count += pair[1]
        for field in ("total_ns", "min_ns", "max_ns"):
            value = data.get(field)
            if type(value) is not int or value < 0:
                raise LoadGeneratorError(f"histogram field {field} is {value!r}")
            setattr(histogram, field, value)
        return histogram
