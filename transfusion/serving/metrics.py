"""Prometheus metrics of one server, in the app's own registry (no process-global state, so two apps in one process
-- tests, a bench -- never share counters). The scheduler's counters are read at scrape time, not copied."""

from __future__ import annotations

import time

from transfusion.serving.worker import EngineWorker


class Metrics:
    """Queue depth, running batch, tokens/s, images/s, TTFT and per-image latency histograms, requests by route and
    status (counted by ``Gate``), and the scheduler's own counters (tokens, images, finished, cancelled, ...)."""

    def __init__(self, worker: EngineWorker) -> None:
        from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram
        from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

        self.registry = r = CollectorRegistry()
        self.worker = worker
        Gauge("transfusion_queue_depth", "requests waiting for a slot", registry=r).set_function(
            lambda: worker.load()["queued"])
        Gauge("transfusion_running_requests", "requests in the running batch", registry=r).set_function(
            lambda: worker.load()["running"])
        Gauge("transfusion_tokens_per_second", "text tokens sampled per second (last 10 s)", registry=r).set_function(
            lambda: worker.tokens_window.rate(time.perf_counter()))
        Gauge("transfusion_images_per_second", "images finished per second (last 10 s)", registry=r).set_function(
            lambda: worker.images_window.rate(time.perf_counter()))
        self.ttft = Histogram("transfusion_time_to_first_token_seconds", "submit to first sampled token",
                              buckets=(0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30), registry=r)
        self.image_s = Histogram("transfusion_image_seconds", "BOI to decoded image",
                                 buckets=(0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120), registry=r)
        self.requests = Counter("transfusion_requests", "HTTP requests by route and status", ["route", "status"],
                                registry=r)

        class SchedulerCounters:
            def collect(self):
                s = worker.scheduler.stats
                for name, value, doc in (("tokens", s.tokens, "text tokens sampled"),
                                         ("images", s.images, "images generated"),
                                         ("finished", s.finished, "requests finished"),
                                         ("cancellations", s.cancelled, "requests cancelled (client gone)"),
                                         ("failed", s.failed, "requests failed"),
                                         ("engine_steps", s.steps, "scheduler steps")):
                    yield CounterMetricFamily(f"transfusion_{name}", doc, value=value)
                yield GaugeMetricFamily("transfusion_peak_batch", "most requests running at once", value=s.peak_batch)

        r.register(SchedulerCounters())

    def render(self) -> bytes:
        from prometheus_client import generate_latest

        return generate_latest(self.registry)
