"""Prometheus metrics, one registry per process role (an embedded server shares one between API and worker)."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest

LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300)


class Metrics:
    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        r = self.registry
        self.queue_depth = Gauge("ptq4dm_queue_depth", "jobs waiting per stream", ["stream"], registry=r)
        self.jobs_submitted = Counter("ptq4dm_jobs_submitted_total", "jobs accepted by the API", registry=r)
        self.jobs_rejected = Counter("ptq4dm_jobs_rejected_total", "submissions refused", ["reason"], registry=r)
        self.wait_seconds = Histogram("ptq4dm_job_wait_seconds", "submit -> start of the run", registry=r,
                                      buckets=LATENCY_BUCKETS)
        self.run_seconds = Histogram("ptq4dm_job_run_seconds", "start -> results stored", registry=r,
                                     buckets=LATENCY_BUCKETS)
        self.batch_size = Histogram("ptq4dm_batch_images", "images per UNet pass", registry=r,
                                    buckets=(1, 2, 4, 8, 16, 32, 64, 128))
        self.images = Counter("ptq4dm_images_generated_total", "PNG images stored", registry=r)
        self.jobs_finished = Counter("ptq4dm_jobs_finished_total", "jobs by final status", ["status"], registry=r)
        self.failures = Counter("ptq4dm_job_failures_total", "failed jobs by reason", ["reason"], registry=r)
        self.workers_ready = Gauge("ptq4dm_workers_ready", "workers reporting ready", registry=r)
        self.webhook_attempts = Counter("ptq4dm_webhook_attempts_total", "webhook delivery attempts by outcome "
                                        "(ok, http_error, network_error, refused)", ["outcome"], registry=r)
        self.requantizations = Counter("ptq4dm_requantizations_total", "model swaps", ["result"], registry=r)

    def render(self) -> bytes:
        return generate_latest(self.registry)
