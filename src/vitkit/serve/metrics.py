"""Counters and histograms in the Prometheus text format (version 0.0.4), without a client library.

Thread-safe: the event loop records requests, the model thread records batch sizes.
"""

from __future__ import annotations

import math
import threading
from collections import defaultdict
from collections.abc import Sequence

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"

REQUEST_SECONDS_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)
BATCH_SIZE_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128)
SHED_REASONS = ("queue_full", "deadline", "disconnected", "draining")

Labels = tuple[tuple[str, str], ...]


class Metrics:
    """vitkit_requests_total{route,status}, vitkit_request_seconds{route}, vitkit_batch_size
    (the number of images in each forward the model ran), vitkit_batch_seconds, and the work the
    server refused or dropped: vitkit_shed_total{reason}, vitkit_in_flight (admitted requests
    not yet answered) next to vitkit_queue_limit."""

    def __init__(self, queue_limit: int = 0) -> None:
        self._lock = threading.Lock()
        self._requests: dict[Labels, int] = defaultdict(int)
        self._seconds: dict[Labels, _Histogram] = {}
        self._batch = _Histogram(BATCH_SIZE_BUCKETS)
        self._batch_seconds = _Histogram(REQUEST_SECONDS_BUCKETS)
        self._shed: dict[str, int] = dict.fromkeys(SHED_REASONS, 0)
        self.queue_limit = queue_limit
        self.in_flight = 0  # set by the event loop only

    def observe_request(self, route: str, status: int, seconds: float) -> None:
        with self._lock:
            self._requests[(("route", route), ("status", str(status)))] += 1
            key = (("route", route),)
            if key not in self._seconds:
                self._seconds[key] = _Histogram(REQUEST_SECONDS_BUCKETS)
            self._seconds[key].observe(seconds)

    def observe_batch(self, size: int, seconds: float) -> None:
        with self._lock:
            self._batch.observe(size)
            self._batch_seconds.observe(seconds)

    def observe_shed(self, reason: str) -> None:
        with self._lock:
            self._shed[reason] += 1

    def mean_batch_seconds(self) -> float:
        """The mean time of a forward pass so far (0 before the first)."""
        with self._lock:
            hist = self._batch_seconds
            return hist.sum / hist.count if hist.count else 0.0

    def render(self) -> str:
        """The whole exposition, one metric family after another."""
        with self._lock:
            lines = [
                "# HELP vitkit_requests_total HTTP requests answered, by route and status code.",
                "# TYPE vitkit_requests_total counter",
            ]
            lines += [
                f"vitkit_requests_total{_fmt(labels)} {n}"
                for labels, n in sorted(self._requests.items())
            ]
            lines += [
                "# HELP vitkit_request_seconds Time from request to response, by route.",
                "# TYPE vitkit_request_seconds histogram",
            ]
            for labels, hist in sorted(self._seconds.items()):
                lines += hist.lines("vitkit_request_seconds", labels)
            lines += [
                "# HELP vitkit_batch_size Images per model forward pass.",
                "# TYPE vitkit_batch_size histogram",
            ]
            lines += self._batch.lines("vitkit_batch_size", ())
            lines += [
                "# HELP vitkit_batch_seconds Time of each batched forward pass.",
                "# TYPE vitkit_batch_seconds histogram",
            ]
            lines += self._batch_seconds.lines("vitkit_batch_seconds", ())
            lines += [
                "# HELP vitkit_shed_total Requests refused or dropped before the model: queue "
                "full (503), past the deadline (504), client gone, server draining (503).",
                "# TYPE vitkit_shed_total counter",
            ]
            lines += [
                f"vitkit_shed_total{_fmt((('reason', r),))} {n}" for r, n in self._shed.items()
            ]
            lines += [
                "# HELP vitkit_in_flight Requests admitted to /v1 and not yet answered.",
                "# TYPE vitkit_in_flight gauge",
                f"vitkit_in_flight {self.in_flight}",
                "# HELP vitkit_queue_limit --max-queue: admitted requests beyond it get 503.",
                "# TYPE vitkit_queue_limit gauge",
                f"vitkit_queue_limit {self.queue_limit}",
            ]
        return "\n".join(lines) + "\n"


class _Histogram:
    def __init__(self, buckets: Sequence[float]) -> None:
        self.bounds = tuple(buckets)
        self.counts = [0] * len(self.bounds)
        self.count = 0
        self.sum = 0.0

    def observe(self, value: float) -> None:
        self.count += 1
        self.sum += value
        for i, bound in enumerate(self.bounds):
            if value <= bound:
                self.counts[i] += 1

    def lines(self, name: str, labels: Labels) -> list[str]:
        out = [
            f"{name}_bucket{_fmt((*labels, ('le', _num(b))))} {c}"
            for b, c in zip(self.bounds, self.counts)
        ]
        out.append(f"{name}_bucket{_fmt((*labels, ('le', '+Inf')))} {self.count}")
        out.append(f"{name}_sum{_fmt(labels)} {_num(self.sum)}")
        out.append(f"{name}_count{_fmt(labels)} {self.count}")
        return out


def _fmt(labels: Labels) -> str:
    if not labels:
        return ""
    escaped = (
        f'{k}="{v.replace(chr(92), chr(92) * 2).replace(chr(34), chr(92) + chr(34))}"'
        for k, v in labels
    )
    return "{" + ",".join(escaped) + "}"


def _num(value: float) -> str:
    if isinstance(value, int) or (math.isfinite(value) and float(value).is_integer()):
        return str(int(value)) if abs(value) < 1e15 else repr(float(value))
    return repr(float(value))


def parse(text: str) -> dict[str, float]:
    """Sample lines of an exposition -> {'name{labels}': value} (for tests and benchmarks)."""
    samples = {}
    for line in text.splitlines():
        if line and not line.startswith("#"):
            key, _, value = line.rpartition(" ")
            samples[key] = float(value)
    return samples
