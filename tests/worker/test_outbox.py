"""The delivery thread's queue: batches, bounds, lingering, retries, the journal and adoption."""

from __future__ import annotations

import sqlite3
import threading
import time
from pathlib import Path

import pytest
from docimport.session.v1 import session_service_pb2

from services.worker.delivery import Delivery
from services.worker.journal import Journal
from services.worker.outbox import Outbox


def item(i: int) -> Delivery:
    return Delivery(
        task_id=f"task-{i}",
        session_id="s",
        document_id=f"d{i}",
        stage="extract",
        result=session_service_pb2.ReportStageResultRequest(attempt=1, task_id=f"task-{i}"),
        costs=[],
    )


def numbers(batch: list[Delivery]) -> list[int]:
    return [int(d.task_id.split("-")[1]) for d in batch]


class Deliveries:
    """A deliver function that records batches, can be held, and can fail runs."""

    def __init__(self) -> None:
        self.batches: list[list[int]] = []
        self.hold = threading.Event()
        self.hold.set()
        self.entered = threading.Event()
        self.raise_next = 0  # calls that raise
        self.refuse: dict[int, int] = {}  # run number -> calls that give it back to retry

    def __call__(self, batch: list[Delivery]) -> list[Delivery]:
        self.entered.set()
        assert self.hold.wait(10)
        if self.raise_next:
            self.raise_next -= 1
            raise RuntimeError("the service is down")
        retry = []
        for d in batch:
            n = int(d.task_id.split("-")[1])
            if self.refuse.get(n):
                self.refuse[n] -= 1
                retry.append(d)
        self.batches.append(
            [n for d, n in zip(batch, numbers(batch), strict=True) if d not in retry]
        )
        return retry


def test_items_queued_during_a_delivery_go_together_in_order() -> None:
    deliveries = Deliveries()
    deliveries.hold.clear()
    box = Outbox(deliveries, max_pending=10)
    box.put(item(0))
    assert deliveries.entered.wait(5)
    for i in range(1, 5):
        box.put(item(i))
    assert box.pending() == 5
    deliveries.hold.set()
    assert box.drain(5)
    assert deliveries.batches == [[0], [1, 2, 3, 4]]
    assert box.pending() == 0


def test_a_full_outbox_makes_the_next_put_wait() -> None:
    deliveries = Deliveries()
    deliveries.hold.clear()
    box = Outbox(deliveries, max_pending=2)
    box.put(item(0))
    box.put(item(1))
    done = threading.Event()
    threading.Thread(target=lambda: (box.put(item(2)), done.set()), daemon=True).start()
    assert not done.wait(0.3)  # two pending: the third waits
    deliveries.hold.set()
    assert done.wait(5)
    assert box.drain(5)
    assert sum(deliveries.batches, []) == [0, 1, 2]


def test_max_batch_splits_a_long_queue() -> None:
    deliveries = Deliveries()
    deliveries.hold.clear()
    box = Outbox(deliveries, max_pending=20, max_batch=3)
    for i in range(8):
        box.put(item(i))
    deliveries.hold.set()
    assert box.drain(5)
    assert all(len(b) <= 3 for b in deliveries.batches)
    assert sum(deliveries.batches, []) == list(range(8))


def test_linger_gathers_items_that_come_shortly_after_the_first() -> None:
    deliveries = Deliveries()
    box = Outbox(deliveries, linger=0.5)
    for i in range(3):
        box.put(item(i))
        time.sleep(0.05)
    assert box.drain(5)
    assert deliveries.batches == [[0, 1, 2]]


def test_a_failed_delivery_is_tried_again_until_it_goes_through(
    caplog: pytest.LogCaptureFixture,
) -> None:
    """Nothing finished is dropped: a delivery that raises is tried again, with backoff."""
    deliveries = Deliveries()
    deliveries.raise_next = 3
    box = Outbox(deliveries, retry_base=0.05, retry_max=0.2)
    began = time.monotonic()
    box.put(item(1))
    assert box.drain(10)
    # 0.05 + 0.1 + 0.2 s of backoff before the fourth call
    assert time.monotonic() - began >= 0.3
    assert deliveries.batches == [[1]]
    assert caplog.text.count("will try again") == 3
    assert box.close(5)
    with pytest.raises(RuntimeError):
        box.put(item(3))


