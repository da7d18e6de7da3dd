"""Reading a VMware disk at a snapshot: the two transports `[vmware] transport` chooses.

- `https`: range reads of the snapshot disk's flat extent through vCenter's datastore
  interface (`/folder/<path>?dcPath=...&dsName=...`) with the session's cookie, at most
  `max_read_blocks` 512-byte blocks per request, one keep-alive connection per reader
  thread (so the pool is bounded by `pre_disk_readers_count`). It reads flat files: a disk
  that is a delta of another snapshot (a VM with snapshots of its own) needs `nbd`.
- `nbd`: one nbdkit per disk serves the snapshot disk read-only on a private unix socket,
  and each reader thread reads it over a libnbd connection of its own. The plugin is
  VMware's VDDK (`nbd_plugin = vddk`, which the operator installs), or `file` for
  datastores mounted on the proxy (NFS), which is also how the tests serve it.
"""

from __future__ import annotations

import contextlib
import logging
import os
import shutil
import subprocess
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any
from urllib.parse import quote, urlencode

from hamal_workers.platforms.base import (
    DiskReader,
    PlatformError,
    RequestReader,
    TransientPlatformError,
)

if TYPE_CHECKING:
    import ssl

    from hamal_workers.config import VmwareSection

log = logging.getLogger("hamal.vmware")
SECTOR = 512  # VDDK's block: max_read_blocks counts these
_READ_ATTEMPTS = 3
_NBDKIT_START_S = 120.0


@dataclass(frozen=True)
class DatastorePath:
    """`[datastore] dir/disk.vmdk`: a file as vSphere names it."""

    datastore: str
    path: str

    @classmethod
    def parse(cls, text: str) -> DatastorePath:
        end = text.find("] ")
        if not text.startswith("[") or end < 0:
            raise PlatformError(f"vmware: {text!r} is not a datastore path")
        return cls(text[1:end], text[end + 2 :])

    @property
    def flat(self) -> str:
        """The data file of a flat disk: `disk.vmdk` describes it, `disk-flat.vmdk` holds it."""
        stem = self.path[: -len(".vmdk")] if self.path.endswith(".vmdk") else self.path
        return stem + "-flat.vmdk"


def folder_url(host: str, port: int, file_name: str, datacenter: str) -> str:
    where = DatastorePath.parse(file_name)
    query = urlencode({"dcPath": datacenter, "dsName": where.datastore})
    return f"https://{host}:{port}/folder/{quote(where.flat)}?{query}"


class HttpsReader(RequestReader):
    """Range reads of one flat extent over one keep-alive HTTPS connection."""

    def __init__(
        self,
        url: str,
        context: ssl.SSLContext,
        cookie: Callable[[], str],
        expired: Callable[[str], None],
        max_request: int,
        where: str,
    ) -> None:
        import urllib3

        parts = urllib3.util.parse_url(url)
        self.path = parts.request_uri
        self.pool = urllib3.HTTPSConnectionPool(
            parts.host,
            parts.port or 443,
            maxsize=1,
            block=True,
            ssl_context=context,
            retries=False,
            timeout=urllib3.Timeout(connect=30, read=300),
        )
        self.cookie, self.expired = cookie, expired
        self.max_request = max(SECTOR, max_request)
        self.where = where

    def read_request(self, offset: int, view: memoryview) -> int:
        import urllib3

        failure = ""
        for attempt in range(1, _READ_ATTEMPTS + 1):
            cookie = self.cookie()
            try:
                return self._get(offset, view, cookie)
            except _Expired:
                self.expired(cookie)  # the next attempt logs in again
                failure = "the session expired"
            except (urllib3.exceptions.HTTPError, OSError) as exc:
                failure = " ".join(str(exc).split())[:200] or type(exc).__name__
                log.warning("%s: read at %d failed (%s), attempt %d", self.where, offset,
                            failure, attempt)  # fmt: skip
            time.sleep(0.2 * attempt)
        raise TransientPlatformError(
            f"vmware: read of {len(view)} bytes at {offset} from {self.where}: {failure}"
        )

    def _get(self, offset: int, view: memoryview, cookie: str) -> int:
        end = offset + len(view) - 1
        resp = self.pool.urlopen(
            "GET", self.path, headers={"Range": f"bytes={offset}-{end}", "Cookie": cookie},
            preload_content=False,
        )  # fmt: skip
        try:
            if resp.status == 401:
                raise _Expired
            if resp.status == 416:
                return 0  # past the end of the file
            if resp.status != 206:
                raise PlatformError(
                    f"vmware: read of {self.where} at {offset}: HTTP {resp.status} "
                    f"({resp.reason}); expected 206 (a range)"
                )
            got = 0
            while got < len(view):
                n = resp.readinto(view[got:])
                if not n:
                    break
                got += n
            return got
        finally:
            resp.release_conn()

    def close(self) -> None:
        self.pool.close()


