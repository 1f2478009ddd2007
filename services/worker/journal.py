"""The outbox's durable half: finished runs not yet delivered, in one SQLite file per worker.

Owns the file `DOCIMPORT_OUTBOX_DIR/outbox.sqlite3` and its connection in
this process. Every process of a worker (the prefork children, which
deliver, and the main process, which answers the session service's
`docimport_held` question) opens it on its own, after any fork; SQLite's
WAL mode lets them write and read at once.

A run is written here before its task returns (so before its message is
acknowledged) and deleted once the session service has its result; a
process killed in between leaves it here, and another process of the
worker (a new child, or the next worker on the same directory) adopts it:
each process touches its owner row every few seconds, and the entries of
an owner whose process is gone, or not seen for a while, are taken over. Delivering one twice is
harmless (reports and costs are idempotent), so adoption needs no more
care than that. Commits do not wait for fsync (synchronous=NORMAL): what
this guards against is a process killed, not a machine losing power (a
lost run then comes back through its lease, as before).
"""

from __future__ import annotations

import os
import sqlite3
import threading
import time
import uuid
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

FILE_NAME = "outbox.sqlite3"

_SCHEMA = """
CREATE TABLE IF NOT EXISTS runs (
    task_id     TEXT PRIMARY KEY,
    owner       TEXT NOT NULL,
    created     REAL NOT NULL,
    session_id  TEXT NOT NULL,
    document_id TEXT NOT NULL,
    stage       TEXT NOT NULL,
    result      BLOB NOT NULL,
    costs       BLOB NOT NULL,
    charge      TEXT,
    needs_sync  INTEGER NOT NULL,
    traceparent TEXT
);
CREATE TABLE IF NOT EXISTS owners (owner TEXT PRIMARY KEY, pid INTEGER, seen REAL NOT NULL);
"""


@dataclass
class Entry:
    """One finished run as stored: the serialized result and cost events, and their state."""

    task_id: str
    session_id: str
    document_id: str
    stage: str
    result: bytes  # a ReportStageResultRequest without its cost
    costs: bytes  # a RecordCostsRequest of the run's cost events
    # None: not recorded yet; "refused": the ledger refused them; else "amount currency".
    charge: str | None
    needs_sync: bool  # its artifact was written but not yet made durable
    traceparent: str | None
    created: float


class Journal:
    """The entries of one outbox directory; safe to use from several threads of a process."""

    def __init__(self, directory: Path) -> None:
        self.path = Path(directory) / FILE_NAME
        self.owner = uuid.uuid4().hex
        self._lock = threading.Lock()
        self._conn: sqlite3.Connection | None = None
        self._pid = os.getpid()  # of the process `owner` and `_conn` belong to

    def _db(self) -> sqlite3.Connection:
        """This process's connection, opened on first use (and again after a fork)."""
        if self._pid != os.getpid():  # a forked copy: a new owner, its own connection
            self._conn, self._pid, self.owner = None, os.getpid(), uuid.uuid4().hex
        if self._conn is None:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            conn = sqlite3.connect(self.path, timeout=30.0, check_same_thread=False,
                                   isolation_level=None)
            conn.execute("PRAGMA journal_mode=WAL")
            conn.execute("PRAGMA synchronous=NORMAL")
            conn.executescript(_SCHEMA)
            self._conn = conn
        return self._conn

    def add(self, entry: Entry) -> None:
        with self._lock:
            db = self._db()
            db.execute(
                "INSERT OR REPLACE INTO runs VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
                (entry.task_id, self.owner, entry.created, entry.session_id, entry.document_id,
                 entry.stage, entry.result, entry.costs, entry.charge, int(entry.needs_sync),
                 entry.traceparent),
            )

    def update(self, entry: Entry) -> None:
        """Stores what a delivery attempt learnt (the charge, the result after a failed sync)."""
        with self._lock:
            self._db().execute(
                "UPDATE runs SET result = ?, charge = ?, needs_sync = ? WHERE task_id = ?",
                (entry.result, entry.charge, int(entry.needs_sync), entry.task_id),
            )

    def remove(self, task_ids: Iterable[str]) -> None:
        ids = [(t,) for t in task_ids]
        if ids:
            with self._lock:
                self._db().executemany("DELETE FROM runs WHERE task_id = ?", ids)

    def touch(self) -> None:
        """This owner is alive (its entries are not up for adoption)."""
        with self._lock:
            self._db().execute(
                "INSERT OR REPLACE INTO owners VALUES (?, ?, ?)", (self.owner, os.getpid(), time.time())
            )

    def adopt(self, stale_after: float) -> list[Entry]:
        """Takes over the entries of owners not seen for `stale_after` seconds; returns them."""
        with self._lock:
            db = self._db()
            now = time.time()
            db.execute("BEGIN IMMEDIATE")
            try:
                live = {owner for owner, pid in db.execute(
                    "SELECT owner, pid FROM owners WHERE seen >= ?", (now - stale_after,))
                    if _running(pid)}
                live.add(self.owner)
                rows = [row for row in db.execute("SELECT * FROM runs") if row[1] not in live]
                db.executemany("UPDATE runs SET owner = ? WHERE task_id = ?",
                               [(self.owner, row[0]) for row in rows])
                db.execute("DELETE FROM owners WHERE seen < ?", (now - stale_after,))
                db.execute("COMMIT")
            except BaseException:
                db.execute("ROLLBACK")
                raise
        return [_entry(row) for row in rows]

    def task_ids(self) -> list[str]:
        """Every entry's task id, whoever owns it."""
        with self._lock:
            return [row[0] for row in self._db().execute("SELECT task_id FROM runs")]

    def close(self) -> None:
        with self._lock:
            if self._conn is not None and self._pid == os.getpid():
                self._conn.close()
            self._conn = None


def _running(pid: int) -> bool:
    """Whether a process `pid` exists here (a worker's processes share one host or pod)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _entry(row: tuple) -> Entry:  # type: ignore[type-arg]
    (task_id, _owner, created, session_id, document_id, stage, result, costs, charge,
     needs_sync, traceparent) = row
    return Entry(task_id, session_id, document_id, stage, result, costs, charge,
                 bool(needs_sync), traceparent, created)
