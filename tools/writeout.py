"""The one place that writes generated files: all or nothing, atomically.

A target is replaced only if it is a regular file (or a symbolic link to one: the
file it points at is replaced) that its mode lets us write, or does not exist yet.
A directory, a device such as ``/dev/null``, a FIFO or a read-only file is a
``WriteError``, raised before anything is written. ``write_all`` writes several
files as one change: every content goes to a temporary file first, then each is
renamed into place; if a rename fails, the files already replaced get their old
content back.
"""

from __future__ import annotations

import os
import stat
import tempfile
from pathlib import Path

from tools.files import describe_os_error, file_kind


class WriteError(ValueError):
    """A target that must not or cannot be written; nothing was written."""


def _target(path: Path) -> tuple[Path, bytes | None, int]:
    """The file to replace (links resolved), its current bytes (None if new) and mode."""
    path = Path(path)
    if path.is_symlink():
        path = path.resolve()
    try:
        info = os.stat(path)
    except FileNotFoundError:
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise WriteError(
                f"{path}: cannot create {path.parent}: {describe_os_error(exc)}"
            ) from exc
        return path, None, 0o644
    except OSError as exc:
        raise WriteError(f"{path}: {describe_os_error(exc)}") from exc
    if not stat.S_ISREG(info.st_mode):
        raise WriteError(f"{path} is {file_kind(info.st_mode)}; only a regular file is replaced")
    if not info.st_mode & stat.S_IWUSR:
        raise WriteError(f"{path} is read-only; make it writable (chmod u+w) to regenerate it")
    try:
        return path, path.read_bytes(), info.st_mode & 0o777
    except OSError as exc:
        raise WriteError(f"{path}: {describe_os_error(exc)}") from exc


def _temporary(path: Path, data: bytes, mode: int) -> str:
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as handle:
            handle.write(data)
        os.chmod(tmp, mode)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return tmp


def write_all(outputs: dict[Path, str | bytes]) -> dict[Path, bool]:
    """Write every ``path: text`` (or bytes) or none; ``True`` where a file changed.

    Text is written exactly as given (no newline translation); a file whose content
    is already identical is left untouched, so reruns keep modification times.
    """
    plan = []
    for path, text in outputs.items():
        target, old, mode = _target(path)
        data = text if isinstance(text, bytes) else text.encode("utf-8")
        plan.append((path, target, old, mode, data))
    changed = {path: old != data for path, _, old, _, data in plan}
    temporaries: list[tuple[Path, str, bytes | None, int]] = []
    try:
        for _, target, old, mode, data in plan:
            if old != data:
                temporaries.append((target, _temporary(target, data, mode), old, mode))
    except OSError as exc:
        for _, tmp, _, _ in temporaries:
            Path(tmp).unlink(missing_ok=True)
        raise WriteError(f"cannot write next to {target}: {describe_os_error(exc)}") from exc
    done: list[tuple[Path, bytes | None, int]] = []
    try:
        for target, tmp, old, mode in temporaries:
            os.replace(tmp, target)
            done.append((target, old, mode))
    except OSError as exc:
        for _, tmp, _, _ in temporaries:
            Path(tmp).unlink(missing_ok=True)
        for target, old, mode in reversed(done):
            if old is None:
                target.unlink(missing_ok=True)
            else:
                os.replace(_temporary(target, old, mode), target)
        raise WriteError(f"cannot replace {target}: {describe_os_error(exc)}") from exc
    return changed


def write_atomic(path: Path, text: str) -> bool:
    """Write one file atomically; False (and untouched) when the content is identical."""
    return write_all({Path(path): text})[Path(path)]
