"""A folder of every bad input a scan must survive, and what the manifest must say of each."""

from __future__ import annotations

import os
import stat
from pathlib import Path

from conftest import SAMPLE_CASE

IS_ROOT = os.geteuid() == 0
TOO_LARGE_LIMIT = 100_000

# raw relative path -> (problem kind or None, exclusion or None, text the message contains)
Expected = dict[bytes, tuple[str | None, str | None, str]]


def make_bad_tree(folder: Path) -> Expected:
    """Fills `folder`; returns the expected problem / exclusion of each listed path."""
    folder.mkdir(parents=True, exist_ok=True)
    folder.chmod(0o755)
    expected: Expected = {}

    def put(name: str | bytes, data: bytes) -> Path:
        raw = name if isinstance(name, bytes) else name.encode()
        path = Path(os.fsdecode(os.path.join(os.fsencode(folder), raw)))
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(data)
        return path

    put("empty.pdf", b"")
    expected[b"empty.pdf"] = ("empty", None, "the file is empty (0 bytes)")
    put("garbage.pdf", b"\x00\x01\x02binary garbage\xff" * 50)
    expected[b"garbage.pdf"] = ("corrupt", None, "named .pdf but the content is not a PDF")
    put("truncated.pdf", (SAMPLE_CASE / "medical_records/corrupt_scan.pdf").read_bytes())
    expected[b"truncated.pdf"] = ("corrupt", None, "not a readable PDF (PDFium error 3")
    put("sealed.pdf", (SAMPLE_CASE / "medical_records/sealed_records.pdf").read_bytes())
    expected[b"sealed.pdf"] = ("encrypted", None, "password-protected PDF")
    put("broken.docx", b"PK\x03\x04" + b"\x13" * 400)
    expected[b"broken.docx"] = ("corrupt", None, "not a readable Word document")
    put("song.mp3", b"ID3\x03\x00\x00\x00" + b"\x10" * 300)
    expected[b"song.mp3"] = ("unsupported", None, "audio files are not processed")
    put("huge.txt", b"x" * (TOO_LARGE_LIMIT + 1))
    expected[b"huge.txt"] = ("too_large", None, "is over the limit of 100,000 bytes")
    put("notes.txt", b"plain notes\n")
    expected[b"notes.txt"] = (None, None, "")
    put("photo.pdf", (SAMPLE_CASE / "discovery/site_photo.png").read_bytes())
    expected[b"photo.pdf"] = (None, None, "")
    put(b"memo_\xff\xfe.txt", b"latin-1 named memo\n")
    expected[b"memo_\xff\xfe.txt"] = (None, None, "")
    put("line\nbreak.txt", b"a newline in the name\n")
    expected[b"line\nbreak.txt"] = (None, None, "")
    put(".DS_Store", b"\x00\x00\x00\x01Bud1")
    expected[b".DS_Store"] = (None, "system file: macOS folder metadata (.DS_Store)", "")
    put("Thumbs.db", b"\xd0\xcf\x11\xe0")
    expected[b"Thumbs.db"] = (None, "system file: Windows thumbnail cache (Thumbs.db)", "")
    put("~$draft.docx", b"lock")
    expected[b"~$draft.docx"] = (None, "Office lock file (~$...): a temporary file of an open document", "")
    put(".git/config", b"[core]\n")
    expected[b".git/config"] = (None, "inside hidden folder .git", "")

    os.mkfifo(folder / "pipe")
    expected[b"pipe"] = ("not_a_file", None, "a named pipe (FIFO): not read")
    os.symlink(".", folder / "loop")
    expected[b"loop"] = ("not_a_file", None, "symbolic link loop: points back to its own folder")
    os.symlink("ping", folder / "pong")
    os.symlink("pong", folder / "ping")
    expected[b"ping"] = ("not_a_file", None, "symbolic link loop: not followed")
    expected[b"pong"] = ("not_a_file", None, "symbolic link loop: not followed")
    os.symlink("/etc/hostname", folder / "escape")
    expected[b"escape"] = ("not_a_file", None, "outside the scanned folder: not followed")
    os.symlink("../outside.txt", folder / "escape_dotdot")
    expected[b"escape_dotdot"] = ("not_a_file", None, "outside the scanned folder: not followed")
    os.symlink("nowhere.txt", folder / "dangling")
    expected[b"dangling"] = ("not_a_file", None, "broken symbolic link")
    os.symlink("notes.txt", folder / "alias.txt")
    expected[b"alias.txt"] = (None, None, "")
    put("sub/inner.txt", b"inner\n")
    expected[b"sub/inner.txt"] = (None, None, "")
    os.symlink("sub", folder / "sublink")
    expected[b"sublink"] = ("not_a_file", None, "folder links are not followed")

    locked = put("locked.txt", b"secret\n")
    locked.chmod(0)
    expected[b"locked.txt"] = ("unreadable", None, "permission denied")
    if IS_ROOT:
        os.mknod(folder / "null_device", stat.S_IFCHR | 0o600, os.makedev(1, 3))
        expected[b"null_device"] = ("not_a_file", None, "a character device: not read")
    return expected


def outside_file(folder: Path) -> Path:
    """A file next to the scanned folder, which the scan must never read."""
    path = folder.parent / "outside.txt"
    path.write_text("outside\n")
    return path
