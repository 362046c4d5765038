"""Control-plane events: every decision (profile, calibrate, select, truncate, grow, switch, reassess, failure)
with its time, reason and the numbers behind it; also logged on the `helios.control` logger."""

from __future__ import annotations

import logging
import time
from collections import Counter
from dataclasses import asdict, dataclass, field

logger = logging.getLogger("helios.control")

KINDS = ("profile", "calibrate", "select", "truncate", "grow", "switch", "reassess", "failure")


@dataclass
class Event:
    kind: str
    reason: str
    data: dict = field(default_factory=dict)
    time: float = field(default_factory=time.time)


class EventLog:
    def __init__(self, limit: int = 1000):
        self.events: list[Event] = []
        self.counts: Counter[str] = Counter()
        self.limit = limit  # keep the newest `limit` events (counts keep everything)

    def add(self, kind: str, reason: str, **data) -> Event:
        if kind not in KINDS:
            raise ValueError(f"unknown event kind {kind!r}")
        event = Event(kind, reason, data)
        self.events.append(event)
        del self.events[:-self.limit]
        self.counts[kind] += 1
        logger.info("%s: %s %s", kind, reason, data)
        return event

    def as_dicts(self) -> list[dict]:
        return [asdict(e) for e in self.events]