def test_only_the_runs_given_back_are_tried_again() -> None:
    deliveries = Deliveries()
    deliveries.hold.clear()
    deliveries.refuse = {1: 2}
    box = Outbox(deliveries, retry_base=0.02)
    for i in range(3):
        box.put(item(i))
    deliveries.hold.set()
    assert box.drain(5)
    assert sorted(sum(deliveries.batches, [])) == [0, 1, 2]
    assert deliveries.batches[-1] == [1]


def test_a_run_past_its_max_age_is_given_up(caplog: pytest.LogCaptureFixture) -> None:
    deliveries = Deliveries()
    deliveries.refuse = {7: 1000}
    box = Outbox(deliveries, retry_base=0.01, retry_max=0.01, max_age=0.3)
    box.put(item(7))
    assert box.drain(5)
    assert "giving up the delivery of run task-7" in caplog.text


def test_the_journal_holds_every_run_until_it_is_delivered(tmp_path: Path) -> None:
    journal = Journal(tmp_path)
    deliveries = Deliveries()
    deliveries.hold.clear()
    box = Outbox(deliveries, journal)
    for i in range(3):
        box.put(item(i))
    assert sorted(journal.task_ids()) == ["task-0", "task-1", "task-2"]
    deliveries.hold.set()
    assert box.drain(5)
    assert journal.task_ids() == []


def test_close_leaves_what_it_could_not_deliver_in_the_journal(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    journal = Journal(tmp_path)
    deliveries = Deliveries()
    deliveries.hold.clear()
    box = Outbox(deliveries, journal)
    box.put(item(1))
    assert not box.close(0.2)
    assert "1 finished runs were not delivered before this process exits" in caplog.text
    assert journal.task_ids() == ["task-1"]
    deliveries.hold.set()


def test_another_process_adopts_the_runs_a_dead_one_left(tmp_path: Path) -> None:
    """A process killed with finished runs in its outbox: the next one delivers them, once."""
    dead = Journal(tmp_path)
    stuck = Deliveries()
    stuck.hold.clear()  # it never gets to deliver
    Outbox(stuck, dead).put(item(1))
    Outbox(stuck, dead).put(item(2))
    with sqlite3.connect(dead.path) as db:  # its process is gone (no such pid)
        db.execute("UPDATE owners SET pid = 2147483647 WHERE owner = ?", (dead.owner,))

    alive = Journal(tmp_path)
    deliveries = Deliveries()
    box = Outbox(deliveries, alive, adopt_interval=0.05)
    box.start()
    deadline = time.monotonic() + 5
    while sorted(sum(deliveries.batches, [])) != [1, 2] and time.monotonic() < deadline:
        time.sleep(0.02)
    assert sorted(sum(deliveries.batches, [])) == [1, 2]
    assert box.drain(5) and alive.task_ids() == []
    stuck.hold.set()


def test_a_live_process_keeps_its_runs(tmp_path: Path) -> None:
    mine = Journal(tmp_path)
    held = Deliveries()
    held.hold.clear()
    Outbox(held, mine).put(item(1))
    other = Deliveries()
    box = Outbox(other, Journal(tmp_path), adopt_interval=0.05)
    box.start()
    time.sleep(0.3)
    assert other.batches == []  # its owner is alive and touched the journal just now
    held.hold.set()


def test_a_delivery_round_trips_through_the_journal(tmp_path: Path) -> None:
    original = item(5)
    original.result.succeeded = True
    original.charge = "0.25 USD"
    original.needs_sync = True
    journal = Journal(tmp_path)
    journal.add(original.entry())
    with sqlite3.connect(journal.path) as db:
        db.execute("UPDATE owners SET seen = 0")
        db.execute("INSERT OR REPLACE INTO owners VALUES (?, 2147483647, 0)", (journal.owner,))
    (adopted,) = Journal(tmp_path).adopt(stale_after=1.0)
    copy = Delivery.of(adopted)
    assert (copy.task_id, copy.document_id, copy.charge, copy.needs_sync) == (
        "task-5", "d5", "0.25 USD", True)
    assert copy.request().cost.amount == "0.25" and copy.request().succeeded
