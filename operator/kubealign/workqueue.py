"""The runs waiting for a reconcile, for a bounded pool of worker threads.

The semantics are client-go's workqueue: a run is queued at most once however many events concern
it, and handed to at most one worker at a time; an event that arrives while its run is being
reconciled queues it again for right after. A burst of Job events becomes one or two passes, and
two workers never create the same stage.

Two lanes: ``urgent`` for runs whose Jobs moved (a stage finished: the next one is waiting to
start) and the normal lane for new, changed and resynced runs. Workers always drain the urgent
lane first, so a burst of submissions never delays the hand-over of runs already going. Inside a
lane the order is first-in, first-out.
"""

from __future__ import annotations

import threading
from collections import deque
from collections.abc import Hashable
from typing import Generic, TypeVar

K = TypeVar("K", bound=Hashable)


class WorkQueue(Generic[K]):
    def __init__(self) -> None:
        self._cond = threading.Condition()
        # Queued and not yet handed out -> whether it is urgent.
        self._dirty: dict[K, bool] = {}
        self._processing: set[K] = set()
        # A promoted key sits in both lanes; the stale copy is skipped when popped.
        self._lanes: tuple[deque[K], deque[K]] = (deque(), deque())
        self._shut = False

    def add(self, key: K, *, urgent: bool = False) -> None:
        with self._cond:
            if self._shut:
                return
            if key in self._dirty:
                if urgent and not self._dirty[key]:
                    self._dirty[key] = True
                    if key not in self._processing:
                        self._lanes[0].append(key)
                        self._cond.notify()
                return
            self._dirty[key] = urgent
            if key in self._processing:
                return  # done() queues it again
            self._lanes[0 if urgent else 1].append(key)
            self._cond.notify()

    def get(self, timeout: float | None = None) -> K | None:
        """The next key to work on (call ``done`` with it afterwards); None once shut down or timed out."""
        with self._cond:
            while True:
                for lane in self._lanes:
                    while lane:
                        key = lane.popleft()
                        if key in self._dirty and key not in self._processing:
                            del self._dirty[key]
                            self._processing.add(key)
                            return key
                if self._shut or not self._cond.wait(timeout):
                    return None

    def done(self, key: K) -> None:
        with self._cond:
            self._processing.discard(key)
            if key in self._dirty and not self._shut:
                self._lanes[0 if self._dirty[key] else 1].append(key)
                self._cond.notify()

    def shutdown(self) -> None:
        """Wake every waiting worker with None; later adds are dropped."""
        with self._cond:
            self._shut = True
            self._cond.notify_all()

    def depth(self) -> int:
        """Runs waiting (not counting those being reconciled)."""
        with self._cond:
            return len(self._dirty)
