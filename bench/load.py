"""Load benchmark of the service: images/s, latency and queue overhead through real processes, vs offline sampling.

Why: the service must not cost much over calling `quantizer.diffusion.sampling.sample` directly (targets: >= 0.9x the
offline images/s, queue overhead < 5 ms p50). Run it from the repository root; it prints a markdown fragment
for docs/BENCHMARKS.md (and writes it with --out):

    python bench/load.py --jobs 960 --steps 20 --clients 32 --workers 1,2 --out runs/bench-load.md  # ~4-5 min
    python bench/load.py --quick                                    # smoke run, under a minute

What runs, all on 127.0.0.1 and all stopped on exit (errors and Ctrl-C included): a throwaway redis-server in a
temp dir (`service.testing.RedisServer`), the API (`ptq4dm serve`, PTQ4DM_REDIS_URL set) and k `ptq4dm worker`
processes with torch_threads=1 (one core each), fed by `--clients` concurrent closed-loop httpx clients: POST
/v1/generate (default), or with --api jobs POST /v1/jobs, poll with backoff and download the PNGs. The clients, API
and Redis share the machine's cores with the workers (the "cores" column says how much each used), which is why
generate is the default: 32 HTTP pollers cost a few tenths of a core that a 2-core machine takes from the workers.

Numbers, per worker count k:
- images/s: images of all jobs / (last finished_at - first created_at), both stamped by the service.
- offline images/s: `sample()` on the served UNet (same precision, sampler, steps) in k spawned processes x 1
  thread started together, batch = the workers' measured mean images per UNet pass. ratio = service / offline
  with the same process/thread layout. A 1 process x k threads run (batch k x that) is a reference row only.
- e2e latency: client clock, POST -> PNGs in hand (with --api jobs it includes the client's poll interval).
- service latency: finished_at - created_at of the job record; queue wait: started_at - created_at.
Queue overhead (idle worker): --probe-jobs jobs sent one at a time to one idle worker.
- overhead = (finished_at - created_at) - the offline compute time of the same job (median of as many
  `sample()` calls, 1 thread, batch n): everything the service adds to a job besides UNet/scheduler work -
  enqueue, the worker's wake-up and its max_wait_ms batching window, record reads and transitions, progress
  writes (at most every progress_interval_ms), PNG encoding and storage. Not included: HTTP to the client and polling.
- dispatch = started_at - created_at: the enqueue -> dequeue part alone.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import importlib.metadata
import math
import multiprocessing as mp
import os
import platform
import shlex
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from datetime import date
from pathlib import Path
from typing import TYPE_CHECKING

import httpx
import numpy as np

from quantizer.diffusion.models import BUILTIN_MODEL_NAME
from quantizer.execution.openvino import usable_cores
from service.testing import RedisServer, free_port

if TYPE_CHECKING:
    from multiprocessing.queues import Queue
    from multiprocessing.synchronize import Barrier

HOST = "127.0.0.1"
TERMINAL = ("succeeded", "failed", "cancelled")


def log(msg: str) -> None:
    print(f"[bench] {msg}", file=sys.stderr, flush=True)


# -- configuration and results -------------------------------------------------------------------------------------
@dataclass
class BenchConfig:
    model: str = BUILTIN_MODEL_NAME
    precision: str = "fp32"
    sampler: str = "ddim"
    steps: int = 20
    jobs: int = 960
    n: int = 1
    clients: int = 32
    workers: list[int] = field(default_factory=lambda: [1, 2])
    api: str = "generate"  # or "jobs" (submit + poll + GET PNGs)
    probe_jobs: int = 20
    offline_batches: int = 10
    poll_max_s: float = 0.2
    threads_ref: bool = True  # also time 1 process x k threads (reference row; slow on a busy machine)
    settings: dict[str, str] = field(default_factory=dict)  # PTQ4DM_* overrides for API, workers and offline runs
    start_timeout_s: float = 300.0
    run_timeout_s: float = 1800.0
    command: str = ""

    @classmethod
    def quick(cls, **overrides: object) -> BenchConfig:
        """A smoke run: a handful of jobs, 3 steps, one worker."""
        base = {"steps": 3, "jobs": 8, "clients": 4, "workers": [1], "probe_jobs": 3, "offline_batches": 2,
                "threads_ref": False, "start_timeout_s": 120.0, "run_timeout_s": 120.0}
        return cls(**{**base, **overrides})


@dataclass
class OfflineResult:
    processes: int
    threads: int
    batch: int
    images: int
    seconds: float
    job_s: list[float] = field(default_factory=list)  # separate n-image calls: the probe's compute reference

    @property
    def images_per_s(self) -> float:
        return self.images / self.seconds if self.seconds > 0 else math.nan


@dataclass
class JobSample:
    e2e_s: float
    n: int
    created_at: float
    started_at: float
    finished_at: float
    worker_compute_s: float = math.nan  # the worker's own timing of the passes that carried the job

    @property
    def service_s(self) -> float:
        return self.finished_at - self.created_at

    @property
    def wait_s(self) -> float:
        return self.started_at - self.created_at


@dataclass
class LoadResult:
    workers: int
    clients: int
    samples: list[JobSample]
    mean_batch: float
    cores: dict[str, float]
    offline: OfflineResult | None = None
    threads_ref: OfflineResult | None = None

    @property
    def images(self) -> int:
        return sum(s.n for s in self.samples)

    @property
    def images_per_s(self) -> float:
        span = max(s.finished_at for s in self.samples) - min(s.created_at for s in self.samples)
        return self.images / span if span > 0 else math.nan

    @property
    def ratio(self) -> float:
        return self.images_per_s / self.offline.images_per_s if self.offline else math.nan


@dataclass
class ProbeResult:
    samples: list[JobSample]
    compute_s: float = math.nan  # offline median of the same job

    @property
    def dispatch_s(self) -> list[float]:
        return [s.wait_s for s in self.samples]

    @property
    def overhead_s(self) -> list[float]:
        return [s.service_s - self.compute_s for s in self.samples]

    @property
    def in_worker_overhead_s(self) -> list[float]:
        """Service time minus the worker's timing of the same job's passes: no cross-process compute noise."""
        return [s.service_s - s.worker_compute_s for s in self.samples]


@dataclass
class BenchResult:
    config: BenchConfig
    probe: ProbeResult
    loads: list[LoadResult]
    effective: dict[str, object]  # the service settings that shape batching, as the workers saw them
    env: dict[str, str]


def pct(values: list[float], q: float) -> float:
    return float(np.percentile(values, q)) if values else math.nan


# -- processes -----------------------------------------------------------------------------------------------------
def _stop(proc: subprocess.Popen | None, timeout_s: float = 15.0) -> None:
    """SIGTERM (workers finish their batch), then SIGKILL after timeout_s."""
    if proc is None or proc.poll() is not None:
        return
    proc.terminate()
    try:
        proc.wait(timeout_s)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait(5)


def cpu_seconds(pid: int) -> float:
    """utime + stime of a live process from /proc (Linux); nan elsewhere."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
    except (OSError, ValueError, IndexError):
        return math.nan


