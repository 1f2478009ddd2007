"""Opening archives safely (services/manifest/containers.py): members, names, links, bombs,
damage. Every archive here is made by the test with the standard library."""

from __future__ import annotations

import io
import tarfile
import zipfile
from pathlib import Path

import pytest

from services.manifest.containers import (
    TAR,
    ZIP,
    ArchiveError,
    Limits,
    Member,
    MemberProblem,
    open_archive,
    safe_name,
)


def read_all(path: Path, kind: str, limits: Limits = Limits()) -> dict[str, bytes | str]:
    """name -> bytes for members, name -> problem kind for the rest (members read in order)."""
    out: dict[str, bytes | str] = {}
    for item in open_archive(path, kind, limits):
        if isinstance(item, Member):
            with item.open() as stream:
                out[item.name] = stream.read()
        else:
            assert isinstance(item, MemberProblem)
            out[item.name] = item.kind
    return out


def make_zip(path: Path, members: dict[str, bytes], **kwargs: object) -> Path:
    with zipfile.ZipFile(path, "w", compression=zipfile.ZIP_DEFLATED, **kwargs) as z:  # type: ignore[arg-type]
        for name, data in members.items():
            z.writestr(name, data)
    return path


@pytest.mark.parametrize(
    ("name", "safe"),
    [
        ("a/b.pdf", "a/b.pdf"),
        ("./a//b.pdf", "a/b.pdf"),
        ("a\\b.pdf", "a/b.pdf"),
        ("../etc/passwd", None),
        ("a/../../b", None),
        ("/etc/passwd", None),
        ("C:\\Windows\\x.dll", None),
        ("c:evil", None),
        ("a\x00b", None),
        ("line\nbreak", None),
        ("", None),
        (".", None),
        ("Schriftsätze/Klage.pdf", "Schriftsätze/Klage.pdf"),
    ],
)
def test_member_names_that_leave_the_archive_are_refused(name: str, safe: str | None) -> None:
    assert safe_name(name) == safe


def test_a_zip_lists_its_members_and_refuses_names_that_escape(tmp_path: Path) -> None:
    path = make_zip(tmp_path / "case.zip", {
        "pleadings/complaint.txt": b"Complaint",
        "../../outside.txt": b"escape",
        "/abs/path.txt": b"absolute",
        "notes/empty.txt": b"",
    })
    assert read_all(path, ZIP) == {
        "pleadings/complaint.txt": b"Complaint",
        "../../outside.txt": "unsafe_name",
        "/abs/path.txt": "unsafe_name",
        "notes/empty.txt": b"",
    }
    assert not (tmp_path.parent / "outside.txt").exists()


def test_a_nested_zip_is_a_member_like_any_other(tmp_path: Path) -> None:
    inner = make_zip(tmp_path / "inner.zip", {"deep/memo.txt": b"memo"})
    outer = make_zip(tmp_path / "outer.zip", {"inner.zip": inner.read_bytes()})
    (name, data), = read_all(outer, ZIP).items()
    assert name == "inner.zip"
    nested = tmp_path / "nested-copy.zip"
    nested.write_bytes(data)  # type: ignore[arg-type]
    assert read_all(nested, ZIP) == {"deep/memo.txt": b"memo"}


def test_a_symlink_in_a_zip_is_not_followed(tmp_path: Path) -> None:
    path = tmp_path / "links.zip"
    with zipfile.ZipFile(path, "w") as z:
        link = zipfile.ZipInfo("secret-link")
        link.external_attr = (0o120777 << 16)
        z.writestr(link, "/etc/shadow")
        z.writestr("ok.txt", b"ok")
    assert read_all(path, ZIP) == {"secret-link": "link", "ok.txt": b"ok"}


def test_an_encrypted_zip_member_is_reported_as_encrypted(tmp_path: Path) -> None:
    path = make_zip(tmp_path / "sealed.zip", {"sealed.txt": b"x", "open.txt": b"y"})
    # set the "encrypted" general purpose bit of the first member in both of its headers
    data = bytearray(path.read_bytes())
    local = data.find(b"PK\x03\x04")
    central = data.find(b"PK\x01\x02")
    data[local + 6] |= 0x1
    data[central + 8] |= 0x1
    path.write_bytes(bytes(data))
    assert read_all(path, ZIP) == {"sealed.txt": "encrypted", "open.txt": b"y"}


def test_a_zip_bomb_is_stopped_as_its_bytes_are_read(tmp_path: Path) -> None:
    path = make_zip(tmp_path / "bomb.zip", {"zeros.bin": b"\0" * (20 << 20)})
    assert path.stat().st_size < 100_000
    with pytest.raises(ArchiveError) as caught:
        read_all(path, ZIP, Limits(max_ratio=100.0))
    assert caught.value.kind == "bomb" and "zeros.bin" in caught.value.message


def test_a_header_that_lies_about_its_size_does_not_help_a_bomb(tmp_path: Path) -> None:
    """The ratio is counted on the bytes read, not on what the header says."""
    path = make_zip(tmp_path / "liar.zip", {"zeros.bin": b"\0" * (20 << 20)})
    data = bytearray(path.read_bytes())
    central = data.find(b"PK\x01\x02")
    data[central + 24:central + 28] = (100).to_bytes(4, "little")  # uncompressed size: 100
    path.write_bytes(bytes(data))
    with pytest.raises(ArchiveError) as caught:
        read_all(path, ZIP, Limits(max_ratio=100.0))
    assert caught.value.kind in ("bomb", "corrupt")


