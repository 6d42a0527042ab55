"""Prometheus metrics of the ML backend (scraped from ``GET /metrics``)."""

from __future__ import annotations

from collections.abc import Callable

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.core import GaugeMetricFamily

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"

# Every label value comes from a fixed set: a label fed from the request (any method name, path or
# action a client invents) would make a new time series per value and grow the scrape without end.
METHODS = frozenset({"GET", "HEAD", "POST", "PUT", "PATCH", "DELETE", "OPTIONS"})
REFUSAL_REASONS = ("unauthenticated", "start_training_unauthenticated", "unknown_project", "rate_limited")


def method_label(method: str) -> str:
    return method if method in METHODS else "other"


class ServiceMetrics:
    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        r = self.registry
        self.requests = Counter("labelloop_http_requests_total", "HTTP requests by endpoint, method and status",
                                ["endpoint", "method", "status"], registry=r)
        self.latency = Histogram("labelloop_http_request_duration_seconds", "HTTP request latency by endpoint",
                                 ["endpoint"], registry=r,
                                 buckets=(0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120))
        self.predictions = Counter("labelloop_predictions_total", "Task predictions returned, by model version",
                                   ["model_version"], registry=r)
        self.prediction_errors = Counter("labelloop_prediction_errors_total",
                                         "Tasks returned without prediction, by reason kind", ["reason"], registry=r)
        self.no_model = Counter("labelloop_predict_without_model_total",
                                "/predict calls answered with no predictions because no model exists yet",
                                registry=r)
        self.errors = Counter("labelloop_http_errors_total", "Requests answered 4xx/5xx, by endpoint and status",
                              ["endpoint", "status"], registry=r)
        self.webhooks = Counter("labelloop_webhook_events_total", "Webhook events accepted, by action",
                                ["action"], registry=r)
        self.predict_seconds = Histogram("labelloop_predict_batch_seconds", "Model time per /predict call",
                                         registry=r, buckets=(0.01, 0.05, 0.1, 0.25, 0.5, 1, 2, 5, 10, 30, 60))
        self.predict_phase_seconds = Histogram(
            "labelloop_predict_phase_seconds", "Seconds per /predict call in each phase (the Server-Timing split)",
            ["phase"], registry=r, buckets=(0.005, 0.01, 0.05, 0.1, 0.25, 0.5, 1, 2, 5, 10, 30, 60))
        self.webhooks_dropped = Counter("labelloop_webhook_dropped_total",
                                        "Webhook events not queued because Redis was unavailable", ["action"],
                                        registry=r)
        self.webhooks_refused = Counter("labelloop_webhook_refused_total",
                                        "Webhook events refused or ignored, by reason (a fixed set)", ["reason"],
                                        registry=r)
        for reason in REFUSAL_REASONS:
            self.webhooks_refused.labels(reason)
        self.models_loaded = Gauge("labelloop_models_loaded", "Models held in this process's cache", registry=r)

    def watch_jobs(self, source: Callable[[], list[dict]]) -> None:
        """Export job counts and running jobs' progress, read from the job store at scrape time."""
        self.registry.register(_JobCollector(source))

    def watch_drift(self, source: Callable[[], list[dict]]) -> None:
        """Export each project's last drift report (``workflows/drift_check.py``), read at scrape time."""
        self.registry.register(_DriftCollector(source))

    def render(self) -> bytes:
        return generate_latest(self.registry)


class _JobCollector:
    def __init__(self, source: Callable[[], list[dict]]):
        self.source = source

    def describe(self):
        return []

    def collect(self):
        jobs = self.source()
        counts = GaugeMetricFamily("labelloop_jobs", "Recent jobs (last 200) by kind and state", labels=["kind", "state"])
        tally: dict[tuple[str, str], int] = {}
        for job in jobs:
            key = (str(job.get("kind")), str(job.get("state")))
            tally[key] = tally.get(key, 0) + 1
        for (kind, state), n in sorted(tally.items()):
            counts.add_metric([kind, state], n)
        yield counts
        progress = GaugeMetricFamily("labelloop_job_progress", "Progress (0-1) of running jobs",
                                     labels=["job", "kind", "project"])
        for job in jobs:
            if job.get("state") == "running":
                progress.add_metric([job["id"], str(job.get("kind")), str(job.get("project"))],
                                    float(job.get("progress") or 0))
        yield progress


class _DriftCollector:
    def __init__(self, source: Callable[[], list[dict]]):
        self.source = source

    def describe(self):
        return []

    def collect(self):
        share = GaugeMetricFamily("labelloop_drift_share_beyond",
                                  "Share of the tasks imported since the served version that lie beyond the training "
                                  "set's usual distance (about 0.05 without drift), by view",
                                  labels=["project", "view"])
        detected = GaugeMetricFamily("labelloop_drift_detected",
                                     "1 when the last check found the imported tasks drifted from the training set",
                                     labels=["project"])
        for report in self.source():
            project = str(report.get("project", ""))
            for view, values in (report.get("views") or {}).items():
                share.add_metric([project, str(view)], float(values.get("share_beyond") or 0.0))
            detected.add_metric([project], 1.0 if report.get("drifted") else 0.0)
        yield share
        yield detected