class ServiceStack:
    """redis-server + `ptq4dm serve` + k `ptq4dm worker` as real processes; close() stops all of them."""

    def __init__(self, cfg: BenchConfig, workdir: Path) -> None:
        self.cfg = cfg
        self.workdir = workdir
        self.redis = RedisServer(workdir / "redis")
        self.api_port = free_port()
        self.api: subprocess.Popen | None = None
        self.workers: list[tuple[subprocess.Popen, int]] = []  # (process, health port)
        self._started = 0
        self._logs: list[Path] = []

    @property
    def base_url(self) -> str:
        return f"http://{HOST}:{self.api_port}"

    def env(self) -> dict[str, str]:
        env = {**os.environ, "PYTHONUNBUFFERED": "1", "OMP_NUM_THREADS": "1", "PTQ4DM_REDIS_URL": self.redis.url,
               "PTQ4DM_REDIS_PREFIX": "bench", "PTQ4DM_MODELS": self.cfg.model, "PTQ4DM_PRECISIONS": self.cfg.precision,
               "PTQ4DM_TORCH_THREADS": "1"}
        env.update({f"PTQ4DM_{k.upper()}": v for k, v in self.cfg.settings.items()})
        return env

    def _spawn(self, name: str, args: list[str]) -> subprocess.Popen:
        path = self.workdir / f"{name}.log"
        self._logs.append(path)
        with open(path, "wb") as out:  # the child keeps its own descriptor
            return subprocess.Popen([sys.executable, "-m", "service.cli", *args], env=self.env(), stdout=out,
                                    stderr=subprocess.STDOUT)

    def start(self, workers: int) -> None:
        """Start everything at once (imports overlap), then wait for every /readyz."""
        self.redis.start()
        self.api = self._spawn("api", ["serve", "--host", HOST, "--port", str(self.api_port)])
        self.scale(workers)
        self._wait_ready(self.api, f"{self.base_url}/readyz", "api")

    def scale(self, k: int) -> None:
        while len(self.workers) > k:
            _stop(self.workers.pop()[0], 60)
        new = []
        while len(self.workers) < k:
            port = free_port()
            self._started += 1
            proc = self._spawn(f"worker-{self._started}", ["worker", "--worker-id", f"bench-{self._started}",
                                                           "--health-host", HOST, "--health-port", str(port)])
            self.workers.append((proc, port))
            new.append((proc, port))
        for proc, port in new:
            self._wait_ready(proc, f"http://{HOST}:{port}/readyz", f"worker on port {port}")

    def _wait_ready(self, proc: subprocess.Popen, url: str, what: str) -> None:
        deadline = time.monotonic() + self.cfg.start_timeout_s
        while time.monotonic() < deadline:
            if proc.poll() is not None:
                raise RuntimeError(f"{what} exited with {proc.returncode}")
            with contextlib.suppress(httpx.HTTPError):
                if httpx.get(url, timeout=2).status_code == 200:
                    return
            time.sleep(0.1)
        raise RuntimeError(f"{what} not ready after {self.cfg.start_timeout_s:.0f} s")

    def batch_totals(self) -> tuple[float, float]:
        """(images, UNet passes) summed over the live workers' ptq4dm_batch_images histograms."""
        total = passes = 0.0
        for _, port in self.workers:
            for line in httpx.get(f"http://{HOST}:{port}/metrics", timeout=5).text.splitlines():
                name, _, value = line.partition(" ")
                if name == "ptq4dm_batch_images_sum":
                    total += float(value)
                elif name == "ptq4dm_batch_images_count":
                    passes += float(value)
        return total, passes

    def cpu(self) -> dict[str, float]:
        return {"workers": sum(cpu_seconds(p.pid) for p, _ in self.workers),
                "api": cpu_seconds(self.api.pid) if self.api else math.nan,
                "redis": cpu_seconds(self.redis.proc.pid) if self.redis.proc else math.nan,
                "clients": time.process_time()}

    def log_tails(self, lines: int = 15) -> str:
        out = []
        for path in self._logs:
            with contextlib.suppress(OSError):
                tail = path.read_text(errors="replace").splitlines()[-lines:]
                out.append(f"--- {path.name} ---\n" + "\n".join(tail))
        return "\n".join(out)

    def close(self) -> None:
        for proc, _ in self.workers:
            with contextlib.suppress(OSError):
                proc.terminate()
        for proc, _ in self.workers:
            _stop(proc, 30)
        self.workers.clear()
        _stop(self.api)
        self.redis.stop()


