"""Fixtures of the manifest service tests: a shared scanner, the service, the cost service.

The scan process pool is started once per run (`scanner`); each service
test gets its own database (`db_url`), the real cost service in-process
(`cost_addr`), and the manifest service in-process on an ephemeral port
whose source root is a folder of the test's own.
"""

from __future__ import annotations

import importlib.util
import os
import shutil
import stat
import tempfile
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass
from pathlib import Path

import asyncpg
import grpc
import pytest
from docimport.manifest.v1 import manifest_service_pb2 as pb
from docimport.manifest.v1 import manifest_service_pb2_grpc as pb_grpc

from services.common.channels import aio_channel
from services.common.config import ClientSettings
from services.manifest.config import ManifestSettings
from services.manifest.scanner import Scanner
from services.manifest.server import ManifestServer, build_server
from services.manifest.store import ManifestStore
from conftest import ROOT, SAMPLE_CASE, TOKENS

NOBODY = 65534
IS_ROOT = os.geteuid() == 0


def load_expected() -> dict[str, dict]:
    spec = importlib.util.spec_from_file_location("make_sample_case", ROOT / "examples" / "make_sample_case.py")
    assert spec and spec.loader
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.EXPECTED


def open_tree(path: Path) -> None:
    """Makes `path` and its parents traversable by an unprivileged reader."""
    for part in [path, *path.parents]:
        if str(part) in ("/", "/tmp"):
            break
        mode = part.stat().st_mode
        part.chmod(mode | stat.S_IXOTH | stat.S_IROTH)


@pytest.fixture(scope="session")
def scanner() -> Iterator[Scanner]:
    made = Scanner(2, max_file_bytes=50 * 1024 * 1024)
    made.start()
    yield made
    made.close()


@pytest.fixture
def case_root() -> Iterator[Path]:
    """A source root of the test's own (world-traversable, for the unprivileged reader)."""
    path = Path(tempfile.mkdtemp(prefix="di-manifest-"))
    path.chmod(0o755)
    yield path
    for dirpath, dirnames, filenames in os.walk(path):
        for name in dirnames + filenames:
            full = os.path.join(dirpath, name)
            if not os.path.islink(full):
                try:
                    os.chmod(full, 0o755)
                except OSError:
                    pass
    shutil.rmtree(path, ignore_errors=True)


@pytest.fixture
def sample_copy(case_root: Path) -> Path:
    target = case_root / "smith-v-jones"
    shutil.copytree(SAMPLE_CASE, target)
    return target


async def start_cost(db_url: str, pool: asyncpg.Pool, token_env: dict[str, object]):  # type: ignore[no-untyped-def]
    from services.cost.config import CostSettings
    from services.cost.server import build_server as build_cost
    from services.cost.store import CostStore

    settings = CostSettings(database_url=db_url, **token_env)
    store = CostStore(pool)
    await store.ensure_default_price_book(settings.price_book_file, settings.cpu_second_rate)
    running = await build_cost(settings, store=store)
    return running, store


@dataclass
class Harness:
    server: ManifestServer
    settings: ManifestSettings
    channels: list[grpc.aio.Channel]
    root: Path

    def stub(self, scope: str = "operator") -> pb_grpc.ManifestServiceStub:
        channel = aio_channel(f"127.0.0.1:{self.server.port}", ClientSettings(), token=TOKENS[scope])
        self.channels.append(channel)
        return pb_grpc.ManifestServiceStub(channel)

    async def analyze(self, path: Path | str, *, case: str = "Smith v. Jones", request_id: str | None = None,
                      exclude_types: tuple[str, ...] = (), exclude_globs: tuple[str, ...] = (),
                      stub: pb_grpc.ManifestServiceStub | None = None
                      ) -> tuple[list[pb.ScanProgress], pb.Manifest]:
        import uuid

        stub = stub or self.stub()
        progress: list[pb.ScanProgress] = []
        manifest = None
        request = pb.AnalyzeSourceRequest(
            request_id=request_id or str(uuid.uuid4()), source_path=str(path), case_name=case,
            exclude_types=list(exclude_types), exclude_globs=list(exclude_globs))
        async for event in stub.AnalyzeSource(request):
            if event.HasField("progress"):
                assert manifest is None, "progress after the manifest"
                progress.append(event.progress)
            else:
                assert manifest is None, "two manifests"
                manifest = event.manifest
        assert manifest is not None
        return progress, manifest

    async def files(self, manifest_id: str, **filters: object) -> list[pb.ManifestFile]:
        stub = self.stub()
        out: list[pb.ManifestFile] = []
        token = ""
        while True:
            page = await stub.ListManifestFiles(pb.ListManifestFilesRequest(
                manifest_id=manifest_id, page_size=500, page_token=token, **filters))
            out.extend(page.files)
            token = page.next_page_token
            if not token:
                return out


async def make_harness(pool: asyncpg.Pool, token_env: dict[str, object], root: Path, *,
                       scanner: Scanner | None, cost_addr: str = "", **overrides: object) -> Harness:
    values = {**token_env, "token": TOKENS["service"], "rpc_timeout": 10.0, **overrides}
    settings = ManifestSettings(database_url="postgresql://unused", source_roots=(root,),
                                cost_addr=cost_addr, **values)
    server = await build_server(settings, store=ManifestStore(pool), scanner=scanner)
    return Harness(server, settings, [], root)


@pytest.fixture
async def cost_addr(db_url: str, pool: asyncpg.Pool, token_env: dict[str, object]) -> AsyncIterator[str]:
    running, store = await start_cost(db_url, pool, token_env)
    try:
        yield f"127.0.0.1:{running.port}"
    finally:
        await running.stop(0.5)
        await store.close()


@pytest.fixture
async def service(pool: asyncpg.Pool, token_env: dict[str, object], case_root: Path, scanner: Scanner,
                  cost_addr: str) -> AsyncIterator[Harness]:
    harness = await make_harness(pool, token_env, case_root, scanner=scanner, cost_addr=cost_addr)
    try:
        yield harness
    finally:
        for channel in harness.channels:
            await channel.close()
        await harness.server.close(0.5)
