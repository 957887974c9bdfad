"""Prometheus metrics: requests, queue depth, job durations, slices per second, GPU memory."""

from __future__ import annotations

from collections.abc import Callable

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram


class Metrics:
    """One registry per app instance (tests start several)."""

    def __init__(self, queue_depth: Callable[[], float], gpu_memory: Callable[[], float] | None = None):
        self.registry = CollectorRegistry()
        self.requests = Counter("autocontour_http_requests_total", "HTTP requests", ["method", "route", "status"],
                                registry=self.registry)
        self.latency = Histogram("autocontour_http_request_seconds", "HTTP request latency", ["route"],
                                 registry=self.registry)
        self.queue = Gauge("autocontour_queue_depth", "jobs waiting for the worker", registry=self.registry)
        self.queue.set_function(queue_depth)
        self.jobs = Counter("autocontour_jobs_total", "finished jobs by outcome", ["status"], registry=self.registry)
        self.job_seconds = Histogram("autocontour_job_seconds", "job run time", registry=self.registry,
                                     buckets=(1, 5, 10, 30, 60, 120, 300, 600, 1800, 3600))
        self.slices_per_second = Gauge("autocontour_slices_per_second", "segmented slices per second, last job",
                                       registry=self.registry)
        self.slices = Counter("autocontour_slices_total", "segmented slices", registry=self.registry)
        if gpu_memory is not None:
            Gauge("autocontour_gpu_memory_bytes", "GPU memory allocated by the model process",
                  registry=self.registry).set_function(gpu_memory)