class _Expired(Exception):
    pass


# --------------------------------------------------------------------------- nbd


def nbdkit_plugin_args(
    section: VmwareSection, info: dict[str, Any], password_file: Path | None
) -> list[str]:
    """The plugin and its parameters for one disk at one snapshot (`info`: the snapshot's
    entry of the disk). Secrets go in a file, never on a command line."""
    if section.nbd_plugin == "file":
        where = DatastorePath.parse(str(info["file"]))
        mount = section.mounts().get(where.datastore)
        if mount is None:
            raise PlatformError(
                f"vmware: datastore {where.datastore} is not in [vmware] datastore_mounts "
                f"(known: {', '.join(section.mounts()) or 'none'})"
            )
        return ["file", f"file={Path(mount) / where.flat}"]
    assert password_file is not None
    return [
        "vddk",
        f"libdir={section.vddk_libdir}",
        f"server={section.host}",
        f"port={section.port}",
        f"user={section.user}",
        f"password=+{password_file}",
        f"thumbprint={section.vddk_thumbprint}",
        f"vm=moref={info['vm']}",
        f"snapshot={info['snapshot']}",
        f"file={info['file']}",
    ]


class NbdExport:
    """One nbdkit serving one disk read-only on a unix socket only this process can reach."""

    def __init__(self, section: VmwareSection, info: dict[str, Any], where: str) -> None:
        self.where = where
        self.directory = Path(tempfile.mkdtemp(prefix="hamal-nbd-"))  # mode 0700
        self.socket = self.directory / "disk.sock"
        self.process: subprocess.Popen[bytes] | None = None
        try:
            password_file = None
            if section.nbd_plugin == "vddk":
                password_file = self.directory / "password"
                fd = os.open(password_file, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
                with os.fdopen(fd, "w") as out:
                    out.write(section.password)
            argv = [
                section.nbdkit, "--foreground", "--readonly", "--exit-with-parent",
                "--unix", str(self.socket), "--pidfile", str(self.directory / "pid"),
                *nbdkit_plugin_args(section, info, password_file),
            ]  # fmt: skip
            self._start(argv)
        except BaseException:
            self.close()
            raise

    def _start(self, argv: list[str]) -> None:
        errors = (self.directory / "nbdkit.log").open("wb")
        try:
            self.process = subprocess.Popen(
                argv, stdin=subprocess.DEVNULL, stdout=errors, stderr=errors
            )
        except OSError as exc:
            raise PlatformError(
                f"vmware: cannot start nbdkit ({argv[0]}): {exc.strerror}: install nbdkit or "
                "set [vmware] nbdkit"
            ) from None
        finally:
            errors.close()
        # nbdkit writes its pid file once it listens: the one sign of readiness it gives.
        deadline = time.monotonic() + _NBDKIT_START_S
        delay = 0.005
        while not (self.directory / "pid").exists():
            if self.process.poll() is not None:
                raise PlatformError(
                    f"vmware: nbdkit for {self.where} exited {self.process.returncode}: "
                    f"{self._log_tail()}"
                )
            if time.monotonic() > deadline:
                raise TransientPlatformError(f"vmware: nbdkit for {self.where} did not start")
            time.sleep(delay)
            delay = min(delay * 2, 0.2)

    def _log_tail(self) -> str:
        try:
            text = (self.directory / "nbdkit.log").read_text(errors="replace")
        except OSError:
            return ""
        return " ".join(text.split())[-500:]

    def open_reader(self, max_request: int) -> NbdReader:
        return NbdReader(str(self.socket), max_request, self.where)

    def close(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(30)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait(30)
        shutil.rmtree(self.directory, ignore_errors=True)


class NbdReader(DiskReader):
    """One libnbd connection to the disk's nbdkit, for one reader thread."""

    def __init__(self, socket: str, max_request: int, where: str) -> None:
        import nbd

        self.where = where
        self.handle = nbd.NBD()
        try:
            self.handle.connect_unix(socket)
        except nbd.Error as exc:
            raise TransientPlatformError(f"vmware: nbd connection to {where}: {exc}") from None
        self.size = int(self.handle.get_size())
        # NBD servers refuse requests over 32 MiB; nbdkit says what it prefers.
        self.max_request = max(SECTOR, min(max_request, 32 << 20))

    def read(self, offset: int, length: int) -> bytes:
        import nbd

        length = max(0, min(length, self.size - offset))
        parts = []
        done = 0
        try:
            while done < length:
                size = min(self.max_request, length - done)
                parts.append(self.handle.pread(size, offset + done))
                done += size
        except nbd.Error as exc:
            raise TransientPlatformError(
                f"vmware: nbd read of {length} bytes at {offset} from {self.where}: {exc}"
            ) from None
        return b"".join(parts)

    def close(self) -> None:
        with contextlib.suppress(Exception):
            self.handle.shutdown()
        with contextlib.suppress(Exception):
            self.handle.close()
