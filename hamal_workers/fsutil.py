"""Writing files so that a reader, or a power loss, never finds half of one.

Every file Hamal keeps (chunks, manifests, point records, the info file, restored
images) is written the same way: under a temporary dot-name in its own directory,
made durable, then renamed over its real name. What these helpers promise:

* `replacing(path)` / `write_atomic(path, parts)`: the name `path` shows either the old
  file or the whole new one. With durable=True (the default) the new content is on
  stable storage *before* the rename, so no crash can leave the name pointing at an
  empty or short file.
* The rename itself lasts only once the directory is fsynced: `write_atomic` does that
  when durable; `replacing` leaves it to the caller, who may batch it (`fsync_dir`).
* On any error the temporary file is removed and the error raised as it came. ENOSPC
  and EDQUOT stay OSError (`is_no_room` recognises them) for the caller to name.
* Temporary names match `TEMPORARY_NAME`, so a sweep can tell a crash's leftovers from
  real entries.

These are the only copies of that logic in the project: use them, do not write another.
"""

from __future__ import annotations

import contextlib
import ctypes
import ctypes.util
import errno
import os
import re
import secrets
from collections.abc import Iterable, Iterator
from pathlib import Path

__all__ = [
    "TEMPORARY_NAME",
    "fsync_dir",
    "is_no_room",
    "make_dirs",
    "replacing",
    "temporary_name",
    "write_all",
    "write_atomic",
]

# `.<name>.<kind>.<16 hex>`: every temporary file and trash entry made here. A name
# that never starts with a dot can never match.
TEMPORARY_NAME = re.compile(r"^\..+\.(tmp|deleted|discarded|damaged)\.[0-9a-f]{16}$")

_NO_ROOM = frozenset({errno.ENOSPC, errno.EDQUOT})
# A new file is never reached through a link planted under its name.
_CREATE_FLAGS = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC


def temporary_name(path: Path, kind: str = "tmp") -> Path:
    """A fresh `.<name>.<kind>.<16 hex>` beside `path`; kind is one TEMPORARY_NAME knows."""
    return path.parent / f".{path.name}.{kind}.{secrets.token_hex(8)}"


def is_no_room(exc: BaseException) -> bool:
    """Whether an error means the filesystem or the quota is full."""
    return isinstance(exc, OSError) and exc.errno in _NO_ROOM


def write_all(fd: int, parts: Iterable[bytes | bytearray | memoryview]) -> int:
    """Write every part at the file position, retrying short writes; return the byte count."""
    written = 0
    for part in parts:
        view = memoryview(part).cast("B")
        while view:
            n = os.write(fd, view)
            view = view[n:]
            written += n
    return written


@contextlib.contextmanager
def replacing(
    path: Path, *, mode: int = 0o640, durable: bool = True, temp_dir: Path | None = None
) -> Iterator[int]:
    """Yield the fd of a new file that replaces `path` when the block ends without error.

    The file is created exclusively (O_EXCL, O_NOFOLLOW) under a random temporary name
    in path's directory (or in `temp_dir`, on the same filesystem, where one place holds
    every file being written) with exactly `mode` (the umask does not apply: these files
    hold VM data or are read by known readers). With durable=True it is fsynced before
    the rename. The directory is not fsynced: call fsync_dir(path.parent) (or batch that)
    to make the new name itself survive a power loss.
    """
    tmp = temporary_name(path)
    if temp_dir is not None:
        tmp = temp_dir / tmp.name
    fd = os.open(tmp, _CREATE_FLAGS, mode)
    try:
        try:
            os.fchmod(fd, mode)
            yield fd
            if durable:
                # fdatasync: the data and what is needed to find it, not the timestamps.
                os.fdatasync(fd)
        finally:
            os.close(fd)
        os.rename(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise


def write_atomic(
    path: str | os.PathLike[str],
    parts: Iterable[bytes | bytearray | memoryview],
    *,
    mode: int = 0o640,
    durable: bool = True,
) -> int:
    """Replace `path` with `parts`, all or nothing; return the bytes written.

    durable=True: the file and its new name survive a power loss once this returns.
    """
    path = Path(path)
    with replacing(path, mode=mode, durable=durable) as fd:
        written = write_all(fd, parts)
    if durable:
        fsync_dir(path.parent)
    return written


def fsync_dir(path: str | os.PathLike[str]) -> None:
    """Make the entries created, renamed or removed in directory `path` durable.

    A filesystem that cannot fsync a directory (EINVAL) is taken at its word; any other
    error, a missing directory included, is raised.
    """
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        os.fsync(fd)
    except OSError as exc:
        if exc.errno not in (errno.EINVAL, errno.ENOTSUP):
            raise
    finally:
        os.close(fd)


def make_dirs(path: Path, mode: int = 0o777) -> list[Path]:
    """Create directory `path` and its missing parents, like os.makedirs(exist_ok=True).

    Returns the directories that gained an entry, parents first: fsync them (now, or in
    a later barrier) for the new directories to survive a power loss.
    """
    try:
        os.mkdir(path, mode)
    except FileExistsError:
        return []
    except FileNotFoundError:
        changed = make_dirs(path.parent, mode)
        try:
            os.mkdir(path, mode)
        except FileExistsError:
            return changed
        return [*changed, path.parent]
    return [path.parent]


_SYNC_FILE_RANGE_WRITE = 2
_libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)


def start_writeback(fd: int, offset: int, length: int) -> None:
    """Start writing a range of a file to disk now, without waiting (sync_file_range).

    A later fsync then finds most of the data already on its way. Only a hint: where the
    call is missing it does nothing.
    """
    fn = getattr(_libc, "sync_file_range", None)
    if fn is not None:
        fn(
            ctypes.c_int(fd),
            ctypes.c_int64(offset),
            ctypes.c_int64(length),
            ctypes.c_uint(_SYNC_FILE_RANGE_WRITE),
        )
