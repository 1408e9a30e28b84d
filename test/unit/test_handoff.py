"""The thread hand-offs: NewestQueue (camera messages to the frame thread), LatestTokens.wait_for_new."""

from __future__ import annotations

import threading

import pytest

from fovea_vla.core.handoff import NewestQueue
from fovea_vla.core.policy.observation import LatestTokens


def test_a_full_queue_drops_its_oldest_and_says_so():
    queue = NewestQueue(capacity=2)
    assert [queue.put(i) for i in range(4)] == [False, False, True, True]
    assert [queue.take(0.0), queue.take(0.0), queue.take(0.0)] == [2, 3, None]
    newest = NewestQueue()
    assert newest.put("a") is False and newest.put("b") is True and newest.take(0.0) == "b"
    with pytest.raises(ValueError, match="capacity=0"):
        NewestQueue(0)


def test_take_waits_for_a_producer_and_close_wakes_it():
    queue = NewestQueue()
    got = []
    consumer = threading.Thread(target=lambda: got.append(queue.take(30.0)))
    consumer.start()
    queue.put("frame")
    consumer.join(30.0)
    assert got == ["frame"]
    waiting = threading.Thread(target=lambda: got.append(queue.take(30.0)))
    waiting.start()
    queue.close()
    waiting.join(30.0)
    assert got == ["frame", None] and queue.closed and not waiting.is_alive()


def test_wait_for_new_tokens_returns_once_something_was_published():
    tokens = LatestTokens()
    assert tokens.wait_for_new(0, timeout_s=0.0) == 0  # nothing yet: times out
    result = []
    waiter = threading.Thread(target=lambda: result.append(tokens.wait_for_new(0, timeout_s=30.0)))
    waiter.start()
    tokens.publish(object())
    waiter.join(30.0)
    assert result == [1] and tokens.wait_for_new(0, timeout_s=0.0) == 1
