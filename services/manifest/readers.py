"""The scan's reader processes: each one inspects the batches of files a scan sends it.

Owns the reader processes (`ReaderPool`), their lifetime (started by
`ReaderPool.start` or on first use, ended by `ReaderPool.close`) and the
wire between a scan and a reader (`Reader`): two pipes, one message per
batch each way, pickled tuples (see `content.inspect_batch`). What a reader
does to a file is `content.py`'s; what a scan does with the answers is
`scanner.py`'s.

Why not `concurrent.futures.ProcessPoolExecutor` (what this replaced): its
queue-management and queue-feeder threads pass every batch between three
threads of the scanning process, and on a 2-core machine those threads
take the GIL from the scan thread that walks and assembles rows: about 4 us
of the scan process's CPU a file, against a bare hashing loop's 30 us. Here
the scan thread itself writes a batch to a reader's pipe and reads the
answer back, with one `poll` over its readers' pipes: no thread, no lock.

Leases: a scan takes every idle reader for its duration (`ReaderPool.lease`)
and gives them back at its end, so readers never carry two scans' batches
and need no routing. A scan that finds none idle (another scan holds them
all) starts one more, up to twice the pool's size; past that it waits for
one to come back. Readers beyond the pool's size end when they come back.

Flow control (a reader and a scan must never both block writing to each
other): a scan has at most two batches out at a reader, and sends the
second only when both fit in the pipe to the reader at once
(`Reader.can_take`); the scan thread never blocks on a write while a reader
may be blocked writing its answer.

Failure: a reader that dies (killed, out of memory) closes its pipes; the
scan that held it gets `ReaderFailed` (UNAVAILABLE: scan again) naming a
file of the lost batch, the dead reader is dropped and a fresh one starts
for the next scan. A reader found dead while idle is replaced before a
scan takes it. A cancelled or failed scan's readers that still hold
batches are stopped rather than waited for (a multi-GB file can take
seconds to hash).
"""

from __future__ import annotations

import contextlib
import ctypes
import fcntl
import multiprocessing
import multiprocessing.connection
import os
import pickle
import threading
from collections import deque
from collections.abc import Iterator
from typing import Any

from services.manifest import content
from services.manifest.errors import ReaderFailed

_PICKLE = pickle.HIGHEST_PROTOCOL
_F_SETPIPE_SZ = getattr(fcntl, "F_SETPIPE_SZ", 1031)  # Linux
_WANTED_PIPE_BYTES = 1 << 20  # /proc/sys/fs/pipe-max-size, the most an unprivileged process may ask
_DEFAULT_PIPE_BYTES = 1 << 16


def _drop_privileges(uid: int | None, gid: int | None) -> None:
    if gid is not None and os.getuid() == 0:
        os.setgroups([])
        os.setgid(gid)
    if uid is not None and os.getuid() == 0:
        os.setuid(uid)


_M_TRIM_THRESHOLD, _M_MMAP_THRESHOLD = -1, -3  # glibc's mallopt parameters
_HEAP_KEPT_BYTES = 64 << 20


def _keep_freed_memory() -> None:
    """Lets glibc's malloc reuse freed memory instead of returning it to the system.

    PDFium allocates a scanned page's image stream (~1 MiB) for every page
    it loads; by default each such block is a fresh mmap, or heap memory
    trimmed back after the document closes, so every page costs ~250 page
    faults: page counting of 300 scanned pages took 0.21 s of CPU, with
    these settings 0.07 s. The cost: a reader keeps up to 64 MiB of freed
    heap. Without glibc (no `mallopt`), nothing changes.
    """
    try:
        libc = ctypes.CDLL(None)
        libc.mallopt(_M_MMAP_THRESHOLD, _HEAP_KEPT_BYTES)
        libc.mallopt(_M_TRIM_THRESHOLD, _HEAP_KEPT_BYTES)
    except (OSError, AttributeError):
        pass


def _serve(tasks: multiprocessing.connection.Connection, answers: multiprocessing.connection.Connection,
           uid: int | None, gid: int | None) -> None:
    """A reader process: batch in, results out, until the scan side closes its pipe."""
    _drop_privileges(uid, gid)
    _keep_freed_memory()
    receive, send = tasks.recv_bytes, answers.send_bytes
    loads, dumps, inspect = pickle.loads, pickle.dumps, content.inspect_batch
    while True:
        try:
            message = receive()
        except (EOFError, OSError):
            return
        batch, exclude, max_bytes = loads(message)
        send(dumps(inspect(batch, exclude, max_bytes), _PICKLE))


def encode_batch(tasks: list[Any], exclude_families: frozenset[str], max_bytes: int) -> bytes:
    """A batch as a reader receives it (see `_serve`); made once, its size known before sending."""
    return pickle.dumps((tasks, exclude_families, max_bytes), _PICKLE)


def _grow_pipe(conn: multiprocessing.connection.Connection) -> int:
    """The capacity of the pipe under `conn`, grown to 1 MiB where the system allows."""
    try:
        return fcntl.fcntl(conn.fileno(), _F_SETPIPE_SZ, _WANTED_PIPE_BYTES)
    except OSError:
        return _DEFAULT_PIPE_BYTES


