"""Opening archives safely: their members, without trusting the names, links or sizes inside.

Owns `open_archive(path, kind, limits)`, which yields the members of a ZIP or
TAR (plain, gzip, bzip2, xz) archive as `Member`s (a checked name, the
declared sizes, and a reader of its bytes) and what cannot be a member as
`MemberProblem`s; a fault of the whole archive raises `ArchiveError`. It
reads; it never writes, and never turns a member's name into a path of
this machine: callers stream a member's bytes (to hash, sniff, count pages,
or copy into their own scratch area under a name of their own choosing).

What is refused, and how (issue 20, "Safety"):
- names: absolute paths, drive letters, `..` components, NULs and control
  characters, empty names: a `MemberProblem` ("unsafe_name"), never followed;
- links: symbolic and hard links (TAR link entries, ZIP entries whose mode
  says symlink) are reported ("link"), never followed, so a link to a
  secret outside the folder cannot leak it;
- encryption: an encrypted ZIP member is reported ("encrypted");
- limits (`Limits`, from the manifest service's settings): more members
  than `max_members` refuse the archive ("too_many_members"); bytes are
  counted as they are read, whatever the headers claim: a member beyond
  `max_ratio` times its compressed size or `max_member_bytes`, or all of
  them beyond `max_ratio` times the archive's size or `max_total_bytes`,
  stop with an `ArchiveError` ("bomb", "too_large"); nesting depth is the
  caller's (`Limits.max_depth`), which knows how deep it is;
- damage: a corrupt or truncated archive raises `ArchiveError("corrupt")`
  with the reader's reason; in a ZIP, whose central directory lists every
  member, a member whose bytes are damaged fails alone when it is read.

Memory stays bounded: members are read in chunks by the caller. A TAR is
read in order: read a member before asking for the next one.
"""

from __future__ import annotations

import io
import lzma
import re
import stat
import tarfile
import zipfile
import zlib
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import BinaryIO

ZIP, TAR = "zip", "tar"  # TAR covers .tar, .tar.gz, .tar.bz2 and .tar.xz (read by content)


@dataclass(frozen=True)
class Limits:
    """How far an archive may expand (each a setting of the manifest service)."""

    max_depth: int = 5
    max_members: int = 100_000
    max_total_bytes: int = 64 * 2**30
    max_member_bytes: int = 8 * 2**30
    # expanded / compressed bytes of one member beyond which it is a bomb
    max_ratio: float = 200.0


@dataclass(frozen=True)
class Member:
    """One member of an archive: a file, its checked name and a reader of its bytes."""

    name: str  # '/'-separated, relative, no '..'
    size: int  # as declared by the archive
    compressed_size: int | None
    opener: Callable[[], BinaryIO]

    def open(self) -> BinaryIO:
        return self.opener()


@dataclass(frozen=True)
class MemberProblem:
    """An entry of an archive that is not taken as a member, and why."""

    name: str  # a printable rendering of the name as the archive gave it
    kind: str  # unsafe_name, link, encrypted, special
    message: str


class ArchiveError(Exception):
    """The archive (or a member being read) is refused as a whole."""

    def __init__(self, kind: str, message: str) -> None:
        super().__init__(message)
        self.kind, self.message = kind, message


# What a reader raises on damaged or truncated bytes (the decompressors' own errors included).
_DAMAGE = (zipfile.BadZipFile, tarfile.TarError, zlib.error, lzma.LZMAError, EOFError, OSError,
           ValueError)
_CONTROL = re.compile(r"[\x00-\x1f\x7f]")
_DRIVE = re.compile(r"^[A-Za-z]:")


def printable(name: str) -> str:
    """A member's name as it may be shown: control characters escaped, at most 200 characters."""
    shown = _CONTROL.sub(lambda m: f"\\x{ord(m.group()):02x}", name)
    return shown if len(shown) <= 200 else shown[:199] + "…"


def safe_name(name: str) -> str | None:
    """The member's name as a relative '/'-separated path, or None when it is not safe to use."""
    if not name or _CONTROL.search(name) or _DRIVE.match(name):
        return None
    normal = name.replace("\\", "/")
    if normal.startswith("/"):
        return None
    parts = [p for p in PurePosixPath(normal).parts if p not in ("", ".")]
    if not parts or any(p == ".." for p in parts):
        return None
    return "/".join(parts)


class _Budget:
    """What all the members of one archive may still expand to: the lower of `max_total_bytes`
    and `max_ratio` times the archive's own size (a bomb of many small members)."""

    def __init__(self, archive_bytes: int, limits: Limits) -> None:
        by_ratio = max(int(archive_bytes * limits.max_ratio), 1 << 20)
        self.left = min(limits.max_total_bytes, by_ratio)
        self.kind = "too_large" if limits.max_total_bytes <= by_ratio else "bomb"
        self.ratio = limits.max_ratio

    def spend(self, n: int) -> None:
        self.left -= n
        if self.left < 0:
            raise ArchiveError(
                self.kind,
                "the archive expands beyond the bytes allowed in all" if self.kind == "too_large"
                else f"the archive expands beyond {self.ratio:g} times its size (a zip bomb)",
            )


