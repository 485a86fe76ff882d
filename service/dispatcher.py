"""The webhook dispatcher: a task in every worker process that delivers the queue's webhook outbox.

Why in the worker process: the worker is already the long-running consumer of the queue, with leases, heartbeats
and graceful shutdown; a dispatcher there needs no extra deployment, and an API-only replica stays a thin,
stateless front. Why a separate task with its own outbox instead of POSTing from the job code: generation never
waits on a receiver (each delivery runs in its own task, the UNet in its own thread), and the outbox is durable
(a Redis stream with a consumer group): the task that records a job's state change also queues its webhook, and
a dispatcher that dies mid-delivery leaves the task pending, to be reclaimed by another worker after `lease_ms`.
So delivery is at least once; receivers de-duplicate by the `webhook-id` header, which every retry repeats.
"""

from __future__ import annotations

import asyncio
import contextlib
import ipaddress
import json
import logging
import time
from datetime import UTC, datetime
from urllib.parse import urlsplit

import httpx

from service.jobs import JobRecord
from service.metrics import Metrics
from service.queue.base import QueueUnavailable, WebhookTask
from service.queue.store import JobStore
from service.queue.stream import WorkStream
from service.schemas import job_status
from service.settings import ServiceSettings
from service.webhooks import ATTEMPTS_KEPT, address_problem, backoff_s, signed_headers

log = logging.getLogger(__name__)

MAX_IN_FLIGHT = 16  # concurrent deliveries per worker process
STOP_GRACE_S = 2.0  # at shutdown, deliveries still running after this stay pending in the outbox for another worker
USER_AGENT = "ptq4dm-webhooks/0.1"


class _Refused(Exception):
    """The target is not allowed (resolved to a forbidden address, or no secret): retrying cannot help."""