def test_too_many_members_or_bytes_refuse_the_archive(tmp_path: Path) -> None:
    path = make_zip(tmp_path / "many.zip", {f"m{i}.txt": b"x" for i in range(50)})
    with pytest.raises(ArchiveError) as caught:
        read_all(path, ZIP, Limits(max_members=10))
    assert caught.value.kind == "too_many_members" and "50" in caught.value.message
    big = make_zip(tmp_path / "big.zip", {"a.bin": bytes(range(256)) * 8192})
    with pytest.raises(ArchiveError) as caught:
        read_all(big, ZIP, Limits(max_total_bytes=1000))
    assert caught.value.kind == "too_large"


def test_a_truncated_or_garbage_zip_is_corrupt_with_a_reason(tmp_path: Path) -> None:
    path = make_zip(tmp_path / "whole.zip", {"a.txt": b"a" * 1000, "b.txt": b"b" * 1000})
    cut = tmp_path / "cut.zip"
    cut.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    garbage = tmp_path / "garbage.zip"
    garbage.write_bytes(b"PK\x03\x04" + b"\xff" * 500)
    for broken in (cut, garbage):
        with pytest.raises(ArchiveError) as caught:
            read_all(broken, ZIP)
        assert caught.value.kind == "corrupt" and caught.value.message


def test_a_damaged_member_fails_alone_its_siblings_are_read(tmp_path: Path) -> None:
    text = b" ".join(b"word%d" % i for i in range(3000))  # deflates to a few KiB
    path = make_zip(tmp_path / "one-bad.zip", {"bad.txt": text, "good.txt": b"fine"})
    data = bytearray(path.read_bytes())
    local = data.find(b"PK\x03\x04")
    start = local + 30 + len("bad.txt")
    assert data.find(b"PK\x03\x04", start) > start + 200
    for i in range(start, start + 20):  # scramble the start of the first member's bytes
        data[i] ^= 0x5A
    path.write_bytes(bytes(data))
    seen: dict[str, object] = {}
    for item in open_archive(path, ZIP):
        assert isinstance(item, Member)
        try:
            with item.open() as stream:
                seen[item.name] = stream.read()
        except ArchiveError as exc:
            seen[item.name] = exc.kind
    assert seen == {"bad.txt": "corrupt", "good.txt": b"fine"}


def make_tar(path: Path, mode: str, members: dict[str, bytes],
             extra: list[tarfile.TarInfo] = ()) -> Path:  # type: ignore[assignment]
    with tarfile.open(path, mode) as t:
        for name, data in members.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            t.addfile(info, io.BytesIO(data))
        for info in extra:
            t.addfile(info)
    return path


@pytest.mark.parametrize("mode", ["w", "w:gz", "w:bz2", "w:xz"])
def test_tars_plain_and_compressed_are_read_by_content(tmp_path: Path, mode: str) -> None:
    path = make_tar(tmp_path / "case.archive", mode, {"a/one.txt": b"one", "two.txt": b"two"})
    assert read_all(path, TAR) == {"a/one.txt": b"one", "two.txt": b"two"}


def test_links_and_escaping_names_in_a_tar_are_not_followed(tmp_path: Path) -> None:
    symlink = tarfile.TarInfo("leak")
    symlink.type, symlink.linkname = tarfile.SYMTYPE, "/etc/shadow"
    hardlink = tarfile.TarInfo("hard")
    hardlink.type, hardlink.linkname = tarfile.LNKTYPE, "../../etc/passwd"
    fifo = tarfile.TarInfo("pipe")
    fifo.type = tarfile.FIFOTYPE
    path = make_tar(tmp_path / "evil.tar", "w",
                    {"../../escape.txt": b"x", "ok.txt": b"ok"}, [symlink, hardlink, fifo])
    assert read_all(path, TAR) == {
        "../../escape.txt": "unsafe_name", "ok.txt": b"ok", "leak": "link", "hard": "link",
        "pipe": "special",
    }


def test_a_tar_bomb_is_stopped_by_the_archives_own_ratio(tmp_path: Path) -> None:
    path = make_tar(tmp_path / "bomb.tar.gz", "w:gz", {"zeros.bin": b"\0" * (30 << 20)})
    with pytest.raises(ArchiveError) as caught:
        read_all(path, TAR, Limits(max_ratio=100.0))
    assert caught.value.kind == "bomb"


def test_a_truncated_tar_is_corrupt(tmp_path: Path) -> None:
    path = make_tar(tmp_path / "whole.tar.gz", "w:gz",
                    {f"m{i}.bin": bytes(range(256)) * 64 for i in range(20)})
    cut = tmp_path / "cut.tar.gz"
    cut.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    with pytest.raises(ArchiveError) as caught:
        read_all(cut, TAR)
    assert caught.value.kind == "corrupt"
    not_tar = tmp_path / "not.tar"
    not_tar.write_bytes(b"hello" * 100)
    with pytest.raises(ArchiveError) as caught:
        list(open_archive(not_tar, TAR))
    assert caught.value.kind == "corrupt"
