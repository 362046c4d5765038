"""`locked`: runs a method under its object's re-entrant `self.lock` (engines are shared between threads)."""

from __future__ import annotations

import functools


def locked(method):
    @functools.wraps(method)
    def wrapper(self, *args, **kwargs):
        with self.lock:
            return method(self, *args, **kwargs)

    return wrapper
