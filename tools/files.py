"""Reading the files a contributor controls, without hanging or exhausting the machine.

A catalog file may be a symbolic link to ``/dev/zero``, a FIFO, a broken link, a
link loop, unreadable, huge or not UTF-8. Each is an ``UnreadableFile`` with a
one-line reason, which the loader reports as a problem of that file.
"""

from __future__ import annotations

import errno
import os
import stat
from pathlib import Path

# The largest entry is about 4 KB; the README about 30 KB at 65 papers.
ENTRY_LIMIT = 64 * 1024
DOCUMENT_LIMIT = 16 * 1024 * 1024


class UnreadableFile(ValueError):
    """The file cannot be used; the message says why, in one line."""


def describe_os_error(exc: OSError) -> str:
    if exc.errno == errno.ELOOP:
        return "symbolic link loop"
    if exc.errno == errno.ENOENT:
        return "does not exist (a broken symbolic link?)"
    if exc.errno in (errno.EACCES, errno.EPERM):
        return "permission denied"
    if exc.errno == errno.EISDIR:
        return "is a directory"
    return exc.strerror or str(exc)


def file_kind(mode: int) -> str:
    for test, name in (
        (stat.S_ISDIR, "a directory"),
        (stat.S_ISFIFO, "a FIFO"),
        (stat.S_ISCHR, "a character device"),
        (stat.S_ISBLK, "a block device"),
        (stat.S_ISSOCK, "a socket"),
    ):
        if test(mode):
            return name
    return "not a regular file"


def read_text(path: Path, limit: int = ENTRY_LIMIT) -> str:
    """UTF-8 text of a regular file of at most ``limit`` bytes (newlines kept as written)."""
    try:
        info = os.stat(path)  # follows links; never blocks, unlike open() on a FIFO
    except OSError as exc:
        raise UnreadableFile(describe_os_error(exc)) from exc
    if not stat.S_ISREG(info.st_mode):
        raise UnreadableFile(f"is {file_kind(info.st_mode)}, not a regular file")
    if info.st_size > limit:
        raise UnreadableFile(f"is {info.st_size:,} bytes; the limit is {limit:,}")
    try:
        # O_NONBLOCK: if the path was swapped for a FIFO since stat(), open() still returns.
        fd = os.open(path, os.O_RDONLY | getattr(os, "O_NONBLOCK", 0))
        with os.fdopen(fd, "rb") as handle:
            data = handle.read(limit + 1)
    except OSError as exc:
        raise UnreadableFile(describe_os_error(exc)) from exc
    if len(data) > limit:
        raise UnreadableFile(f"is over the limit of {limit:,} bytes")
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise UnreadableFile(f"not UTF-8 text ({exc.reason} at byte {exc.start})") from exc