@contextlib.contextmanager
def service_stack(cfg: BenchConfig) -> Iterator[ServiceStack]:
    with tempfile.TemporaryDirectory(prefix="ptq4dm-bench-") as tmp:
        stack = ServiceStack(cfg, Path(tmp))
        try:
            yield stack
        except BaseException:
            log("failed; last lines of the service logs:\n" + stack.log_tails())
            raise
        finally:
            stack.close()


# -- clients -------------------------------------------------------------------------------------------------------
def job_body(cfg: BenchConfig, seed: int) -> dict:
    return {"sampler": cfg.sampler, "steps": cfg.steps, "n": cfg.n, "seed": seed, "precision": cfg.precision}


async def post(client: httpx.AsyncClient, path: str, body: dict, headers: dict | None = None) -> httpx.Response:
    """POST, waiting out 429 (queue full) as a polite client would."""
    while True:
        r = await client.post(path, json=body, headers=headers)
        if r.status_code != 429:
            return r
        await asyncio.sleep(float(r.headers.get("retry-after", "1")))


async def wait_final(client: httpx.AsyncClient, job_id: str, poll_max_s: float) -> dict:
    delay = 0.01
    while True:
        await asyncio.sleep(delay)
        status = (await client.get(f"/v1/jobs/{job_id}")).raise_for_status().json()
        if status["status"] in TERMINAL:
            return status
        delay = min(delay * 2, poll_max_s)