class _Bounded(io.RawIOBase):
    """A member's bytes, stopped once they outgrow what the limits allow."""

    def __init__(self, raw: BinaryIO, name: str, compressed: int | None, limits: Limits,
                 budget: _Budget) -> None:
        self._raw, self._name, self._limits, self._budget = raw, name, limits, budget
        self._cap = limits.max_member_bytes
        if compressed:
            self._cap = min(self._cap, max(int(compressed * limits.max_ratio), 1 << 20))
        self._read = 0

    def readable(self) -> bool:
        return True

    def readinto(self, buffer: memoryview) -> int:  # type: ignore[override]
        try:
            n = self._raw.readinto(buffer)  # type: ignore[attr-defined]
        except _DAMAGE as exc:
            raise ArchiveError("corrupt", f"member {printable(self._name)}: {exc}") from exc
        if n is None:
            return 0
        self._read += n
        if self._read > self._cap:
            kind = "too_large" if self._cap == self._limits.max_member_bytes else "bomb"
            raise ArchiveError(
                kind,
                f"member {printable(self._name)} expands beyond "
                + ("the largest member allowed" if kind == "too_large"
                   else f"{self._limits.max_ratio:g} times its compressed size (a zip bomb)"),
            )
        self._budget.spend(n)
        return n

    def close(self) -> None:
        self._raw.close()
        super().close()


def _bounded(raw: BinaryIO, name: str, compressed: int | None, limits: Limits,
             budget: _Budget) -> BinaryIO:
    return io.BufferedReader(_Bounded(raw, name, compressed, limits, budget), 1 << 16)


def open_archive(path: Path, kind: str, limits: Limits = Limits()) -> Iterator[Member | MemberProblem]:
    """The members of the archive at `path` (see the module docstring)."""
    if kind == ZIP:
        return _zip_members(path, limits)
    if kind == TAR:
        return _tar_members(path, limits)
    raise ValueError(f"not an archive kind: {kind!r}")


def _zip_members(path: Path, limits: Limits) -> Iterator[Member | MemberProblem]:
    try:
        archive = zipfile.ZipFile(path)
        infos = archive.infolist()
    except (zipfile.BadZipFile, zipfile.LargeZipFile, EOFError, OSError, ValueError) as exc:
        raise ArchiveError("corrupt", f"not a readable ZIP archive: {exc}") from exc
    files = [i for i in infos if not i.is_dir()]
    if len(files) > limits.max_members:
        archive.close()
        raise ArchiveError("too_many_members",
                           f"{len(files):,} members, more than the {limits.max_members:,} allowed")
    if sum(i.file_size for i in files) > limits.max_total_bytes:
        archive.close()
        raise ArchiveError("too_large", "its members declare more bytes than allowed in all")
    budget = _Budget(path.stat().st_size, limits)
    with archive:
        for info in files:
            name = safe_name(info.filename)
            mode = info.external_attr >> 16
            if name is None:
                yield MemberProblem(printable(info.filename), "unsafe_name",
                                    "a member name that leaves the archive (absolute, '..', a "
                                    "drive or control characters) is not followed")
            elif stat.S_ISLNK(mode):
                yield MemberProblem(name, "link", "a symbolic link inside the archive is not followed")
            elif info.flag_bits & 0x1:
                yield MemberProblem(name, "encrypted", "the member is encrypted (password-protected)")
            else:
                yield Member(name, info.file_size, info.compress_size,
                             _zip_opener(archive, info, name, limits, budget))


def _zip_opener(archive: zipfile.ZipFile, info: zipfile.ZipInfo, name: str, limits: Limits,
                budget: _Budget) -> Callable[[], BinaryIO]:
    def opener() -> BinaryIO:
        try:
            raw = archive.open(info)
        except (zipfile.BadZipFile, NotImplementedError, RuntimeError, OSError, ValueError) as exc:
            raise ArchiveError("corrupt", f"member {printable(name)}: {exc}") from exc
        return _bounded(raw, name, info.compress_size, limits, budget)

    return opener


def _tar_members(path: Path, limits: Limits) -> Iterator[Member | MemberProblem]:
    try:
        archive = tarfile.open(path, mode="r:*")
    except (tarfile.TarError, EOFError, OSError, ValueError) as exc:
        raise ArchiveError("corrupt", f"not a readable TAR archive: {exc}") from exc
    budget = _Budget(path.stat().st_size, limits)
    count = 0
    with archive:
        while True:
            try:
                info = archive.next()
            except _DAMAGE as exc:
                raise ArchiveError("corrupt", f"the archive is damaged or truncated: {exc}") from exc
            if info is None:
                return
            if info.isdir():
                continue
            count += 1
            if count > limits.max_members:
                raise ArchiveError("too_many_members",
                                   f"more than the {limits.max_members:,} members allowed")
            name = safe_name(info.name)
            if name is None:
                yield MemberProblem(printable(info.name), "unsafe_name",
                                    "a member name that leaves the archive (absolute, '..', a "
                                    "drive or control characters) is not followed")
            elif info.issym() or info.islnk():
                yield MemberProblem(name, "link",
                                    "a symbolic or hard link inside the archive is not followed")
            elif not info.isfile():
                yield MemberProblem(name, "special", "a device, FIFO or other special entry")
            elif info.size > limits.max_member_bytes:
                raise ArchiveError("too_large",
                                   f"member {name} declares more bytes than a member may have")
            else:
                yield Member(name, info.size, None, _tar_opener(archive, info, name, limits, budget))


def _tar_opener(archive: tarfile.TarFile, info: tarfile.TarInfo, name: str, limits: Limits,
                budget: _Budget) -> Callable[[], BinaryIO]:
    def opener() -> BinaryIO:
        try:
            raw = archive.extractfile(info)
        except (tarfile.TarError, OSError, ValueError) as exc:
            raise ArchiveError("corrupt", f"member {printable(name)}: {exc}") from exc
        if raw is None:
            raise ArchiveError("corrupt", f"member {printable(name)} has no data")
        return _bounded(raw, name, None, limits, budget)  # type: ignore[arg-type]

    return opener
