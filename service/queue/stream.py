"""WorkStream: the leased streams that hand jobs to workers, and the webhook outbox their dispatchers consume.

At-least-once: an entry stays pending with its consumer until acked; a consumer that stops renewing its lease
(it died) has its entries reclaimed by another. JobStore.submit appends the entries, JobStore's state changes
append the outbox tasks.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Iterable

from service.queue.base import Delivery, WebhookTask


class WorkStream(ABC):
    """Both backends pass the same contract tests (tests/test_work_stream.py)."""

    @abstractmethod
    async def ensure_streams(self, streams: Iterable[str]) -> None:
        """Create the streams and their consumer group if missing (idempotent)."""

    @abstractmethod
    async def read(self, streams: list[str], consumer: str, count: int, block_ms: int) -> list[Delivery]:
        """Up to `count` never-delivered entries across `streams`, waiting up to `block_ms` for the first.

        Higher priorities first, with aging (service.priority): after `aging_batches` consecutive reads by this
        consumer that passed over waiting lower-priority entries, the next read starts with the lower class whose
        head waited longest. Deliveries name the class stream they came from (ack and renew take it).
        """

    @abstractmethod
    async def reclaim(self, stream: str, consumer: str, min_idle_ms: int, count: int) -> list[Delivery]:
        """Take over entries pending longer than `min_idle_ms` (their worker stopped renewing its lease), in every
        priority class of `stream`, higher classes first."""

    @abstractmethod
    async def renew(self, deliveries: Iterable[Delivery], consumer: str) -> None:
        """Reset the idle time of entries this consumer holds: the heartbeat-renewed lease."""

    @abstractmethod
    async def ack(self, delivery: Delivery) -> None:
        """Done with an entry: it leaves the pending list and the stream. Only after results are stored."""

    # -- webhook outbox (consumed by every worker's dispatcher, like a job stream) ------------------------------
    @abstractmethod
    async def read_webhooks(self, consumer: str, count: int, block_ms: int, min_idle_ms: int) -> list[WebhookTask]:
        """Up to `count` tasks: first ones pending longer than `min_idle_ms` (their dispatcher died), then new
        ones, waiting up to `block_ms` for those."""

    @abstractmethod
    async def renew_webhooks(self, tasks: Iterable[WebhookTask], consumer: str) -> None:
        """Reset the idle time of tasks this consumer is still delivering (retrying with backoff)."""

    @abstractmethod
    async def ack_webhook(self, task: WebhookTask) -> None:
        """Done (delivered, or attempts exhausted): the task leaves the outbox."""