class Reader:
    """One reader process and the scan side of its two pipes."""

    __slots__ = ("_answers", "_capacity", "_sizes", "_tasks", "fd", "out", "process")

    def __init__(self, context: Any, read_as: tuple[int, int] | None) -> None:
        tasks_in, self._tasks = context.Pipe(duplex=False)
        self._answers, answers_out = context.Pipe(duplex=False)
        self._capacity = _grow_pipe(self._tasks)
        _grow_pipe(self._answers)
        uid, gid = read_as if read_as else (None, None)
        self.process = context.Process(target=_serve, args=(tasks_in, answers_out, uid, gid),
                                       name="docimport-reader", daemon=True)
        self.process.start()
        tasks_in.close()  # the reader's ends: only the reader holds them now, so its death is EOF here
        answers_out.close()
        self.fd = self._answers.fileno()
        self.out: deque[Any] = deque()  # what each batch out at this reader stands for, oldest first
        self._sizes: deque[int] = deque()

    def can_take(self, size: int) -> bool:
        """True when a message of `size` bytes can be written now without any risk of blocking."""
        if not self.out:
            return True
        return len(self.out) == 1 and self._sizes[0] + size <= self._capacity

    def send(self, message: bytes, tag: Any) -> None:
        """Writes a batch from `encode_batch`; `tag` is what its answer stands for."""
        try:
            self._tasks.send_bytes(message)
        except OSError as exc:
            raise self._failed() from exc
        self.out.append(tag)
        self._sizes.append(len(message))

    def receive(self) -> tuple[Any, list[tuple[Any, ...]]]:
        """(tag, results) of the oldest batch out; blocks until it is back."""
        tag = self.out[0]
        try:
            answer = self._answers.recv_bytes()
        except (EOFError, OSError) as exc:
            raise self._failed() from exc
        self.out.popleft()
        self._sizes.popleft()
        return tag, pickle.loads(answer)

    def _failed(self) -> ReaderFailed:
        self.process.join(1.0)
        code = self.process.exitcode
        how = f"exit code {code}" if code is not None and code >= 0 else (
            f"signal {-code}" if code is not None else "its pipe closed")
        return ReaderFailed(f"a reader process ended unexpectedly ({how})")

    @property
    def alive(self) -> bool:
        return self.process.is_alive()

    def stop(self, kill: bool = False) -> None:
        """Ends the process: politely (EOF on its pipe) or, with work still out, at once."""
        if kill and self.process.is_alive():
            self.process.kill()
        for conn in (self._tasks, self._answers):
            conn.close()
        self.process.join(5.0)
        if self.process.is_alive():
            self.process.kill()
            self.process.join()


class ReaderPool:
    """`size` reader processes (forkserver: safe beside gRPC's threads), leased per scan.

    `read_as` = (uid, gid) makes the readers drop root for that user (when the
    service runs as root), so file permissions apply to scans as they would
    to a person.
    """

    def __init__(self, size: int, read_as: tuple[int, int] | None = None) -> None:
        self.size = size
        self._read_as = read_as
        self._context = multiprocessing.get_context("forkserver")
        self._context.set_forkserver_preload(["services.manifest.content", "services.manifest.readers"])
        self._idle: list[Reader] = []
        self._count = 0  # readers alive: idle + leased
        self._changed = threading.Condition()
        self._closed = False

    def start(self) -> None:
        """Starts the pool's readers now (not on the first scan)."""
        with self._changed:
            self._fill()

    def _fill(self) -> None:
        """Starts readers until the pool has its size (the caller holds the lock)."""
        while self._count < self.size:
            self._idle.append(self._start_one())

    def _start_one(self) -> Reader:
        reader = Reader(self._context, self._read_as)
        self._count += 1
        return reader

    @contextlib.contextmanager
    def lease(self) -> Iterator[list[Reader]]:
        """Every idle reader (at least one) for one scan; given back, or stopped, at the end."""
        with self._changed:
            if self._closed:
                raise RuntimeError("the reader pool is closed")
            dead = [reader for reader in self._idle if not reader.alive]  # e.g. the OOM killer, while idle
            for reader in dead:
                self._idle.remove(reader)
                self._count -= 1
                reader.stop()
            self._fill()
            while not self._idle and self._count >= 2 * self.size:
                self._changed.wait()
            if self._idle:
                readers, self._idle = self._idle, []
            else:
                readers = [self._start_one()]
        try:
            yield readers
        finally:
            self._give_back(readers)

    def _give_back(self, readers: list[Reader]) -> None:
        ended: list[tuple[Reader, bool]] = []
        with self._changed:
            for reader in readers:
                healthy = reader.alive and not reader.out
                if healthy and not self._closed and self._count - len(ended) <= self.size:
                    self._idle.append(reader)
                else:
                    ended.append((reader, not healthy))
            self._count -= len(ended)
            self._changed.notify_all()
        for reader, kill in ended:
            reader.stop(kill=kill)

    def pids(self) -> list[int]:
        """The readers' process ids (idle ones only: for a benchmark's CPU accounting)."""
        with self._changed:
            return [r.process.pid for r in self._idle if r.process.pid is not None]

    def close(self) -> None:
        with self._changed:
            self._closed = True
            idle, self._idle = self._idle, []
            self._count -= len(idle)
        for reader in idle:
            reader.stop()