async def run_job(client: httpx.AsyncClient, cfg: BenchConfig, seed: int) -> JobSample:
    """One job end to end; its e2e clock stops when the last PNG is in hand."""
    t0 = time.perf_counter()
    if cfg.api == "generate":
        r = await post(client, "/v1/generate", job_body(cfg, seed), {"Accept": "application/json"})
        job_id = r.raise_for_status().json()["id"]
        if r.status_code == 202:
            await wait_final(client, job_id, cfg.poll_max_s)
            for k in range(cfg.n):
                (await client.get(f"/v1/jobs/{job_id}/images/{k}")).raise_for_status()
        e2e = time.perf_counter() - t0
        status = (await client.get(f"/v1/jobs/{job_id}")).raise_for_status().json()
    else:
        job_id = (await post(client, "/v1/jobs", job_body(cfg, seed))).raise_for_status().json()["id"]
        status = await wait_final(client, job_id, cfg.poll_max_s)
        if status["status"] == "succeeded":
            for k in range(cfg.n):
                (await client.get(f"/v1/jobs/{job_id}/images/{k}")).raise_for_status()
        e2e = time.perf_counter() - t0
    if status["status"] != "succeeded":
        raise RuntimeError(f"job {job_id} {status['status']}: {status.get('error')}")
    t = status["timings"]
    compute = t.get("compute_s")
    return JobSample(e2e, cfg.n, t["created_at"], t["started_at"], t["finished_at"],
                     math.nan if compute is None else compute)


async def run_clients(base_url: str, cfg: BenchConfig, jobs: int, clients: int, seed0: int = 0) -> list[JobSample]:
    """`clients` closed-loop clients share `jobs` jobs: each sends its next job when the previous one is done."""
    counter = iter(range(jobs))
    samples: list[JobSample] = []
    limits = httpx.Limits(max_connections=clients + 4, max_keepalive_connections=clients + 4)

    async def client_loop(client: httpx.AsyncClient) -> None:
        for i in counter:
            samples.append(await run_job(client, cfg, seed0 + i * cfg.n))

    async with httpx.AsyncClient(base_url=base_url, timeout=120, limits=limits) as client:
        await asyncio.wait_for(asyncio.gather(*(client_loop(client) for _ in range(clients))), cfg.run_timeout_s)
    return samples


# -- offline baseline ----------------------------------------------------------------------------------------------
def _offline_child(cfg: BenchConfig, threads: int, batch: int, batches: int, job_reps: int,
                   barrier: Barrier, results: Queue) -> None:
    """Build the UNet exactly as a worker does (ModelProvider), warm it up, then time sample() after the barrier."""
    try:
        import torch

        from quantizer.diffusion.sampling import sample
        from service.provider import ModelProvider
        from service.settings import ServiceSettings

        torch.set_num_threads(threads)
        s = ServiceSettings(**{**cfg.settings, "models": [cfg.model], "precisions": [cfg.precision]})
        provider = ModelProvider(s.model_paths, [cfg.precision], s.calibration_cache_dir, s.device, s.calibration,
                                 compile_all_buckets=True)
        provider.load_base()
        served = provider.prepare(s.default_model, cfg.precision)

        def run(size: int, steps: int) -> float:
            t0 = time.time()
            sample(served.unet, served.scheduler_config, list(range(size)), sampler=cfg.sampler, steps=steps,
                   batch_size=size)
            return time.time() - t0

        run(max(batch, cfg.n), min(cfg.steps, 2))  # a first full-size pass: allocations, kernel choice
        job_s = [run(cfg.n, cfg.steps) for _ in range(job_reps)]
        barrier.wait(600)
        t0 = time.time()
        if batches:
            sample(served.unet, served.scheduler_config, list(range(batch * batches)), sampler=cfg.sampler,
                   steps=cfg.steps, batch_size=batch)
        results.put(("ok", t0, time.time(), job_s))
    except BaseException as exc:  # the parent must hear about it rather than time out
        results.put(("error", f"{type(exc).__name__}: {exc}", 0.0, []))