class WebhookDispatcher:
    def __init__(self, settings: ServiceSettings, outbox: WorkStream, store: JobStore, consumer: str,
                 metrics: Metrics | None = None) -> None:
        self.settings = settings
        self.metrics = metrics or Metrics()
        self.outbox = outbox  # only its webhook outbox: read_webhooks, renew_webhooks, ack_webhook
        self.store = store  # the job (its record and webhook_attempts)
        self.consumer = consumer
        self._held: dict[str, WebhookTask] = {}
        self._in_flight: set[asyncio.Task] = set()
        self._next_renew = 0.0

    async def run(self, done: asyncio.Event) -> None:
        """Deliver until `done` is set; then give running deliveries a short grace and leave the rest pending."""
        s = self.settings
        timeout = httpx.Timeout(s.webhook_timeout_s)
        async with httpx.AsyncClient(timeout=timeout, follow_redirects=False, trust_env=False,
                                     headers={"user-agent": USER_AGENT}) as client:
            try:
                while not done.is_set():
                    await self._step(client, done)
            finally:
                if self._in_flight:
                    _, pending = await asyncio.wait(self._in_flight, timeout=STOP_GRACE_S)
                    for task in pending:
                        task.cancel()
                    await asyncio.gather(*pending, return_exceptions=True)

    async def _step(self, client: httpx.AsyncClient, done: asyncio.Event) -> None:
        s = self.settings
        try:
            await self._renew_due()
            free = MAX_IN_FLIGHT - len(self._in_flight)
            if free <= 0:
                await asyncio.wait(self._in_flight, timeout=s.block_ms / 1000, return_when=asyncio.FIRST_COMPLETED)
                return
            tasks = await self.outbox.read_webhooks(self.consumer, free, s.block_ms, s.lease_ms)
        except QueueUnavailable:
            with contextlib.suppress(asyncio.TimeoutError):
                await asyncio.wait_for(done.wait(), 0.5)
            return
        except Exception:
            log.exception("webhook dispatcher %s: reading the outbox failed", self.consumer)
            with contextlib.suppress(asyncio.TimeoutError):
                await asyncio.wait_for(done.wait(), 0.5)
            return
        for task in tasks:
            if task.msg_id in self._held:
                continue  # our own, reclaimed because a renewal came late: it is still being delivered
            self._held[task.msg_id] = task
            running = asyncio.create_task(self._deliver(client, task))
            self._in_flight.add(running)
            running.add_done_callback(self._in_flight.discard)

    async def _renew_due(self) -> None:
        """Keep the tasks we are still retrying ours (their backoff can outlast a lease)."""
        if self._held and time.monotonic() >= self._next_renew:
            self._next_renew = time.monotonic() + self.settings.heartbeat_ms / 1000
            await self.outbox.renew_webhooks(list(self._held.values()), self.consumer)

    async def _deliver(self, client: httpx.AsyncClient, task: WebhookTask) -> None:
        try:
            await self._attempts(client, task)
            await self.outbox.ack_webhook(task)
        except QueueUnavailable:
            log.warning("webhook %s of job %s: queue unavailable; left for a retry", task.hook, task.job_id)
        except Exception:
            log.exception("webhook %s of job %s: delivery crashed; left for a retry", task.hook, task.job_id)
        finally:
            self._held.pop(task.msg_id, None)

    async def _attempts(self, client: httpx.AsyncClient, task: WebhookTask) -> None:
        """Attempt until a 2xx, a refusal, or webhook_max_attempts; each attempt is recorded on the job."""
        s = self.settings
        job = await self.store.get(task.job_id)
        if job is None or not job.webhook:
            return  # expired: nothing left to report
        webhook_id = f"{task.job_id}_{task.event_id}"
        earlier = [a for a in job.webhook_attempts if a.get("webhook_id") == webhook_id]
        if any(a.get("ok") for a in earlier):
            return  # delivered by a dispatcher that died before acking
        body = self._body(job, task)
        attempt = len(earlier)
        while attempt < s.webhook_max_attempts:
            attempt += 1
            started = time.time()
            record = {"webhook_id": webhook_id, "event": task.hook, "attempt": attempt, "at": round(started, 6),
                      "status_code": None, "error": None, "ok": False}
            final = False
            try:
                response = await self._post(client, job.webhook, webhook_id, body)
                record["status_code"] = response.status_code
                record["ok"] = 200 <= response.status_code < 300
                outcome = "ok" if record["ok"] else "http_error"
                if not record["ok"]:
                    record["error"] = f"HTTP {response.status_code}"
            except _Refused as exc:
                record["error"], final, outcome = f"refused: {exc}", True, "refused"
            except httpx.HTTPError as exc:
                record["error"], outcome = f"{type(exc).__name__}: {exc}"[:300], "network_error"
            self.metrics.webhook_attempts.labels(outcome).inc()
            await self.store.record_webhook_attempt(job.id, record, ATTEMPTS_KEPT)
            if record["ok"] or final:
                return
            if attempt < s.webhook_max_attempts:
                await asyncio.sleep(backoff_s(attempt, s.webhook_backoff_s))
        log.warning("webhook %s of job %s: gave up after %d attempts", task.hook, task.job_id, attempt)

    @staticmethod
    def _body(job: JobRecord, task: WebhookTask) -> bytes:
        """Built once per event, so every retry sends (and signs) the same bytes."""
        now = datetime.now(UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z")
        record = job_status(job, None).model_dump(mode="json")
        return json.dumps({"type": f"job.{task.hook}", "job_id": job.id, "event_id": task.event_id,
                           "timestamp": now, "data": record}).encode()

    async def _post(self, client: httpx.AsyncClient, url: str, webhook_id: str, body: bytes) -> httpx.Response:
        s = self.settings
        if s.webhook_secret is None:
            raise _Refused("no webhook_secret is configured on this worker")
        await self._check_resolved(url)
        headers = signed_headers(s.webhook_secret.get_secret_value(), webhook_id, int(time.time()), body)
        return await client.post(url, content=body, headers=headers)

    async def _check_resolved(self, url: str) -> None:
        """Every address the host resolves to must pass the same policy as a literal one (a public name may point
        at 169.254.169.254). Resolution failures are left to the HTTP client, which reports them (and retries)."""
        parts = urlsplit(url)
        host = parts.hostname or ""
        port = parts.port or (443 if parts.scheme == "https" else 80)
        try:
            infos = await asyncio.get_running_loop().getaddrinfo(host, port, type=0)
        except OSError:
            return
        for info in infos:
            address = ipaddress.ip_address(info[4][0].split("%")[0])
            problem = address_problem(address, self.settings.webhook_allow_loopback)
            if problem is not None:
                raise _Refused(f"{host} resolves to {problem}")
