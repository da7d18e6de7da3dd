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
import mmap
import os
import re
import secrets
import threading
from collections.abc import Iterable, Iterator
from pathlib import Path

__all__ = [
    "TEMPORARY_NAME",
    "UncachedWriter",
    "fsync_dir",
    "is_no_room",
    "make_dirs",
    "replacing",
    "temporary_name",
    "write_all",
    "write_atomic",
    "write_uncached",
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


# O_DIRECT needs the buffer, the offset and the length aligned to the device's logical
# block: 4096 covers 512-byte and 4K-native devices alike.
DIRECT_ALIGN = 4096


class UncachedWriter:
    """Positioned writes of large pieces that bypass the page cache where they can.

    A restore writes a whole disk once and never reads it back: through the page cache
    it would evict what the host caches, pay for every new cache page, and leave the
    final fsync waiting on all of it. Whole aligned blocks go through a second O_DIRECT
    descriptor of the same file, from a page-aligned buffer; an unaligned tail, and
    every write where the filesystem refuses O_DIRECT (tmpfs, some FUSE), go through
    `fd` as usual. The caller still fsyncs `fd`: that flushes the device's write cache
    for the direct writes too. Thread-safe; close() when done.
    """

    def __init__(self, fd: int) -> None:
        self.fd = fd
        self._direct = _reopen_direct(fd)

    @property
    def direct(self) -> bool:
        return self._direct is not None

    def pwrite(self, data: memoryview, offset: int) -> None:
        data = data.cast("B") if data.format != "B" else data
        direct = self._direct
        whole = len(data) - len(data) % DIRECT_ALIGN
        if direct is None or offset % DIRECT_ALIGN or not whole:
            _pwrite_all(self.fd, data, offset)
            return
        buffer = _ALIGNED.take(whole)
        try:
            buffer[:whole] = data[:whole]
            done = _pwrite_direct(direct, memoryview(buffer)[:whole], offset)
        finally:
            _ALIGNED.give(buffer)
        _pwrite_all(self.fd, data[done:], offset + done)

    def close(self) -> None:
        if self._direct is not None:
            os.close(self._direct)
            self._direct = None

    def __enter__(self) -> UncachedWriter:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def _pwrite_all(fd: int, data: memoryview, offset: int) -> None:
    while data:
        n = os.pwrite(fd, data, offset)
        data, offset = data[n:], offset + n


def _reopen_direct(fd: int) -> int | None:
    """A second, O_DIRECT descriptor of fd's file, or None where that is not possible."""
    direct = getattr(os, "O_DIRECT", 0)
    if not direct:
        return None
    try:
        # Through /proc: the very file fd has open, whatever its name is by now.
        return os.open(f"/proc/self/fd/{fd}", os.O_WRONLY | direct | os.O_CLOEXEC)
    except OSError:
        return None


def _pwrite_direct(fd: int, data: memoryview, offset: int) -> int:
    """Write aligned blocks; how many bytes were written, for the caller to write the rest.

    Stops at a short write that leaves the rest unaligned, and at EINVAL: the filesystem
    took the O_DIRECT open but not these writes.
    """
    done = 0
    while done < len(data):
        try:
            n = os.pwrite(fd, data[done:], offset + done)
        except OSError as exc:
            if exc.errno != errno.EINVAL:
                raise
            break
        done += n
        if n == 0 or done % DIRECT_ALIGN:
            break
    return done


def write_uncached(fd: int, parts: Iterable[bytes | bytearray | memoryview]) -> int:
    """Write `parts` into the new, empty file `fd` around the page cache where possible.

    For files written once and rarely read soon (chunks): their pages would only evict
    what the host caches, and cost a copy plus write-back CPU. The parts are gathered in
    a page-aligned buffer, padded to DIRECT_ALIGN, written through an O_DIRECT descriptor
    of the same file, and the file is cut back to its length. Where the filesystem
    refuses O_DIRECT the parts are written as usual. Returns the file's length; the
    caller still fdatasyncs `fd` (the length, and the device's write cache).
    """
    views = [memoryview(part).cast("B") for part in parts]
    total = sum(len(view) for view in views)
    direct = _reopen_direct(fd) if total >= DIRECT_ALIGN else None
    if direct is None:
        return write_all(fd, views)
    padded = -(-total // DIRECT_ALIGN) * DIRECT_ALIGN
    buffer = _ALIGNED.take(padded)
    try:
        position = 0
        for view in views:
            buffer[position : position + len(view)] = view
            position += len(view)
        # Zeros, not an earlier file's bytes, in the block tail the truncate below cuts.
        buffer[total:padded] = bytes(padded - total)
        done = _pwrite_direct(direct, memoryview(buffer)[:padded], 0)
        _pwrite_all(fd, memoryview(buffer)[min(done, total) : total], min(done, total))
        if done > total:
            os.ftruncate(fd, total)
    finally:
        os.close(direct)
        _ALIGNED.give(buffer)
    return total


class _AlignedBuffers:
    """Page-aligned buffers shared by every thread that writes uncached, reused.

    At most MAX exist per process, whatever the number of writer threads: a writer holds
    one only for a copy and a direct write (a few milliseconds for 4 MiB, which two
    buffers keep the device busy with), so they add a bounded MAX x 4 MiB to each
    prefork process that writes.
    """

    MAX = 2

    def __init__(self) -> None:
        self._idle: list[mmap.mmap] = []
        self._lock = threading.Lock()
        self._slots = threading.BoundedSemaphore(self.MAX)

    def take(self, size: int) -> mmap.mmap:
        self._slots.acquire()
        try:
            with self._lock:
                for i, buffer in enumerate(self._idle):
                    if len(buffer) >= size:
                        return self._idle.pop(i)
                if self._idle:
                    self._idle.pop().close()  # too small for this one: make room
            # A 4 MiB chunk plus its header fits, so buffers are rarely remade.
            return mmap.mmap(-1, max(size, (1 << 22) + (1 << 16)))
        except BaseException:
            self._slots.release()
            raise

    def give(self, buffer: mmap.mmap) -> None:
        with self._lock:
            self._idle.append(buffer)
        self._slots.release()


_ALIGNED = _AlignedBuffers()