def measure_offline(cfg: BenchConfig, processes: int, threads: int, batch: int, batches: int,
                    job_reps: int = 0, timeout_s: float = 900.0) -> OfflineResult:
    """`processes` spawned processes sample `batches` batches each, released together; images/s over the union."""
    ctx = mp.get_context("spawn")
    barrier, results = ctx.Barrier(processes), ctx.Queue()
    procs = [ctx.Process(target=_offline_child, args=(cfg, threads, batch, batches, job_reps, barrier, results),
                         daemon=True) for _ in range(processes)]
    for p in procs:
        p.start()
    replies = []
    try:
        for _ in procs:
            replies.append(results.get(timeout=timeout_s))
            if replies[-1][0] != "ok":  # the others would wait at the barrier
                raise RuntimeError(f"offline baseline failed: {replies[-1][1]}")
    except BaseException:  # failure, timeout, Ctrl-C: do not wait for their sampling to end
        for p in procs:
            p.kill()
        raise
    finally:
        for p in procs:
            p.join(10)
            if p.is_alive():
                p.kill()
                p.join(5)
    span = max(r[2] for r in replies) - min(r[1] for r in replies)
    return OfflineResult(processes, threads, batch, processes * batch * batches, span,
                         [t for r in replies for t in r[3]])


# -- the benchmark -------------------------------------------------------------------------------------------------
def effective_settings(cfg: BenchConfig) -> dict[str, object]:
    from service.settings import ServiceSettings

    s = ServiceSettings(**cfg.settings)
    return {k: getattr(s, k) for k in ("max_batch", "max_batch_images", "max_wait_ms", "block_ms")}


def run_probe(stack: ServiceStack, cfg: BenchConfig) -> ProbeResult:
    log(f"idle-worker probe: {cfg.probe_jobs} jobs one at a time")
    asyncio.run(run_clients(stack.base_url, cfg, 1, 1, seed0=10**6))  # warm the path, not counted
    return ProbeResult(asyncio.run(run_clients(stack.base_url, cfg, cfg.probe_jobs, 1, seed0=10**6 + 100)))


def run_load(stack: ServiceStack, cfg: BenchConfig, k: int) -> LoadResult:
    stack.scale(k)
    log(f"load: {k} worker(s), {cfg.clients} clients, {cfg.jobs} jobs x {cfg.n} images, {cfg.steps} steps")
    images0, passes0 = stack.batch_totals()
    cpu0, t0 = stack.cpu(), time.monotonic()
    samples = asyncio.run(run_clients(stack.base_url, cfg, cfg.jobs, cfg.clients))
    cpu1, wall = stack.cpu(), time.monotonic() - t0
    images1, passes1 = stack.batch_totals()
    mean_batch = (images1 - images0) / (passes1 - passes0) if passes1 > passes0 else math.nan
    cores = {role: (cpu1[role] - cpu0[role]) / wall for role in cpu0}
    result = LoadResult(k, cfg.clients, samples, mean_batch, cores)
    log(f"  {result.images_per_s:.2f} images/s, {mean_batch:.1f} images/pass")
    return result


def run_benchmark(cfg: BenchConfig) -> BenchResult:
    """Probe with one idle worker, then each worker count under load, each followed by its offline baseline."""
    env = environment()
    log("starting redis-server, the API and one worker")
    loads: list[LoadResult] = []
    with service_stack(cfg) as stack:
        stack.start(1)
        probe = run_probe(stack, cfg)
        for k in cfg.workers:
            loads.append(run_load(stack, cfg, k))
            batch = max(1, round(loads[-1].mean_batch)) if not math.isnan(loads[-1].mean_batch) else cfg.n
            log(f"offline: {k} process(es) x 1 thread, batch {batch}")
            loads[-1].offline = measure_offline(cfg, k, 1, batch, cfg.offline_batches,
                                                job_reps=cfg.probe_jobs if k == 1 else 0)
            if k == 1:
                probe.compute_s = pct(loads[-1].offline.job_s, 50)
            elif cfg.threads_ref:
                log(f"offline reference: 1 process x {k} threads, batch {batch * k}")
                loads[-1].threads_ref = measure_offline(cfg, 1, k, batch * k, cfg.offline_batches)
        if math.isnan(probe.compute_s):
            probe.compute_s = pct(measure_offline(cfg, 1, 1, cfg.n, 0, job_reps=cfg.probe_jobs).job_s, 50)
    return BenchResult(cfg, probe, loads, effective_settings(cfg), env)


