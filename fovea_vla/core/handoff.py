"""A hand-off between threads that never blocks the producer: when full, the oldest item goes.

Camera frames are perishable: when a consumer falls behind, the right thing is to skip ahead, not
to queue without bound. This queue is how the ROS callbacks hand work to the nodes' own threads, so
the executor thread only ever runs short callbacks. (rclpy's MultiThreadedExecutor busy-polls a
ready subscription whose callback group is still running a long callback, and that loop holds the
GIL: at 30 FPS with a 30 ms callback it burned a third of a core and, with timers at 200 Hz,
starved the very callbacks it was waiting for.)
"""

from __future__ import annotations

import threading
from collections import deque
from typing import Generic, TypeVar

__all__ = ["NewestQueue"]

T = TypeVar("T")


class NewestQueue(Generic[T]):
    """A bounded FIFO whose :meth:`put` never waits: a full queue drops its oldest item.

    Args:
        capacity: items kept (1: only the newest, like a depth-1 subscription).
    """

    def __init__(self, capacity: int = 1):
        if capacity < 1:
            raise ValueError(f"capacity={capacity}: must be >= 1")
        self._condition = threading.Condition()
        self._items: deque[T] = deque()
        self.capacity = capacity
        self._closed = False

    def put(self, item: T) -> bool:
        """Append ``item``; True when that pushed out an item never taken (the caller counts the drop)."""
        with self._condition:
            self._items.append(item)
            dropped = len(self._items) > self.capacity
            if dropped:
                self._items.popleft()
            self._condition.notify()
            return dropped

    def take(self, timeout_s: float | None = None) -> T | None:
        """The oldest item kept, or None after ``timeout_s`` or once closed and empty."""
        with self._condition:
            self._condition.wait_for(lambda: self._items or self._closed, timeout_s)
            return self._items.popleft() if self._items else None

    def close(self) -> None:
        """Wake every waiting :meth:`take`."""
        with self._condition:
            self._closed = True
            self._condition.notify_all()

    @property
    def closed(self) -> bool:
        return self._closed
