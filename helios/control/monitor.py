"""Confidence-breach monitor: a sliding window over the last `window` generated tokens; more than `max_breaches`
breaches (tokens forced out at the last loaded layer below its threshold) in it trips the monitor."""

from __future__ import annotations

from collections import deque


class BreachMonitor:
    def __init__(self, window: int = 100, max_breaches: int = 50):
        self.window = deque(maxlen=window)
        self.max_breaches = max_breaches
        self.breaches = 0  # in the window
        self.total_tokens = 0
        self.total_breaches = 0

    def observe(self, breach: bool) -> bool:
        """Adds one token; True when the window now holds more than max_breaches breaches."""
        if len(self.window) == self.window.maxlen:
            self.breaches -= self.window[0]
        self.window.append(bool(breach))
        self.breaches += bool(breach)
        self.total_tokens += 1
        self.total_breaches += bool(breach)
        return self.breaches > self.max_breaches

    def reset(self) -> None:
        """After an action: judge the new configuration on its own tokens."""
        self.window.clear()
        self.breaches = 0

    @property
    def rate(self) -> float:
        return self.breaches / len(self.window) if self.window else 0.0
