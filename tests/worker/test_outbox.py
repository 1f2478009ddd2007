"""The delivery thread's queue: batches, bounds, lingering, draining and errors."""

from __future__ import annotations

import threading
import time

import pytest

from services.worker.outbox import Outbox


class Deliveries:
    """A deliver function that records batches and can be held."""

    def __init__(self) -> None:
        self.batches: list[list[int]] = []
        self.hold = threading.Event()
        self.hold.set()
        self.entered = threading.Event()
        self.fail_next = False

    def __call__(self, batch: list[int]) -> None:
        self.entered.set()
        assert self.hold.wait(10)
        if self.fail_next:
            self.fail_next = False
            raise RuntimeError("the service is down")
        self.batches.append(batch)


def test_items_queued_during_a_delivery_go_together_in_order() -> None:
    deliveries = Deliveries()
    deliveries.hold.clear()
    box: Outbox[int] = Outbox(deliveries, max_pending=10)
    box.put(0)
    assert deliveries.entered.wait(5)
    for i in range(1, 5):
        box.put(i)
    assert box.pending() == 5
    deliveries.hold.set()
    assert box.drain(5)
    assert deliveries.batches == [[0], [1, 2, 3, 4]]
    assert box.pending() == 0


def test_a_full_outbox_makes_the_next_put_wait() -> None:
    deliveries = Deliveries()
    deliveries.hold.clear()
    box: Outbox[int] = Outbox(deliveries, max_pending=2)
    box.put(0)
    box.put(1)
    done = threading.Event()
    threading.Thread(target=lambda: (box.put(2), done.set()), daemon=True).start()
    assert not done.wait(0.3)  # two pending: the third waits
    deliveries.hold.set()
    assert done.wait(5)
    assert box.drain(5)
    assert sum(deliveries.batches, []) == [0, 1, 2]


def test_max_batch_splits_a_long_queue() -> None:
    deliveries = Deliveries()
    deliveries.hold.clear()
    box: Outbox[int] = Outbox(deliveries, max_pending=20, max_batch=3)
    for i in range(8):
        box.put(i)
    deliveries.hold.set()
    assert box.drain(5)
    assert all(len(b) <= 3 for b in deliveries.batches)
    assert sum(deliveries.batches, []) == list(range(8))


def test_linger_gathers_items_that_come_shortly_after_the_first() -> None:
    deliveries = Deliveries()
    box: Outbox[int] = Outbox(deliveries, linger=0.5)
    for i in range(3):
        box.put(i)
        time.sleep(0.05)
    assert box.drain(5)
    assert deliveries.batches == [[0, 1, 2]]


def test_a_failed_delivery_is_logged_and_the_thread_goes_on(
    caplog: pytest.LogCaptureFixture,
) -> None:
    deliveries = Deliveries()
    deliveries.fail_next = True
    box: Outbox[int] = Outbox(deliveries)
    box.put(1)
    assert box.drain(5)
    assert "could not deliver 1 finished runs" in caplog.text
    box.put(2)
    assert box.close(5)
    assert deliveries.batches == [[2]]
    with pytest.raises(RuntimeError):
        box.put(3)


def test_close_reports_what_it_could_not_deliver_in_time(caplog: pytest.LogCaptureFixture) -> None:
    deliveries = Deliveries()
    deliveries.hold.clear()
    box: Outbox[int] = Outbox(deliveries)
    box.put(1)
    assert not box.close(0.2)
    assert "1 finished runs were not delivered before shutdown" in caplog.text
    deliveries.hold.set()
