"""Benchmark: the manifest scan against a bare hashlib loop over the same files.

Usage::

    .venv/bin/python bench/manifest_scan.py [--small 20000] [--large 3] [--large-mb 300]
        [--workers N] [--repeat 3] [--dir DIR] [--keep] [--with-db] [--scan-only]

Prints, for a corpus of many small files and for one of a few large files,
three wall times, each the best of `--repeat` runs taken interleaved (bare,
scan, AnalyzeSource, bare, ...) with the page cache warm (the corpus is
read once before timing), so load from other processes falls on all three:

- bare hashlib: the bare minimum. The same files hashed by a plain
  `hashlib.sha256` loop (1 MiB `readinto`) on a process pool of the same
  size (`--workers`), given the file list up front: it does not walk,
  stat, sniff or build anything.
- scan: `Scanner.scan_blocking` in this process, the scanner without the
  database: walk (scandir; files are not stat'ed, the reader's fstat is
  used) + read + SHA-256 + content type + PDF page and text-layer count +
  e-mail families + assembly of the rows. DESIGN.md's
  target (ratio <= 1.3x, for both corpora) is checked on this figure, and
  the exit status says whether it was met.
- AnalyzeSource over gRPC (skipped with --scan-only): what a client sees,
  from the request to the finished manifest, from the real manifest and
  cost services each in its own process (bench/session_common.py), on a
  database made for the run: the same scan, plus pricing every file
  through the cost service's EstimateCost, plus writing every row with
  COPY and the summary, plus the progress stream. Printed as a ratio to
  the same bare time, for the record; it is not what the 1.3x target
  names, and on 2 cores it cannot be near it while pricing and saving run
  after the scan (see the printed figures).

`--with-db` also times `ManifestStore.save_scan` alone.

The machine's load average is printed: on a machine shared with other
work, every figure moves by 2x from run to run; run it a few times. With
as many workers as cores, the scan's own process (walk, hand-off, rows)
shares the cores with its workers while the bare loop's main process
mostly sleeps, so on a busy machine the ratio tends to the ratio of total
CPU seconds. That ratio is printed too ("CPU a file": the pools' workers
from /proc, this process with all its threads from `time.process_time`,
averaged over the runs; it moves far less with load than the wall times).
For small files it is about 1.28-1.32x: scan readers ~31-33 us a file
against the bare loop's ~27-28 (open + fstat + read + hash as in the bare
loop, then sniffing the type ~2.3 us for text, ~6 us for e-mail; pickling
the batch and its answers ~1 us), and the scan's own process ~6-7 us (walk
~2, rows ~2, pickling ~1) against the bare loop's ~2. For large files the
PDFs' page count adds ~0.05 s of PDFium to each 0.2 s hash (see
`content._large_pdf_pages` and `readers._keep_freed_memory`).

Corpus (generated under --dir, default a temporary folder, deleted after
unless --keep): `--small` files in case-like folders, 1-128 KiB each
(log-uniform, ~24 KiB mean, reproducible): 30% PNGs, 10% e-mails, 55% plain
text, 5% unrecognised binary; large files: scanned (image-only) PDFs of
1 MiB pages (all but the last of `--large`) and one MP4 video; and, timed
apart, `--small-pdf` one-page text PDFs. Those are apart because knowing
which pages of a PDF have a text layer means PDFium loading each page
(~150 us a page with a font, against ~5 us to hash a 5 KiB file): a scan of
small text PDFs is bound by page loading, not by reading, and no ratio to
a bare hash can be near 1 there. The figure is printed for the record;
the 1.3x target is checked on the other two corpora.
"""

from __future__ import annotations

import argparse
import asyncio
import concurrent.futures
import contextlib
import hashlib
import multiprocessing
import os
import random
import shutil
import sys
import tempfile
import threading
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "protos"))
sys.path.insert(0, str(ROOT / "bench"))

from services.manifest.model import ScanOptions  # noqa: E402
from services.manifest.scanner import Scanner, new_tracker, resolve_source  # noqa: E402

FOLDERS = ["pleadings", "discovery", "correspondence", "medical_records", "depositions",
           "expert_reports", "financial_records", "exhibits", "misc/2019", "misc/2020"]


# ----------------------------------------------------------------- corpus


