"""The scan's reader processes: concurrent scans, a reader killed mid-scan, cancelled scans."""

from __future__ import annotations

import asyncio
import gc
import multiprocessing
import os
import signal
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from conftest import SAMPLE_CASE

from services.manifest import scanner as scanner_module
from services.manifest.errors import ReaderFailed
from services.manifest.model import ScanOptions
from services.manifest.scanner import ScanCancelled, Scanner, new_tracker, resolve_source


def rows(result) -> list[tuple]:  # type: ignore[no-untyped-def]
    return [(f.relative_path, f.sha256, f.page_count, f.ocr_page_count, f.problem_kind,
             f.duplicate_of_file_id is not None) for f in result.files]


def readers_of(scanner: Scanner) -> list[multiprocessing.Process]:
    """The scanner's idle reader processes."""
    pids = set(scanner.readers.pids())
    return [p for p in multiprocessing.active_children() if p.pid in pids]


@pytest.fixture
def own_scanner() -> Iterator[Scanner]:
    made = Scanner(2)
    made.start()
    yield made
    made.close()


@pytest.fixture
def many_files(tmp_path: Path) -> Path:
    folder = tmp_path / "many"
    for sub in range(4):
        (folder / f"d{sub}").mkdir(parents=True)
        for i in range(300):
            (folder / f"d{sub}" / f"{i:04}.txt").write_bytes(b"line %d\n" % i * (1 + i % 50))
    return folder


async def test_concurrent_scans_share_the_readers_and_agree(own_scanner: Scanner) -> None:
    source = resolve_source(str(SAMPLE_CASE), [SAMPLE_CASE])
    alone = await own_scanner.scan(source, ScanOptions())
    together = await asyncio.gather(*(own_scanner.scan(source, ScanOptions()) for _ in range(5)))
    assert all(rows(r) == rows(alone) for r in together)
    assert len(rows(alone)) > 10
    # Readers started while every reader was leased ended when they came back.
    assert len(readers_of(own_scanner)) == own_scanner.workers


def scan_with_readers_stopped(
    scanner: Scanner, source: bytes, cancel: threading.Event | None = None
) -> tuple[list[multiprocessing.Process], threading.Thread, list[BaseException]]:
    """Stops the scanner's readers (they take batches but answer none), then starts a scan in a thread.

    Returns once the scan has walked its first file: the readers, the thread, and
    the list that receives the scan's exception.
    """
    readers = readers_of(scanner)
    assert len(readers) == 2
    for process in readers:
        os.kill(process.pid, signal.SIGSTOP)
    tracker = new_tracker()
    failure: list[BaseException] = []

    def run() -> None:
        try:
            scanner.scan_blocking(source, ScanOptions(), tracker, cancel)
        except BaseException as exc:  # noqa: BLE001 - handed to the test thread
            failure.append(exc)

    thread = threading.Thread(target=run)
    thread.start()
    deadline = time.monotonic() + 10
    while tracker.files_seen == 0 and time.monotonic() < deadline:
        time.sleep(0.001)
    return readers, thread, failure


def test_a_reader_killed_mid_scan_fails_that_scan_only(own_scanner: Scanner, many_files: Path) -> None:
    source = resolve_source(str(many_files), [many_files])
    want = rows(own_scanner.scan_blocking(source, ScanOptions(), new_tracker()))
    readers, thread, failure = scan_with_readers_stopped(own_scanner, source)
    os.kill(readers[0].pid, signal.SIGKILL)
    os.kill(readers[1].pid, signal.SIGCONT)
    thread.join(10)
    assert not thread.is_alive()
    assert len(failure) == 1 and isinstance(failure[0], ReaderFailed), failure
    message = failure[0].message
    assert message.startswith("a reader process ended unexpectedly (signal 9) while reading d0/"), message
    assert message.endswith("; nothing was saved, scan again")
    # The dead reader is replaced: the next scan is whole and right.
    assert rows(own_scanner.scan_blocking(source, ScanOptions(), new_tracker())) == want
    assert len(readers_of(own_scanner)) == 2


def test_a_reader_that_died_while_idle_is_replaced(own_scanner: Scanner, many_files: Path) -> None:
    source = resolve_source(str(many_files), [many_files])
    want = rows(own_scanner.scan_blocking(source, ScanOptions(), new_tracker()))
    for process in readers_of(own_scanner):
        os.kill(process.pid, signal.SIGKILL)
        process.join(5)
    assert rows(own_scanner.scan_blocking(source, ScanOptions(), new_tracker())) == want


def test_a_cancelled_scan_leaves_the_readers_ready(own_scanner: Scanner, many_files: Path) -> None:
    source = resolve_source(str(many_files), [many_files])
    want = rows(own_scanner.scan_blocking(source, ScanOptions(), new_tracker()))
    cancel = threading.Event()
    # Answers held back, so the scan is cancelled with batches out.
    readers, thread, failure = scan_with_readers_stopped(own_scanner, source, cancel)
    cancel.set()
    for process in readers:
        os.kill(process.pid, signal.SIGCONT)
    thread.join(10)
    assert [type(e) for e in failure] == [ScanCancelled]
    assert rows(own_scanner.scan_blocking(source, ScanOptions(), new_tracker())) == want
    assert len(readers_of(own_scanner)) == 2


async def test_overlapping_scans_keep_young_collections_rare_until_the_last_ends(
        own_scanner: Scanner) -> None:
    source = resolve_source(str(SAMPLE_CASE), [SAMPLE_CASE])
    before = gc.get_threshold()
    assert before[0] < scanner_module._SCAN_GC_THRESHOLD
    seen = []
    first = own_scanner.scan(source, ScanOptions(), new_tracker())
    with scanner_module._gc_relaxed():  # another scan, still running when the first ends
        seen.append(gc.get_threshold())
        await first
        seen.append(gc.get_threshold())
    raised = (scanner_module._SCAN_GC_THRESHOLD, *before[1:])
    assert seen == [raised, raised] and gc.get_threshold() == before and gc.isenabled()