# -- report --------------------------------------------------------------------------------------------------------
def environment() -> dict[str, str]:
    cpu = platform.processor() or "unknown CPU"
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    usable = usable_cores()
    load = f"{os.getloadavg()[0]:.2f}" if hasattr(os, "getloadavg") else "n/a"
    return {"torch": importlib.metadata.version("torch"), "python": platform.python_version(), "cpu": cpu,
            "cores": str(usable), "load": load, "date": date.today().isoformat()}


def _ms(x: float) -> str:
    return f"{x * 1000:.1f}"


def _s(x: float) -> str:
    return f"{x:.2f}"


def render(result: BenchResult) -> str:
    """The markdown fragment for docs/BENCHMARKS.md (also printed to stdout)."""
    c, e, p = result.config, result.env, result.probe
    eff = result.effective
    lines = [
        f"### Service load: {c.model}, {c.precision}, {c.sampler} {c.steps} steps, n={c.n} per job",
        "",
        f"`{c.command}`" if c.command else "",
        "",
        f"torch {e['torch']}, Python {e['python']}, {e['cpu']} ({e['cores']} cores usable), {e['date']}, "
        f"load average at start {e['load']}. Workers: torch_threads=1, max_batch={eff['max_batch']} jobs, "
        f"max_batch_images={eff['max_batch_images']}, max_wait_ms={eff['max_wait_ms']}; clients: "
        f"{'POST /v1/generate' if c.api == 'generate' else f'POST /v1/jobs + poll (<= {c.poll_max_s:g} s)'}.",
        "",
        "| workers | clients | images | images/s | offline images/s | ratio (target >= 0.9) | images/pass | e2e p50 s "
        "| e2e p99 s | service p50 s | service p99 s | queue wait p50 s | cores: workers/api/redis/clients |",
        "| ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | --- |",
    ]
    for r in result.loads:
        e2e, svc, wait = [s.e2e_s for s in r.samples], [s.service_s for s in r.samples], [s.wait_s for s in r.samples]
        cores = "/".join(f"{r.cores[k]:.2f}" for k in ("workers", "api", "redis", "clients"))
        off = r.offline.images_per_s if r.offline else math.nan
        lines.append(f"| {r.workers} | {r.clients} | {r.images} | {r.images_per_s:.2f} | {off:.2f} | {r.ratio:.2f} "
                     f"| {r.mean_batch:.1f} | {_s(pct(e2e, 50))} | {_s(pct(e2e, 99))} | {_s(pct(svc, 50))} "
                     f"| {_s(pct(svc, 99))} | {_s(pct(wait, 50))} | {cores} |")
    lines += ["", "Offline `quantizer.diffusion.sampling.sample` on the served UNet (spawned processes started "
              "together):", "",
              "| processes x threads | batch | images | images/s | compared with |",
              "| --- | ---: | ---: | ---: | --- |"]
    for r in result.loads:
        for off, what in ((r.offline, f"{r.workers} worker(s): the ratio"), (r.threads_ref, "reference only")):
            if off is not None:
                lines.append(f"| {off.processes} x {off.threads} | {off.batch} | {off.images} "
                             f"| {off.images_per_s:.2f} | {what} |")
    dispatch, overhead, inner = p.dispatch_s, p.overhead_s, p.in_worker_overhead_s
    lines += [
        "", f"Queue overhead, one idle worker, {len(p.samples)} jobs sent one at a time (ms):", "",
        "| offline compute per job | service time p50 | dispatch p50 | dispatch p99 | overhead p50 (target < 5) "
        "| overhead p99 | overhead vs worker's compute p50 | p99 |",
        "| ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |",
        f"| {_ms(p.compute_s)} | {_ms(pct([s.service_s for s in p.samples], 50))} | {_ms(pct(dispatch, 50))} "
        f"| {_ms(pct(dispatch, 99))} | {_ms(pct(overhead, 50))} | {_ms(pct(overhead, 99))} "
        f"| {_ms(pct(inner, 50))} | {_ms(pct(inner, 99))} |",
        "",
        "images/s = images / (last finished_at - first created_at), service clock. ratio = that / offline images/s "
        "with the same processes x 1 thread and batch = measured images/pass. e2e = client clock, POST to PNGs in "
        "hand. service = finished_at - created_at; queue wait = started_at - created_at. overhead = service "
        "time - offline compute of the same job: enqueue, worker wake-up and max_wait_ms window, record updates, "
        "progress writes, PNG encoding and storage (no client HTTP or polling); overhead vs worker's compute = service "
        "time - the worker's own timing of the passes that carried the job (timings.compute_s), the same overhead "
        "without offline-vs-worker compute noise; dispatch = started_at - created_at alone. "
        "cores = CPU seconds / wall seconds of each role during the load run.",
    ]
    return "\n".join(line for i, line in enumerate(lines) if line or lines[i - 1]) + "\n"