def _pdf(pages: list[tuple[str | None, int]], out, filler: bytes = b"") -> None:
    """Writes a PDF: each page has a text line and/or an image stream of N bytes."""
    offsets: list[int] = []
    pos = 0

    def write(data: bytes) -> None:
        nonlocal pos
        out.write(data)
        pos += len(data)

    def obj(number: int, body: bytes) -> None:
        offsets.append(pos)
        write(b"%d 0 obj\n" % number + body + b"\nendobj\n")

    write(b"%PDF-1.7\n%\xe2\xe3\xcf\xd3\n")
    n = len(pages)
    # 1 catalog, 2 pages, 3 font, then per page: page, content, image
    kids = b" ".join(b"%d 0 R" % (4 + 3 * i) for i in range(n))
    obj(1, b"<< /Type /Catalog /Pages 2 0 R >>")
    obj(2, b"<< /Type /Pages /Kids [" + kids + b"] /Count %d >>" % n)
    obj(3, b"<< /Type /Font /Subtype /Type1 /BaseFont /Helvetica >>")
    block = (filler or os.urandom(1 << 20))
    for i, (text, image_bytes) in enumerate(pages):
        page_no, content_no, image_no = 4 + 3 * i, 5 + 3 * i, 6 + 3 * i
        resources = b"/Font << /F1 3 0 R >>" if text else b""
        if image_bytes:
            resources += b" /XObject << /Im0 %d 0 R >>" % image_no
        obj(page_no, b"<< /Type /Page /Parent 2 0 R /MediaBox [0 0 612 792] /Resources << "
            + resources + b" >> /Contents %d 0 R >>" % content_no)
        ops = b""
        if image_bytes:
            ops += b"q 612 0 0 792 0 0 cm /Im0 Do Q\n"
        if text:
            ops += b"BT /F1 12 Tf 72 720 Td (" + text.encode() + b") Tj ET\n"
        obj(content_no, b"<< /Length %d >>\nstream\n" % len(ops) + ops + b"\nendstream")
        if image_bytes:
            offsets.append(pos)
            write(b"%d 0 obj\n<< /Type /XObject /Subtype /Image /Width 1700 /Height 2200 "
                  b"/ColorSpace /DeviceGray /BitsPerComponent 8 /Filter /DCTDecode /Length %d >>\nstream\n"
                  % (image_no, image_bytes))
            left = image_bytes
            while left:
                piece = block[: min(left, len(block))]
                write(piece)
                left -= len(piece)
            write(b"\nendstream\nendobj\n")
        else:
            offsets.append(pos)
            write(b"%d 0 obj\nnull\nendobj\n" % image_no)
    xref = pos
    count = 3 + 3 * n + 1
    write(b"xref\n0 %d\n0000000000 65535 f \n" % count)
    for off in offsets:
        write(b"%010d 00000 n \n" % off)
    write(b"trailer\n<< /Size %d /Root 1 0 R >>\nstartxref\n%d\n%%%%EOF\n" % (count, xref))


def _png(size: int, rng: random.Random) -> bytes:
    return b"\x89PNG\r\n\x1a\n" + rng.randbytes(max(size - 8, 0))


def _eml(size: int, index: int, rng: random.Random) -> bytes:
    body = ("Dear counsel,\r\n" + "x" * max(size - 300, 10) + "\r\n").encode()
    return (f"From: a@example.com\r\nTo: b@example.com\r\nSubject: bench {index}\r\n"
            f"Date: Mon, 15 Jul 2024 10:32:00 -0400\r\nMessage-ID: <{index}@bench>\r\n"
            f"MIME-Version: 1.0\r\nContent-Type: text/plain; charset=utf-8\r\n\r\n").encode() + body


