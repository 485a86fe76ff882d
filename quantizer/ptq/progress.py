"""Calibration progress: stage callbacks, a log line every few percent with an ETA.

Calibration takes minutes on a CPU. A service log that goes quiet between "calibrating" and "calibrated" looks
hung, and a readiness endpoint needs something to show, so every loop of the calibration reports
`on_progress(stage, done, total)`; `ProgressLog` turns those calls into log lines and keeps the latest state.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import TypeVar

from tqdm.auto import tqdm

T = TypeVar("T")

# stage, work done, total work of that stage (units are the stage's own: UNet passes, layers, tensors)
ProgressFn = Callable[[str, int, int], None]


def track(items: Sequence[T], desc: str, unit: str, show: bool, on_progress: ProgressFn | None,
          weights: Sequence[int] | None = None) -> Iterator[T]:
    """Iterate `items` under a tqdm bar (when `show`) and report each finished item to `on_progress`.

    weights: the cost of each item (default 1 each), so uneven items still give an honest fraction and ETA.
    """
    costs = list(weights) if weights is not None else [1] * len(items)
    total, done = sum(costs), 0
    if on_progress is not None:
        on_progress(desc, 0, total)
    for item, cost in zip(tqdm(items, desc=desc, unit=unit, disable=not show), costs, strict=True):
        yield item
        done += cost
        if on_progress is not None:
            on_progress(desc, done, total)


@dataclass(frozen=True)
class Snapshot:
    stage: str
    fraction: float
    elapsed_s: float
    eta_s: float | None


class ProgressLog:
    """An on_progress that logs one line per `every` (fraction) of each stage, with elapsed time and ETA.

    `listener` gets every Snapshot (e.g. to show it on /readyz); `latest` holds the last one.
    """

    def __init__(self, label: str, logger: logging.Logger, every: float = 0.05,
                 listener: Callable[[Snapshot], None] | None = None) -> None:
        self.label = label
        self.logger = logger
        self.every = every
        self.listener = listener
        self.latest: Snapshot | None = None
        self._started: dict[str, float] = {}
        self._next: dict[str, float] = {}
        self._lock = threading.Lock()

    def __call__(self, stage: str, done: int, total: int) -> None:
        now = time.monotonic()
        with self._lock:
            start = self._started.setdefault(stage, now)
            fraction = done / total if total else 1.0
            elapsed = now - start
            eta = elapsed * (total - done) / done if done else None
            self.latest = Snapshot(stage, fraction, elapsed, eta)
            due = fraction >= self._next.get(stage, 0.0)
            if due:
                self._next[stage] = (int(fraction / self.every) + 1) * self.every
        if due:
            eta_text = f", ETA {eta:.0f} s" if eta is not None and done < total else ""
            self.logger.info("%s: %s %3.0f%% (%d/%d), %.0f s elapsed%s", self.label, stage, 100 * fraction,
                             done, total, elapsed, eta_text)
        if self.listener is not None:
            self.listener(self.latest)
