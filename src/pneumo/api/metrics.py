"""Prometheus metrics of the API (``GET /metrics``, scope ``read``): traffic, refusals, load and drift.

- ``pneumo_http_requests_total{route,method,status}`` and ``pneumo_http_request_duration_seconds{route}``:
  traffic and latency by route template (unknown paths count as ``other``, so a scanner cannot
  grow the label set).
- ``pneumo_refusals_total{code}``: every error answer by its stable code, and every failed file
  of a batch (``unauthorized``, ``request_too_large``, ``not_a_chest_xray``, ...);
  ``pneumo_busy_total`` counts the 503s (``server_busy``, ``deadline_exceeded``).
- ``pneumo_requests_admitted``: requests analysed or waiting (the backpressure queue depth).
- Drift, the signal a site watches to see its images move away from the training data:
  ``pneumo_predictions_total{label}``, ``pneumo_positive_rate_rolling`` (share of PNEUMONIA among
  the last ``window`` answers), ``pneumo_probability`` and ``pneumo_ood_score`` (distribution of the
  out-of-distribution distance of the answered images, with buckets placed around the bundle's
  threshold; the refused ones count in ``pneumo_refusals_total{code="not_a_chest_xray"}``).

Each app has its own registry (tests build many apps in one process). Under ``pneumo serve
--workers N`` every process writes its values to ``$PROMETHEUS_MULTIPROC_DIR`` and ``/metrics``
adds them up (prometheus-client's multiprocess mode), whichever process answers the scrape.
"""

from __future__ import annotations

import os
import threading
from collections import deque

from prometheus_client import (
    CONTENT_TYPE_LATEST,
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    generate_latest,
    multiprocess,
)

#: Latency buckets (seconds): an idle prediction takes ~10-100 ms, a queued one seconds.
_LATENCY_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)
#: OOD score buckets, as multiples of the bundle's threshold (1.0 = the refusal line).
_OOD_MULTIPLES = (0.25, 0.5, 0.6, 0.7, 0.8, 0.9, 1.0, 1.25, 1.5, 2.0, 4.0)

CONTENT_TYPE = CONTENT_TYPE_LATEST


class Metrics:
    """The API's counters, gauges and histograms, in a registry of their own.

    Args:
        ood_threshold: the bundle's OOD threshold (buckets of ``pneumo_ood_score``); None: plain buckets.
        window: answers the rolling positive rate is computed over.
        positive_label: the label counted as positive.
    """

    def __init__(self, ood_threshold: float | None = None, window: int = 500, positive_label: str = "PNEUMONIA"):
        self.registry = CollectorRegistry(auto_describe=True)
        registry = self.registry
        self.requests = Counter(
            "pneumo_http_requests", "HTTP requests answered.", ["route", "method", "status"], registry=registry
        )
        self.latency = Histogram(
            "pneumo_http_request_duration_seconds",
            "Time from the request to the end of its answer.",
            ["route"],
            buckets=_LATENCY_BUCKETS,
            registry=registry,
        )
        self.refusals = Counter(
            "pneumo_refusals", "Error answers and failed batch files, by error code.", ["code"], registry=registry
        )
        self.busy = Counter("pneumo_busy", "503 answers (server_busy, deadline_exceeded).", registry=registry)
        self.admitted = Gauge(
            "pneumo_requests_admitted",
            "Requests being analysed or waiting for a worker (backpressure queue depth).",
            registry=registry,
            multiprocess_mode="livesum",
        )
        self.predictions = Counter("pneumo_predictions", "Answers given, by label.", ["label"], registry=registry)
        self.positive_rate = Gauge(
            "pneumo_positive_rate_rolling",
            f"Share of {positive_label} among the last {window} answers of this process.",
            registry=registry,
            multiprocess_mode="mostrecent",
        )
        self.probability = Histogram(
            "pneumo_probability",
            f"Calibrated probability of {positive_label} of each answer.",
            buckets=tuple(round(0.1 * i, 1) for i in range(1, 11)),
            registry=registry,
        )
        ood_buckets = (
            tuple(round(ood_threshold * m, 4) for m in _OOD_MULTIPLES)
            if ood_threshold and ood_threshold > 0
            else (0.5, 1.0, 2.0, 3.0, 4.0, 6.0, 8.0, 16.0)
        )
        self.ood_score = Histogram(
            "pneumo_ood_score",
            "Distance of each analysed image to the training X-rays (OOD gate), refused ones included.",
            buckets=ood_buckets,
            registry=registry,
        )
        self.positive_label = positive_label
        self._recent: deque[bool] = deque(maxlen=window)
        self._lock = threading.Lock()

    def observe_request(self, route: str, method: str, status: int, seconds: float, code: str | None) -> None:
        """One answered HTTP request (called by the request middleware)."""
        self.requests.labels(route, method, str(status)).inc()
        self.latency.labels(route).observe(seconds)
        if code:
            self.refused(code)
        if status == 503:
            self.busy.inc()

    def refused(self, code: str) -> None:
        """One error answer, or one failed file of a batch."""
        self.refusals.labels(code[:64]).inc()

    def observe_answer(self, label: str, probability: float, ood_score: float | None) -> None:
        """One prediction given: the drift signals."""
        self.predictions.labels(label).inc()
        self.probability.observe(probability)
        if ood_score is not None:
            self.ood_score.observe(ood_score)
        with self._lock:
            self._recent.append(label == self.positive_label)
            rate = sum(self._recent) / len(self._recent)
        self.positive_rate.set(rate)

    def exposition(self) -> bytes:
        """The text format Prometheus scrapes (every process's values under ``--workers N``)."""
        if os.environ.get("PROMETHEUS_MULTIPROC_DIR"):
            registry = CollectorRegistry()
            multiprocess.MultiProcessCollector(registry)
            return generate_latest(registry)
        return generate_latest(self.registry)