# -- CLI -----------------------------------------------------------------------------------------------------------
def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default=BUILTIN_MODEL_NAME, help="built-in name or a diffusers directory")
    p.add_argument("--precision", default="fp32")
    p.add_argument("--sampler", default="ddim", choices=("ddim", "ddpm"))
    p.add_argument("--steps", type=int, help="denoising steps (default 20; --quick 3)")
    p.add_argument("--jobs", type=int, help="jobs per worker count (default 960; --quick 8)")
    p.add_argument("--n", type=int, default=1, help="images per job")
    p.add_argument("--clients", type=int, help="concurrent clients (default 32; --quick 4)")
    p.add_argument("--workers", help="comma list of worker counts (default 1,2; --quick 1)")
    p.add_argument("--api", choices=("generate", "jobs"), default="generate",
                   help="generate: POST /v1/generate (default); jobs: POST /v1/jobs + poll + GET PNGs")
    p.add_argument("--probe-jobs", type=int, help="jobs for the idle-worker overhead probe (default 20; --quick 3)")
    p.add_argument("--offline-batches", type=int, help="batches per offline process (default 10; --quick 2)")
    p.add_argument("--poll-max-ms", type=float, default=200.0, help="cap of the clients' poll backoff")
    p.add_argument("--threads-ref", action=argparse.BooleanOptionalAction,
                   help="also time 1 process x k threads as a reference row (default: on; --quick: off)")
    p.add_argument("--setting", action="append", default=[], metavar="NAME=VALUE",
                   help="extra service setting for API, workers and offline runs, e.g. max_wait_ms=0 (repeatable)")
    p.add_argument("--out", type=Path, help="write the markdown fragment here")
    p.add_argument("--quick", action="store_true", help="smoke run: few jobs, 3 steps, 1 worker")
    return p.parse_args(argv)


def config_from_args(args: argparse.Namespace, command: str) -> BenchConfig:
    given = {"steps": args.steps, "jobs": args.jobs, "clients": args.clients, "probe_jobs": args.probe_jobs,
             "offline_batches": args.offline_batches, "threads_ref": args.threads_ref,
             "workers": [int(w) for w in args.workers.split(",")] if args.workers else None}
    fields = {k: v for k, v in given.items() if v is not None}
    settings = dict(s.split("=", 1) for s in args.setting)
    fields.update(model=args.model, precision=args.precision, sampler=args.sampler, n=args.n, api=args.api,
                  poll_max_s=args.poll_max_ms / 1000, settings=settings, command=command)
    cfg = BenchConfig.quick(**fields) if args.quick else BenchConfig(**fields)
    if min(cfg.workers) < 1 or cfg.jobs < 1 or cfg.clients < 1 or cfg.probe_jobs < 1 or cfg.n < 1:
        raise SystemExit("--workers, --jobs, --clients, --probe-jobs and --n must be >= 1")
    return cfg


def _interrupt(*_: object) -> None:
    raise KeyboardInterrupt


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    command = "python " + shlex.join([sys.argv[0], *(sys.argv[1:] if argv is None else argv)])
    cfg = config_from_args(args, command)
    signal.signal(signal.SIGTERM, _interrupt)  # a killed benchmark still stops its processes
    report = render(run_benchmark(cfg))
    print(report)
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(report)
        log(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
