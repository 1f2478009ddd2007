"""Scans a folder: walks it, reads every file on reader processes, assembles rows.

Owns the `Scanner` (its `ReaderPool`, see `readers.py`, is closed by
`Scanner.close`; the server's `serve()` closes it after the gRPC server has
drained), one scan's schedule (`_Scan`: batches to readers, answers back),
the walk and its safety rules, and the assembly of reader results into
`model.ManifestFile` rows (categories, plans, duplicates, e-mail families).
No SQL and no gRPC here.

Safety (DESIGN invariant 7: nothing outside the configured source roots is
ever read):
- `resolve_source` refuses a relative path or one with a `..` component
  (INVALID_ARGUMENT), and a path whose real location is under no configured
  root (PERMISSION_DENIED, whether or not it exists, so the answer does not
  reveal what exists outside the roots).
- The walk only descends real directories, never a directory symlink. A
  file symlink is followed only when its real target is a regular file
  inside the scanned folder; a link out of the folder, a broken link, a
  symlink loop and a link to a folder are listed with problem `not_a_file`.
  FIFOs, sockets and devices are listed `not_a_file` and never opened.
- Readers open the vetted real path with O_NOFOLLOW|O_NONBLOCK and check
  its (device, inode) against the walk's (see `content.py`).

Cost per file (a scan of 100,000 small files is bound by it; see
bench/manifest_scan.py): the walk does not stat a regular file. scandir's
d_type says it is one and d_ino gives its inode (its device is its
folder's, which the walk stats once per folder); the reader that opens it
`fstat`s the open file anyway, and that stat gives the row its size and
mtime and is where a file swapped for a FIFO, a device or another file
since the listing is caught (never read, listed `not_a_file` or
`unreadable`). Only files that are not read (excluded ones, symlinks,
entries that are not regular) are stat'ed by the walk. So sizes are not
known before reading: batches are cut by count (`BATCH_MAX_FILES`, after
small first batches that start every reader while the walk goes on), a file
that turns out big in a batch of several is handed back by the reader and
sent again alone (big files are hashed in parallel, not one after another
in one reader), and progress reports files seen/done and bytes hashed, with
the ETA counted in files and `bytes_total` known at the end. Rows are built
through `model.new_manifest_file` (a frozen dataclass's `__init__` costs a
tenth of a small file's budget).

Listing rules (nothing is dropped silently): hidden and system files
(.DS_Store, Thumbs.db, desktop.ini, `~$` lock files, `._` forks, dot files,
anything inside a dot folder) and files matching an `--exclude` glob are
listed with their exclusion reason and are not read at all; files of an
excluded type family are read only far enough to know their type. A folder
that cannot be listed is itself a row with problem `unreadable`.

Order: the walk visits names sorted by their bytes, depth first; a row's
`ordinal` is that order, and the first of identical files (same SHA-256)
in it is the canonical one, the others are its duplicates. Empty files
are never duplicates (they have the problem `empty` instead).

E-mail families: each attachment of an .eml is a row after its e-mail,
with `family_parent_file_id` set, the display path
`mail.eml#1/settlement_offer.pdf`, and a raw path of the e-mail's raw path,
a NUL byte and `#1/name` (a NUL never occurs in a real path, so it cannot
collide with a file). Attachments are not importable on their own: the
e-mail plan processes them with their e-mail, whose page and OCR page
counts are those of its attachments (so that pricing covers them).

Globs: `*` and `?` never cross '/', `**` matches any number of folders; a
pattern without '/' is matched against the file name at any depth, one with
'/' against the whole relative path ("**/drafts/**", "*.tmp").
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import datetime as dt
import gc
import operator
import os
import re
import select
import stat
import threading
import time
import uuid
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from services.common.errors import InvalidArgument, NotFound
from services.manifest import classify, content
from services.manifest.errors import PermissionDenied, ReaderFailed
from services.manifest.model import (
    ManifestFile,
    Progress,
    ScanOptions,
    new_manifest_file,
)
from services.manifest.readers import Reader, ReaderPool, encode_batch

BATCH_MAX_FILES = 192  # per pipe round trip; ~7 ms of small files for one reader
_WAIT_MS = 100  # how long a scan waits for answers before it looks at its cancel flag again


# ----------------------------------------------------------------- paths


def display_path(raw: bytes) -> str:
    """A path for people: undecodable bytes and control characters as \\xNN."""
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError:
        text = raw.decode("utf-8", "surrogateescape")
    if text.isprintable():
        return text
    out = []
    for ch in text:
        code = ord(ch)
        if 0xDC80 <= code <= 0xDCFF:
            out.append(f"\\x{code - 0xDC00:02x}")
        elif code < 0x20 or code == 0x7F:
            out.append(f"\\x{code:02x}")
        else:
            out.append(ch)
    return "".join(out)


def _inside(path: bytes, folder: bytes) -> bool:
    return path == folder or path.startswith(folder.rstrip(b"/") + b"/")


def resolve_source(source_path: str, roots: Sequence[Path], field_name: str = "source_path") -> bytes:
    """The real path (bytes) of a folder to scan, after the root checks."""
    if not source_path:
        raise InvalidArgument.field(field_name, "is required")
    if "\x00" in source_path:
        raise InvalidArgument.field(field_name, "must not contain NUL characters")
    if not source_path.startswith("/"):
        raise InvalidArgument.field(field_name, "must be an absolute path")
    if ".." in source_path.split("/"):
        raise InvalidArgument.field(field_name, "must not contain '..' components")
    if not roots:
        raise PermissionDenied("this service has no source roots configured (DOCIMPORT_SOURCE_ROOTS)")
    raw = os.fsencode(source_path)
    real = os.path.realpath(raw)
    real_roots = [os.path.realpath(os.fsencode(str(root))) for root in roots]
    if not any(_inside(real, root) for root in real_roots):
        allowed = ", ".join(str(r) for r in roots)
        raise PermissionDenied(f"{source_path!r} is outside the source roots this service may read ({allowed})")
    try:
        st = os.stat(real)
    except FileNotFoundError:
        raise NotFound("folder", source_path) from None
    except OSError as exc:
        raise PermissionDenied(f"{source_path!r} cannot be read: {exc.strerror}") from None
    if not stat.S_ISDIR(st.st_mode):
        raise InvalidArgument.field(field_name, "is not a folder")
    return real


def safe_relative(path: str) -> bool:
    """A relative path that stays inside its folder: no '..', not absolute, no NUL."""
    if not path or path.startswith("/") or "\x00" in path:
        return False
    return ".." not in path.split("/")


# ----------------------------------------------------------------- globs


def compile_glob(pattern: str) -> re.Pattern[str]:
    """A regex for a glob (see the module docstring for the rules)."""
    anchored = "/" in pattern.strip("/")
    body = pattern.strip("/")
    out: list[str] = []
    i = 0
    while i < len(body):
        ch = body[i]
        if body.startswith("**/", i):
            out.append("(?:.*/)?")
            i += 3
        elif body.startswith("**", i):
            out.append(".*")
            i += 2
        elif ch == "*":
            out.append("[^/]*")
            i += 1
        elif ch == "?":
            out.append("[^/]")
            i += 1
        elif ch == "[":
            end = body.find("]", i + 1)
            if end == -1:
                out.append(re.escape(ch))
                i += 1
            else:
                inner = body[i + 1:end].replace("\\", "\\\\")
                if inner.startswith("!"):
                    inner = "^" + inner[1:]
                out.append(f"[{inner}]")
                i = end + 1
        else:
            out.append(re.escape(ch))
            i += 1
    regex = "".join(out)
    if not anchored:
        regex = "(?:.*/)?" + regex
    return re.compile(regex + r"\Z", re.DOTALL)


# ----------------------------------------------------------------- walking


@dataclass(slots=True)
class _Entry:
    """A walked path; `task` is set when a reader must read it."""

    ordinal: int
    raw_path: bytes
    folders: tuple[str, ...]
    size: int
    mtime: float | None
    exclusion: str | None = None
    problem: tuple[str, str] | None = None
    task: tuple[int, bytes, bytes, int, int] | None = None
    result: tuple[Any, ...] | None = None


_kind_of = content.kind_of
_BY_NAME = operator.attrgetter("name")  # a C key: a third of a lambda's cost a file


class _Walker:
    def __init__(self, source: bytes, options: ScanOptions, cancel: threading.Event) -> None:
        self.source = source.rstrip(b"/") or b"/"
        self.globs = [(g, compile_glob(g)) for g in options.exclude_globs]
        self.cancel = cancel
        self.ordinal = 0

    def _next(self) -> int:
        self.ordinal += 1
        return self.ordinal

    def _excluded_by_glob(self, rel: bytes) -> str | None:
        if not self.globs:
            return None
        text = display_path(rel)
        for pattern, regex in self.globs:
            if regex.match(text):
                return f"excluded by --exclude {pattern}"
        return None

    def walk(self) -> Iterator[_Entry]:
        """Entries in walk order; a regular file costs no syscall of its own (d_type, d_ino)."""
        top = self._listing(self.source)
        if isinstance(top, OSError):
            raise PermissionDenied(f"the folder cannot be listed: {top.strerror}")
        try:
            top_dev = os.stat(self.source).st_dev
        except OSError as exc:
            raise PermissionDenied(f"the folder cannot be read: {exc.strerror}") from None
        stack: list[tuple[bytes, tuple[str, ...], bytes | None, int,
                          Iterator[os.DirEntry[bytes]]]] = [(b"", (), None, top_dev, top)]
        is_set = self.cancel.is_set
        exclusion_of = self._exclusion
        globs = self.globs
        may_be_hidden = classify.may_be_hidden
        while stack:
            rel_dir, folders, hidden, dev, entries = stack[-1]
            prefix = rel_dir + b"/" if rel_dir else b""
            plain = hidden is None and not globs  # only a file's own name can exclude it
            for count, entry in enumerate(entries):
                if not count & 63 and is_set():
                    return
                name = entry.name
                rel = prefix + name
                try:
                    regular = entry.is_file(follow_symlinks=False)
                except OSError:
                    regular = False
                if regular:  # the fast path: most entries are plain files; no stat (see `_Walker`)
                    self.ordinal = ordinal = self.ordinal + 1
                    if plain and not may_be_hidden(name):
                        exclusion = None
                    else:
                        exclusion = exclusion_of(rel, name, hidden)
                    if exclusion is None:
                        yield _Entry(ordinal, rel, folders, 0, None, None, None,
                                     (ordinal, entry.path, rel, dev, entry.inode()))
                        continue
                    try:  # excluded files are not read: their size and mtime come from here
                        st = entry.stat(follow_symlinks=False)
                    except OSError as exc:
                        yield _Entry(ordinal, rel, folders, 0, None, exclusion,
                                     ("unreadable", f"cannot stat: {exc.strerror}"))
                        continue
                    yield _Entry(ordinal, rel, folders, st.st_size, st.st_mtime, exclusion)
                    continue
                try:
                    is_link = entry.is_symlink()
                    is_dir = not is_link and entry.is_dir(follow_symlinks=False)
                except OSError:
                    is_link, is_dir = False, False
                if is_dir:
                    listing = self._listing(entry.path)
                    try:
                        sub_dev = entry.stat(follow_symlinks=False).st_dev
                    except OSError as exc:
                        listing = exc
                    sub_hidden = hidden if hidden is not None else (rel if name.startswith(b".") else None)
                    if isinstance(listing, OSError):
                        yield _Entry(self._next(), rel + b"/", folders, 0, None,
                                     exclusion=self._exclusion(rel + b"/", name, hidden),
                                     problem=("unreadable", f"the folder cannot be listed: {listing.strerror}"))
                        continue
                    stack.append((rel, (*folders, display_path(name)), sub_hidden, sub_dev, listing))
                    break  # descend now; this folder's iterator resumes after the subfolder
                yield self._file_entry(entry, rel, name, folders, hidden, is_link)
            else:
                stack.pop()

    def _listing(self, path: bytes) -> Iterator[os.DirEntry[bytes]] | OSError:
        try:
            with os.scandir(path) as it:
                entries = sorted(it, key=_BY_NAME)
        except OSError as exc:
            return exc
        return iter(entries)

    def _exclusion(self, rel: bytes, name: bytes, hidden: bytes | None) -> str | None:
        reason = classify.hidden_reason(name, in_hidden_folder=hidden)
        if reason is not None:
            return reason
        return self._excluded_by_glob(rel)

    def _file_entry(self, entry: os.DirEntry[bytes], rel: bytes, name: bytes,
                    folders: tuple[str, ...], hidden: bytes | None, is_link: bool) -> _Entry:
        ordinal = self._next()
        exclusion = self._exclusion(rel, name, hidden)
        try:
            st = entry.stat(follow_symlinks=False)
        except OSError as exc:
            return _Entry(ordinal, rel, folders, 0, None, exclusion,
                          ("unreadable", f"cannot stat: {exc.strerror}"))
        made = _Entry(ordinal, rel, folders, st.st_size, st.st_mtime, exclusion)
        if exclusion is not None:
            return made
        target = entry.path
        if is_link:
            problem, target, st = self._follow(entry.path)
            if problem is not None:
                made.problem = ("not_a_file", problem)
                return made
            made.size, made.mtime = st.st_size, st.st_mtime
        elif not stat.S_ISREG(st.st_mode):
            made.problem = ("not_a_file", f"{_kind_of(st.st_mode)}: not read")
            return made
        made.task = (ordinal, target, rel, st.st_dev, st.st_ino)
        return made

    def _follow(self, link: bytes) -> tuple[str | None, bytes, os.stat_result | None]:
        """(problem, real target, target stat) of a file symlink."""
        try:
            target = os.path.realpath(link, strict=True)
        except OSError as exc:
            if "loop" in str(exc).lower() or getattr(exc, "errno", None) == 40:
                return "symbolic link loop: not followed", link, None
            return "broken symbolic link (its target does not exist)", link, None
        shown = display_path(target)
        if not _inside(target, self.source):
            return f"symbolic link to {shown}, outside the scanned folder: not followed", link, None
        try:
            st = os.stat(target)
        except OSError as exc:
            return f"symbolic link whose target cannot be read: {exc.strerror}", link, None
        if stat.S_ISDIR(st.st_mode):
            link_dir = os.path.dirname(link)
            if _inside(link_dir, target):
                return f"symbolic link loop: points back to its own folder {shown}", link, None
            return f"symbolic link to a folder ({shown}): folder links are not followed", link, None
        if not stat.S_ISREG(st.st_mode):
            return f"symbolic link to {_kind_of(st.st_mode)}: not read", link, None
        return None, target, st


# ----------------------------------------------------------------- progress


class _Tracker:
    """Counters written by the scan thread and read by streams (GIL-atomic ints).

    `bytes_total` stays 0 until every file is read (the walk does not stat
    files, see `_Walker`); the ETA is counted in files.
    """

    def __init__(self) -> None:
        self.phase = "walking"
        self.files_seen = 0
        self.files_done = 0
        self.bytes_total = 0
        self.bytes_hashed = 0
        self.current_path = ""
        self.started = time.monotonic()

    def snapshot(self) -> Progress:
        elapsed = max(time.monotonic() - self.started, 1e-6)
        files_rate = self.files_done / elapsed
        bytes_rate = self.bytes_hashed / elapsed
        eta = None
        if self.phase == "hashing" and files_rate > 0:  # by files: bytes are known only once read
            eta = max(self.files_seen - self.files_done, 0) / files_rate
        return Progress(self.phase, self.files_seen, self.files_done, self.bytes_total,
                        self.bytes_hashed, self.current_path, files_rate, bytes_rate, eta)


class ScanCancelled(Exception):
    """The scan was cancelled."""


# ----------------------------------------------------------------- the scanner


@dataclass(frozen=True)
class ScanResult:
    files: list[ManifestFile]
    elapsed: float
    stats: dict[str, float] = field(default_factory=dict)


class Scanner:
    """Runs scans on `workers` reader processes (see `readers.py`).

    `read_as` = (uid, gid) makes the readers drop root for that user (when
    the service runs as root), so file permissions apply to scans as they
    would to a person.
    """

    def __init__(self, workers: int = 0, *, max_file_bytes: int = 20 * 1024**3,
                 categorizer: classify.Categorizer | None = None,
                 read_as: tuple[int, int] | None = None) -> None:
        self.workers = workers or os.cpu_count() or 1
        self.max_file_bytes = max_file_bytes
        self.categorizer = categorizer or classify.Categorizer()
        self.readers = ReaderPool(self.workers, read_as)

    def start(self) -> None:
        """Starts every reader process now (not on the first scan)."""
        self.readers.start()

    def close(self) -> None:
        self.readers.close()

    async def scan(self, source: bytes, options: ScanOptions, tracker: _Tracker | None = None) -> ScanResult:
        """Scans `source` (a real path from `resolve_source`) in a thread; cancellable."""
        tracker = tracker or _Tracker()
        cancel = threading.Event()
        loop = asyncio.get_running_loop()
        future = loop.run_in_executor(None, self.scan_blocking, source, options, tracker, cancel)
        try:
            return await asyncio.shield(future)
        except asyncio.CancelledError:
            cancel.set()
            raise

    def scan_blocking(self, source: bytes, options: ScanOptions, tracker: _Tracker,
                      cancel: threading.Event | None = None) -> ScanResult:
        """Walks, reads on the readers and assembles rows, all three overlapped."""
        cancel = cancel or threading.Event()
        with self.readers.lease() as readers, _gc_relaxed():
            return _Scan(self, readers, options, tracker, cancel).run(source)


_gc_lock = threading.Lock()
_gc_scans = 0
_gc_thresholds: tuple[int, int, int] = (0, 0, 0)
_SCAN_GC_THRESHOLD = 50_000  # new objects between young collections while a scan runs (default 700)


@contextlib.contextmanager
def _gc_relaxed() -> Iterator[None]:
    """Young-generation garbage collection made rare while any scan runs in this process.

    A scan makes two long-lived objects a file (its walk entry and its row)
    and no reference cycles; the collector, triggered every 700 new objects,
    would walk the ever larger set of live ones again and again: about 1 us
    of the scan process's CPU a file (a tenth of its instructions). Every
    50,000 new objects costs as little as no collection at all, and cyclic
    garbage made meanwhile by other threads is still collected. Counted, so
    overlapping scans restore the thresholds only when the last one ends.
    """
    global _gc_scans, _gc_thresholds
    with _gc_lock:
        if _gc_scans == 0:
            _gc_thresholds = gc.get_threshold()
            gc.set_threshold(max(_gc_thresholds[0], _SCAN_GC_THRESHOLD), *_gc_thresholds[1:])
        _gc_scans += 1
    try:
        yield
    finally:
        with _gc_lock:
            _gc_scans -= 1
            if _gc_scans == 0:
                gc.set_threshold(*_gc_thresholds)


class _Scan:
    """One scan: walks, keeps its readers busy, assembles rows as answers come back.

    Rows are assembled in walk order as soon as every entry before them is
    back from the readers, so assembly runs while the readers read instead
    of after them (on a 2-core machine a serial tail of assembly alone was
    half the bare hashing time). Batches wait in `queued` until a reader can
    take one (at most two out at a reader, see `readers.Reader.can_take`);
    the walk stops to collect answers when more than `3 x readers` wait.
    """

    def __init__(self, scanner: Scanner, readers: list[Reader], options: ScanOptions,
                 tracker: _Tracker, cancel: threading.Event) -> None:
        self.readers = readers
        self.by_fd = {reader.fd: reader for reader in readers}
        self.poll = select.poll()
        for reader in readers:
            self.poll.register(reader.fd, select.POLLIN)
        self.options = options
        self.exclude = frozenset(options.exclude_types)
        self.max_bytes = scanner.max_file_bytes
        self.assembler = _Assembler(scanner.categorizer)
        self.tracker = tracker
        self.cancel = cancel
        self.waiting: collections.deque[_Entry] = collections.deque()  # walked, not yet assembled
        self.queued: collections.deque[tuple[list[_Entry], bytes]] = collections.deque()  # not yet sent
        self.assemble_seconds = 0.0

    def run(self, source: bytes) -> ScanResult:
        started = time.perf_counter()
        tracker, waiting, queued = self.tracker, self.waiting, self.queued
        limit = 3 * len(self.readers)
        batch: list[_Entry] = []
        batch_cap = 4  # small first batches get every reader busy at once
        walked_count = 0
        for entry in _Walker(source, self.options, self.cancel).walk():
            waiting.append(entry)
            walked_count += 1
            tracker.files_seen += 1
            if entry.task is None:
                tracker.files_done += 1
                continue
            batch.append(entry)
            if len(batch) >= batch_cap:
                self.queue(batch)
                batch = []
                batch_cap = min(batch_cap * 2, BATCH_MAX_FILES)
                self.send()
                while len(queued) > limit and not self.cancel.is_set():
                    self.collect(True)
            elif walked_count % 256 == 0:
                self.collect(False)
        if self.cancel.is_set():
            raise ScanCancelled()
        if batch:
            self.queue(batch)
            self.send()
        tracker.phase = "hashing"
        walked = time.perf_counter()
        while queued or any(reader.out for reader in self.readers):
            if self.cancel.is_set():
                raise ScanCancelled()
            self.collect(True)
        read = time.perf_counter()
        self.drain()
        tracker.bytes_total = tracker.bytes_hashed
        done = time.perf_counter()
        return ScanResult(self.assembler.rows, done - started, {
            "walk": walked - started, "read": read - started, "assemble": self.assemble_seconds,
            "tail": done - read,
        })

    def send(self) -> None:
        """Hands queued batches to the least busy readers that can take one now."""
        queued, readers = self.queued, self.readers
        while queued:
            reader = min(readers, key=_load) if len(readers) > 1 else readers[0]
            items, message = queued[0]
            if not reader.can_take(len(message)):
                return
            queued.popleft()
            self._call(reader, reader.send, message, items)

    def queue(self, items: list[_Entry], first: bool = False) -> None:
        """Queues a batch, pickled once, for the next reader that can take it."""
        batch = (items, encode_batch([item.task for item in items], self.exclude, self.max_bytes))
        if first:
            self.queued.appendleft(batch)
        else:
            self.queued.append(batch)

    def collect(self, block: bool) -> None:
        """Takes in every answer that is back (waiting up to 0.1 s for one if `block`), then sends and assembles."""
        events = self.poll.poll(_WAIT_MS if block else 0)
        if not events:
            return
        tracker = self.tracker
        handed_back = content.HANDED_BACK
        for fd, _ in events:
            reader = self.by_fd[fd]
            items, results = self._call(reader, reader.receive)
            read = finished = 0
            for item, result in zip(items, results):
                if result[8] == handed_back:  # a big file: hashed alone, in parallel
                    self.queue([item], first=True)
                    continue
                item.result = result
                read += result[1]
                finished += 1
            tracker.files_done += finished
            tracker.bytes_hashed += read
            tracker.current_path = display_path(items[-1].raw_path)
        self.send()
        self.drain()

    def _call(self, reader: Reader, method: Any, *args: Any) -> Any:
        try:
            return method(*args)
        except ReaderFailed as exc:
            lost = reader.out[0] if reader.out else args[-1]
            raise ReaderFailed(f"{exc.message} while reading {display_path(lost[0].raw_path)} "
                               f"(one of {len(lost)} files); nothing was saved, scan again") from None

    def drain(self) -> None:
        begun = time.perf_counter()
        waiting = self.waiting
        ready = []
        take, keep = waiting.popleft, ready.append
        while waiting:
            head = waiting[0]
            if head.task is not None and head.result is None:
                break
            keep(take())
        self.assembler.extend(ready)
        self.assemble_seconds += time.perf_counter() - begun


def _load(reader: Reader) -> int:
    return len(reader.out)


_new_uuid = uuid.UUID.__new__
_set = object.__setattr__
_UUID_SAFE_UNKNOWN = uuid.SafeUUID.unknown
_from_timestamp = dt.datetime.fromtimestamp
_UTC = dt.UTC


class _Assembler:
    """Turns entries, in walk order, into rows: categories, plans, duplicates, families.

    File ids: a random (version 4) high part per scan and the row's ordinal
    in the low 48 bits: unique in the manifest. They are built the way
    `uuid.UUID.__setstate__` (unpickling) builds one, at half the cost of
    `UUID(int=...)`, which re-validates an int that is valid by construction.
    """

    def __init__(self, categorizer: classify.Categorizer) -> None:
        self.rows: list[ManifestFile] = []
        self._categorizer = categorizer
        self._canonical: dict[str, uuid.UUID] = {}
        self._ordinal = 0
        self._base = uuid.uuid4().int & ~((1 << 48) - 1)
        self._categories: dict[tuple[str, ...], tuple[str, int]] = {}
        self._plans: dict[tuple[str, str, bool], str] = {}  # plan_for depends on these only

    def _id(self, ordinal: int) -> uuid.UUID:
        made = _new_uuid(uuid.UUID)
        _set(made, "int", self._base | ordinal)
        _set(made, "is_safe", _UUID_SAFE_UNKNOWN)
        return made

    def extend(self, entries: Iterable[_Entry]) -> None:
        """Rows for `entries`, in order (one loop with its lookups hoisted: 100,000 rows)."""
        rows_append = self.rows.append
        categories, plans, canonical = self._categories, self._plans, self._canonical
        new_id, new_row = self._id, new_manifest_file
        ordinal = self._ordinal
        for entry in entries:
            ordinal += 1
            folders = entry.folders
            known = categories.get(folders)
            if known is None:
                category = self._categorizer.category(folders)
                known = categories[folders] = (category, self._categorizer.priority(category))
            category, priority = known
            file_id = new_id(ordinal)
            raw_path = entry.raw_path
            path = display_path(raw_path)
            result = entry.result
            if result is None:
                mtime = entry.mtime
                kind, message = entry.problem if entry.problem else (None, None)
                rows_append(new_row(
                    file_id, ordinal, path, raw_path, entry.size,
                    _from_timestamp(mtime, _UTC) if mtime is not None else None, None, "", False,
                    "other", category, priority, "unsupported", 0, 0, kind, message, None, entry.exclusion,
                ))
                continue
            (_, size, sha, mime, family, mismatch, pages, ocr, problem, message,
             excluded_type, attachments, mtime) = result
            modified = _from_timestamp(mtime, _UTC) if mtime is not None else None
            exclusion = f"excluded by --exclude-type {family}" if excluded_type else None
            if problem:
                plan = "unsupported"
            else:
                key = (mime, family, ocr > 0)
                plan = plans.get(key)
                if plan is None:
                    plan = plans[key] = classify.plan_for(classify.ContentType(mime, family), ocr)
            duplicate_of = None
            if sha is not None and problem != "empty" and exclusion is None and size > 0:
                duplicate_of = canonical.setdefault(sha, file_id)
                if duplicate_of is file_id:
                    duplicate_of = None
            rows_append(new_row(
                file_id, ordinal, path, raw_path, size, modified, sha, mime, mismatch,
                family, category, priority, plan, pages, ocr, problem, message,
                duplicate_of, exclusion,
            ))
            if attachments:
                self._ordinal = ordinal
                self._attachments(entry, attachments, file_id, path, modified, category, priority)
                ordinal = self._ordinal
        self._ordinal = ordinal

    def _attachments(self, entry: _Entry, attachments: tuple[Any, ...], parent: uuid.UUID, path: str,
                     modified: dt.datetime | None, category: str, priority: int) -> None:
        """An e-mail's attachment rows, after the e-mail's own."""
        for att in attachments:
            self._ordinal += 1
            (index, name, a_size, a_sha, a_mime, a_family, a_mismatch, a_pages, a_ocr,
             a_problem, a_message) = att
            a_content = classify.ContentType(a_mime, a_family)
            a_plan = "unsupported" if a_problem else classify.plan_for(a_content, a_ocr)
            raw_name = name.encode("utf-8", "surrogateescape")
            self.rows.append(new_manifest_file(
                self._id(self._ordinal), self._ordinal, f"{path}#{index}/{display_path(raw_name)}",
                entry.raw_path + b"\x00#" + str(index).encode() + b"/" + raw_name,
                a_size, modified, a_sha, a_mime, a_mismatch, a_family, category, priority, a_plan,
                a_pages, a_ocr, a_problem, a_message, family_parent_file_id=parent,
            ))


def new_tracker() -> _Tracker:
    return _Tracker()


Tracker = _Tracker
