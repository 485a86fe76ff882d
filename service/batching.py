"""Dynamic batching as pure functions: group compatible jobs, then pack their images into UNet passes.

Jobs are compatible when they run on the same stream (model+precision) with the same sampler, steps and eta:
their images can then share every UNet evaluation. Each image keeps its own seed (and class label, or prompt and
guidance), so batching never changes it.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field

from service.jobs import JobRecord


@dataclass(frozen=True)
class ImageSlot:
    job_id: str
    k: int
    seed: int
    class_label: int | None = None  # None: the model's default (unconditional, or drawn from the seed)
    prompt: str | None = None  # text-to-image: the job's prompt, negative prompt and guidance scale
    negative_prompt: str | None = None
    guidance_scale: float | None = None


@dataclass
class Pass:
    """One sample() call: up to max_batch_images images from one or more jobs."""

    slots: list[ImageSlot] = field(default_factory=list)

    @property
    def seeds(self) -> list[int]:
        return [s.seed for s in self.slots]

    @property
    def job_ids(self) -> list[str]:
        return list(dict.fromkeys(s.job_id for s in self.slots))


def compat_key(job: JobRecord) -> tuple[str, str, int, float]:
    return (job.stream, job.sampler, job.steps, float(job.eta))


def group_compatible(jobs: Iterable[JobRecord]) -> list[list[JobRecord]]:
    """Groups in order of their oldest job, jobs in arrival order within a group (FIFO stays FIFO)."""
    groups: dict[tuple, list[JobRecord]] = {}
    for job in jobs:
        groups.setdefault(compat_key(job), []).append(job)
    return list(groups.values())


def pack_passes(jobs: Iterable[JobRecord], max_images: int) -> list[Pass]:
    """Fill passes in job order; a job larger than a pass spills into the next one."""
    if max_images < 1:
        raise ValueError(f"max_images must be >= 1, got {max_images}")
    passes: list[Pass] = []
    current = Pass()
    for job in jobs:
        labels = job.class_labels or [None] * job.n
        for k, (seed, label) in enumerate(zip(job.seeds, labels, strict=True)):
            if len(current.slots) == max_images:
                passes.append(current)
                current = Pass()
            current.slots.append(ImageSlot(job.id, k, seed, label, job.prompt, job.negative_prompt,
                                           job.guidance_scale))
    if current.slots:
        passes.append(current)
    return passes


def passes_per_job(passes: list[Pass]) -> dict[str, list[int]]:
    """Pass indices each job appears in: its progress total is steps x their count."""
    out: dict[str, list[int]] = {}
    for index, p in enumerate(passes):
        for job_id in p.job_ids:
            out.setdefault(job_id, []).append(index)
    return out