def make_corpus(base: Path, small: int, small_pdf: int, large: int, large_mb: int,
                seed: int = 7) -> tuple[Path, Path, Path]:
    rng = random.Random(seed)
    small_dir, pdf_dir, large_dir = base / "small", base / "small-pdf", base / "large"
    block = rng.randbytes(1 << 20)
    for folder in FOLDERS:
        (small_dir / folder).mkdir(parents=True, exist_ok=True)
        (pdf_dir / folder).mkdir(parents=True, exist_ok=True)
    for i in range(small_pdf):
        with open(pdf_dir / FOLDERS[i % len(FOLDERS)] / f"doc_{i:06d}.pdf", "wb") as out:
            _pdf([(f"Document {i} of the bench corpus", 0)], out)
    for i in range(small):
        folder = FOLDERS[i % len(FOLDERS)]
        size = int(2 ** rng.uniform(10, 17))
        kind = rng.random()
        if kind < 0.30:
            path, data = small_dir / folder / f"photo_{i:06d}.png", _png(size, rng)
        elif kind < 0.40:
            path, data = small_dir / folder / f"mail_{i:06d}.eml", _eml(size, i, rng)
        elif kind < 0.95:
            path = small_dir / folder / f"notes_{i:06d}.txt"
            data = (f"note {i}\n" * (size // 8 + 1)).encode()[:size]
        else:
            path = small_dir / folder / f"data_{i:06d}.dat"
            offset = rng.randrange(0, (1 << 20) - size)
            data = b"\x00\x01" + i.to_bytes(8, "big") + block[offset:offset + size]
        path.write_bytes(data)
    large_dir.mkdir(parents=True, exist_ok=True)
    page_bytes = 1 << 20
    for i in range(large):
        if i < large - 1 or large == 1:
            pages = max(large_mb * (1 << 20) // page_bytes, 1)
            with open(large_dir / f"scanned_{i}.pdf", "wb", buffering=1 << 20) as out:
                _pdf([(None, page_bytes)] * pages, out, filler=block)
        else:
            with open(large_dir / f"video_{i}.mp4", "wb", buffering=1 << 20) as out:
                out.write(b"\x00\x00\x00\x18ftypmp42\x00\x00\x00\x00mp42isom")
                for _ in range(large_mb):
                    out.write(block)
    return small_dir, pdf_dir, large_dir


# ----------------------------------------------------------------- baseline


def _hash_files(paths: list[bytes]) -> int:
    buf = bytearray(1 << 20)
    view = memoryview(buf)
    total = 0
    for path in paths:
        digest = hashlib.sha256()
        with open(path, "rb", buffering=0) as f:
            while n := f.readinto(buf):
                digest.update(view[:n])
                total += n
        digest.hexdigest()
    return total


def _list_files(folder: Path) -> list[tuple[bytes, int]]:
    found = []
    for dirpath, _dirs, files in os.walk(os.fsencode(folder)):
        for name in files:
            path = os.path.join(dirpath, name)
            found.append((path, os.stat(path).st_size))
    return found


def baseline(pool: concurrent.futures.ProcessPoolExecutor, files: list[tuple[bytes, int]]) -> float:
    """The bare minimum: batches of <=128 files / 64 MiB hashed on the pool."""
    batches: list[list[bytes]] = []
    batch: list[bytes] = []
    size = 0
    for path, length in files:
        if batch and (len(batch) >= 128 or size + length > 64 << 20):
            batches.append(batch)
            batch, size = [], 0
        batch.append(path)
        size += length
    if batch:
        batches.append(batch)
    start = time.perf_counter()
    list(pool.map(_hash_files, batches))
    return time.perf_counter() - start


def _warm_cache(files: list[tuple[bytes, int]]) -> None:
    buf = bytearray(1 << 20)
    for path, _ in files:
        with open(path, "rb", buffering=0) as f:
            while f.readinto(buf):
                pass


def run_scan(scanner: Scanner, folder: Path) -> tuple[float, int, dict[str, float]]:
    source = resolve_source(str(folder), [folder])
    start = time.perf_counter()
    result = scanner.scan_blocking(source, ScanOptions(), new_tracker(), threading.Event())
    return time.perf_counter() - start, len(result.files), result.stats


_TICK = os.sysconf("SC_CLK_TCK") if hasattr(os, "sysconf") else 100


def pool_cpu(pool: concurrent.futures.ProcessPoolExecutor | Scanner) -> float:
    """CPU seconds (user + system) used so far by a pool's worker processes (Linux /proc; else 0)."""
    total = 0
    pids = pool.readers.pids() if isinstance(pool, Scanner) else list(getattr(pool, "_processes", None) or {})
    for pid in pids:
        try:
            with open(f"/proc/{pid}/stat", "rb") as f:
                fields = f.read().rpartition(b")")[2].split()
        except OSError:
            return 0.0
        total += int(fields[11]) + int(fields[12])  # utime, stime (fields 14 and 15 of stat)
    return total / _TICK


class CpuMeter:
    """CPU seconds of a timed run: in this process (all its threads) and in a pool's workers."""

    def __init__(self, pool: concurrent.futures.ProcessPoolExecutor | Scanner | None) -> None:
        self.pool = pool
        self.main = self.workers = 0.0

    def __enter__(self) -> CpuMeter:
        self._main, self._workers = time.process_time(), pool_cpu(self.pool) if self.pool else 0.0
        return self

    def __exit__(self, *exc: object) -> None:
        self.main += time.process_time() - self._main
        if self.pool:
            self.workers += pool_cpu(self.pool) - self._workers


async def time_db_save(files: list, db_url: str | None) -> float:
    """Seconds to save `files` with the store, on a database made for the bench."""
    import uuid

    from services.common import db, scratchdb
    from services.manifest.model import ScanOptions
    from services.manifest.store import ManifestStore

    async with scratchdb.scratch_database(db_url, prefix="di_bench_manifest") as url:
        pool = await db.create_pool(url)
        try:
            store = ManifestStore(pool)
            manifest, _ = await store.create_manifest(uuid.uuid4(), "bench", "Bench", "/bench", ScanOptions())
            start = time.perf_counter()
            await store.save_scan(manifest.manifest_id, files, {}, None)
            return time.perf_counter() - start
        finally:
            await pool.close()


@contextlib.asynccontextmanager
async def analyze_service(workers: int) -> AsyncIterator[Any]:
    """A ManifestService stub: the real manifest and cost services in their own processes.

    On a database made for the run (bench/session_common.py: from
    DOCIMPORT_BENCH_DATABASE_URL or DOCIMPORT_TEST_DATABASE_URL, else a
    private Postgres), with the default price book, and `workers` scan
    processes in the manifest service.
    """
    import session_common as common
    from docimport.manifest.v1 import manifest_service_pb2_grpc

    from services.common import db
    from services.common.channels import aio_channel, wait_serving
    from services.common.config import ClientSettings
    from services.cost.config import CostSettings
    from services.cost.store import CostStore

    async with common.private_database() as url:
        pool = await db.create_pool(url, min_size=1, max_size=2)
        try:
            settings = CostSettings(database_url=url, **common.token_env())
            await CostStore(pool).ensure_default_price_book(settings.price_book_file, settings.cpu_second_rate)
        finally:
            await pool.close()
        with common.peer_processes(url, {"DOCIMPORT_SCAN_WORKERS": str(workers)}) as (cost_port, manifest_port):
            await wait_serving(f"127.0.0.1:{cost_port}")
            await wait_serving(f"127.0.0.1:{manifest_port}")
            channel = aio_channel(f"127.0.0.1:{manifest_port}", ClientSettings(),
                                  token=common.TOKENS["operator"])
            try:
                yield manifest_service_pb2_grpc.ManifestServiceStub(channel)
            finally:
                await channel.close()


async def run_analyze(stub: Any, folder: Path) -> tuple[float, Any, int]:
    """Seconds of one AnalyzeSource, as a client sees it: request to the finished manifest."""
    import uuid

    from docimport.manifest.v1 import manifest_service_pb2 as pb

    request = pb.AnalyzeSourceRequest(request_id=str(uuid.uuid4()), source_path=str(folder),
                                      case_name="Bench v. Mark")
    start = time.perf_counter()
    manifest, events = None, 0
    async for event in stub.AnalyzeSource(request):
        if event.HasField("manifest"):
            manifest = event.manifest
        else:
            events += 1
    elapsed = time.perf_counter() - start
    if manifest is None or manifest.state != pb.MANIFEST_STATE_READY:
        raise SystemExit(f"AnalyzeSource did not finish a ready manifest: {manifest}")
    return elapsed, manifest, events


async def amain(args: argparse.Namespace) -> int:
    base = args.dir or Path(tempfile.mkdtemp(prefix="di-bench-scan-"))
    made = time.perf_counter()
    small_dir, pdf_dir, large_dir = base / "small", base / "small-pdf", base / "large"
    if not small_dir.exists():
        small_dir, pdf_dir, large_dir = make_corpus(base, args.small, args.small_pdf, args.large, args.large_mb)
    print(f"corpus under {base} ({time.perf_counter() - made:.1f}s to make); workers={args.workers}; "
          f"load average {os.getloadavg()[0]:.1f} on {os.cpu_count()} cores")
    ctx = multiprocessing.get_context("forkserver")
    bare_pool = concurrent.futures.ProcessPoolExecutor(args.workers, mp_context=ctx)
    list(bare_pool.map(abs, range(args.workers * 4)))
    scanner = Scanner(args.workers)
    scanner.start()
    ok = True
    try:
        async with contextlib.AsyncExitStack() as stack:
            stub = None
            if not args.scan_only:
                stub = await stack.enter_async_context(analyze_service(args.workers))
                await run_analyze(stub, pdf_dir)  # warms the service's pool and connections
            for label, folder in (("small files", small_dir), ("large files", large_dir),
                                  ("small text PDFs", pdf_dir)):
                files = _list_files(folder)
                total = sum(size for _, size in files)
                _warm_cache(files)
                scans, bares, ends = [], [], []
                bare_cpu, scan_cpu = CpuMeter(bare_pool), CpuMeter(scanner)
                rows = 0
                stats: dict[str, float] = {}
                manifest, events = None, 0
                for _ in range(args.repeat):  # interleaved, so load from elsewhere hits all three alike
                    with bare_cpu:
                        bares.append(baseline(bare_pool, files))
                    with scan_cpu:
                        elapsed, rows, stats = run_scan(scanner, folder)
                    scans.append(elapsed)
                    if stub is not None:
                        elapsed, manifest, events = await run_analyze(stub, folder)
                        ends.append(elapsed)
                scan, bare = min(scans), min(bares)
                ratio = scan / bare
                if folder != pdf_dir:  # the target applies to these two; see the docstring
                    ok = ok and ratio <= 1.3
                target = ("target <= 1.30x" if folder != pdf_dir
                          else "no target: the bare loop counts no pages")
                print(f"{label}: {len(files):,} files, {total / 2**20:,.0f} MiB -> {rows:,} rows; "
                      f"bare hashlib {bare:.3f}s; scan {scan:.3f}s = {ratio:.2f}x ({target}) "
                      f"[walk {stats.get('walk', 0):.2f}s, read {stats.get('read', 0):.2f}s, "
                      f"assembly {stats.get('assemble', 0):.2f}s of it after the read {stats.get('tail', 0):.2f}s]")
                if ends:
                    end = min(ends)
                    print(f"    AnalyzeSource over gRPC (scan + pricing + saving the rows): {end:.3f}s = "
                          f"{end / bare:.2f}x of bare; {manifest.summary.file_count:,} files, "
                          f"price book v{manifest.summary.price_book_version}, {events} progress events")
                print(f"    all runs: bare {_runs(bares)}, scan {_runs(scans)}"
                      + (f", AnalyzeSource {_runs(ends)}" if ends else ""))
                per_file = 1e6 / (max(len(files), 1) * args.repeat)
                print(f"    CPU a file (mean of the runs): bare {bare_cpu.workers * per_file:.1f} us in workers "
                      f"+ {bare_cpu.main * per_file:.1f} us in the main process; scan "
                      f"{scan_cpu.workers * per_file:.1f} us in workers + {scan_cpu.main * per_file:.1f} us "
                      f"in the main process = {(scan_cpu.workers + scan_cpu.main) / max(bare_cpu.workers + bare_cpu.main, 1e-9):.2f}x "
                      f"of bare (on a busy machine the wall ratio tends to this)")
            if args.with_db:
                source = resolve_source(str(small_dir), [small_dir])
                result = scanner.scan_blocking(source, ScanOptions(), new_tracker(), threading.Event())
                seconds = await time_db_save(result.files, os.environ.get("DOCIMPORT_BENCH_DATABASE_URL"))
                print(f"db save of {len(result.files):,} rows: {seconds:.3f}s "
                      f"({len(result.files) / seconds:,.0f} rows/s)")
    finally:
        scanner.close()
        bare_pool.shutdown()
        if not args.keep and args.dir is None:
            shutil.rmtree(base, ignore_errors=True)
    return 0 if ok else 1


def _runs(values: list[float]) -> str:
    return "/".join(f"{v:.2f}" for v in values)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--small", type=int, default=20000)
    parser.add_argument("--small-pdf", type=int, default=2000)
    parser.add_argument("--large", type=int, default=3)
    parser.add_argument("--large-mb", type=int, default=300)
    parser.add_argument("--workers", type=int, default=os.cpu_count() or 1)
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--dir", type=Path)
    parser.add_argument("--keep", action="store_true")
    parser.add_argument("--with-db", action="store_true")
    parser.add_argument("--scan-only", action="store_true",
                        help="skip the AnalyzeSource (gRPC + pricing + database) figure")
    return asyncio.run(amain(parser.parse_args()))


if __name__ == "__main__":
    sys.exit(main())
