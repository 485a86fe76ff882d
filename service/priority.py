"""Job priorities: the request field, one queue class per level, and the read order both queue backends share.

Levels are integers 0..9 (9 is served first); the names map to low=1, normal=5, high=9. Each model+precision
stream is split into one class stream per level; the normal class keeps the stream's original name, so jobs queued
before priorities existed are still served. Workers read the classes high to low, except that after
`aging_batches` consecutive reads that passed over waiting lower-priority work, the next read starts with the
lower class whose head has waited longest: a flood of high-priority jobs delays the others, it never starves them.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Annotated, Any, Literal

from pydantic import Field, ValidationError, ValidatorFunctionWrapHandler, WrapValidator

PRIORITY_NAMES: dict[str, int] = {"low": 1, "normal": 5, "high": 9}
NORMAL = PRIORITY_NAMES["normal"]
LEVELS: tuple[int, ...] = tuple(range(9, -1, -1))  # read order: highest first
DEFAULT_AGING_BATCHES = 4
_INVALID = "priority must be 'high', 'normal', 'low' or an integer 0..9 (high=9, normal=5, low=1)"


def _one_error(value: Any, handler: ValidatorFunctionWrapHandler) -> Any:
    """One error whose `loc` ends with the field's name, instead of one per union branch."""
    try:
        return handler(value)
    except ValidationError:
        raise ValueError(_INVALID) from None


PriorityValue = Annotated[
    Annotated[int, Field(ge=0, le=9)] | Literal["high", "normal", "low"],
    Field(union_mode="left_to_right"), WrapValidator(_one_error),
]


def level(value: int | str | None) -> int:
    """The integer level of a request's priority (absent = normal)."""
    if value is None:
        return NORMAL
    return PRIORITY_NAMES[value] if isinstance(value, str) else int(value)


def class_stream(stream: str, priority: int) -> str:
    """The class stream of one level; normal keeps the plain name (queues from before priorities keep working)."""
    return stream if priority == NORMAL else f"{stream}#p{priority}"


def class_streams(streams: Iterable[str]) -> list[tuple[str, int]]:
    """(class stream, level) for every level of every stream, in strict read order: level high to low."""
    streams = list(streams)
    return [(class_stream(s, p), p) for p in LEVELS for s in streams]


def higher_classes(stream: str, priority: int) -> list[str]:
    """The class streams of `stream` whose jobs are served before one of level `priority` (queue position)."""
    return [class_stream(stream, p) for p in LEVELS if p > priority]


Head = tuple[int, int]  # the id of a class's oldest waiting entry, as (ms, seq): comparable across streams


def parse_id(msg_id: str) -> Head:
    ms, _, seq = msg_id.partition("-")
    return int(ms), int(seq or 0)


def read_order(classes: list[tuple[str, int]], heads: Mapping[str, Head | None], aging: bool) -> list[str]:
    """Class streams in the order one read takes entries from them.

    Strict priority, or with `aging`: first the class, below the highest one with waiting work, whose head has
    waited longest (then the rest in priority order).
    """
    order = [name for name, _ in classes]
    if not aging:
        return order
    waiting = [(name, lvl) for name, lvl in classes if heads.get(name) is not None]
    if not waiting:
        return order
    top = max(lvl for _, lvl in waiting)
    lower = [name for name, lvl in waiting if lvl < top]
    if not lower:
        return order
    oldest = min(lower, key=lambda name: heads[name])
    return [oldest, *(name for name in order if name != oldest)]


def passed_over(classes: list[tuple[str, int]], served: Iterable[str], heads_after: Mapping[str, Head | None]) -> bool:
    """Whether a read left work waiting in a class below the highest class it served (a step towards aging)."""
    levels = dict(classes)
    served_levels = [levels[name] for name in served if name in levels]
    if not served_levels:
        return False
    top = max(served_levels)
    return any(heads_after.get(name) is not None and lvl < top for name, lvl in classes)


@dataclass
class AgingCounter:
    """Per consumer: how many consecutive reads passed over lower-priority work; at `batches` the next read ages."""

    batches: int = DEFAULT_AGING_BATCHES

    def __post_init__(self) -> None:
        if self.batches < 1:
            raise ValueError(f"aging batches must be >= 1, got {self.batches}")
        self._streaks: dict[str, int] = {}

    def due(self, consumer: str) -> bool:
        return self._streaks.get(consumer, 0) >= self.batches

    def record(self, consumer: str, aged: bool, passed: bool) -> None:
        """After a read that served entries (an empty one changes nothing): an aging read, or one that passed nothing
        over, resets the streak."""
        self._streaks[consumer] = 0 if aged or not passed else self._streaks.get(consumer, 0) + 1
