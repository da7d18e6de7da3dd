"""The proxy's info file ([DEFAULT] hamal_info_path) and its local state dir (hamal_lib_dir).

Every process writes what it is to the info file and keeps it current. The file is
one JSON object::

    {"version": "0.1.0", "exporter_id": "...", "host": "proxy-1",
     "addresses": ["fe80::1", "127.0.0.1", "::1"],
     "updated": "2025-01-01T00:00:00+00:00",
     "processes": {"proxy-1:4242": {"role": "worker", "queues": ["period"], "pid": 4242,
                                    "started": "...", "updated": "..."}}}

Workers, beat and the CLI all write it: each change is a read-modify-write under an
flock on ``<hamal_info_path>.lock``, written with ``fsutil.write_atomic``, so a reader
never sees half a file. Entries of processes of this host that are gone are dropped
on every write. Entries of other hosts (another container sharing the directory) are
kept: their pids mean nothing here.

Nothing secret is written: the fields above are all there is.
"""

from __future__ import annotations

import atexit
import contextlib
import fcntl
import ipaddress
import json
import logging
import os
import socket
from collections.abc import Callable, Iterable, Iterator
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, Protocol

import psutil

import hamal_workers
from hamal_workers import fsutil

log = logging.getLogger(__name__)

JsonObject = dict[str, Any]

# How long `ip -j addr` may take before the kernel fallback is used instead.


class _DefaultSettings(Protocol):
    @property
    def hamal_lib_dir(self) -> str: ...
    @property
    def hamal_info_path(self) -> str: ...


class _MassSettings(Protocol):
    @property
    def hyper_exporter_id(self) -> str: ...


class InfoSettings(Protocol):
    """The part of ``hamal_workers.config.Settings`` this module reads."""

    @property
    def default(self) -> _DefaultSettings: ...
    @property
    def mass(self) -> _MassSettings: ...


class InfoError(Exception):
    """The lib dir or the info file cannot be used; the message names the config key."""


def ensure_lib_dir(settings: InfoSettings) -> Path:
    """Create hamal_lib_dir and the directory of hamal_info_path if missing; return the first."""
    lib_dir = Path(settings.default.hamal_lib_dir)
    _make_dir("hamal_lib_dir", lib_dir, lib_dir)
    info_path = Path(settings.default.hamal_info_path)
    _make_dir("hamal_info_path", info_path, info_path.parent)
    return lib_dir


def _make_dir(key: str, configured: Path, directory: Path) -> None:
    where = f"[DEFAULT] {key} = {configured}"
    try:
        directory.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise InfoError(f"{where}: cannot create {directory}: {exc.strerror or exc}") from exc
    if not os.access(directory, os.W_OK | os.X_OK):
        raise InfoError(f"{where}: {directory} is not writable by uid {os.getuid()}")


class ProcessInfo:
    """This process's entry in the info file.

    ``register`` once the process knows its role, ``refresh`` periodically (e.g. from
    the heartbeat); the entry is removed at normal exit. An object inherited across a
    fork does nothing in the child until the child registers itself.
    """

    def __init__(self) -> None:
        self._path: Path | None = None
        self._exporter_id = ""
        self._addresses: list[str] = []
        self._pid = 0
        self._entry: JsonObject | None = None
        self._exit_hook_set = False

    @property
    def key(self) -> str:
        """``<hostname>:<pid>``, this process's key under "processes"."""
        return f"{socket.gethostname()}:{os.getpid()}"

    def register(self, settings: InfoSettings, role: str, queues: list[str]) -> None:
        """Write (or rewrite) this process's entry."""
        path = Path(settings.default.hamal_info_path)
        _make_dir("hamal_info_path", path, path.parent)
        now = _now()
        pid = os.getpid()
        started = self._entry["started"] if self._entry and self._pid == pid else now
        self._path, self._pid = path, pid
        self._exporter_id = settings.mass.hyper_exporter_id
        self._entry = {
            "role": role,
            "queues": list(queues),
            "pid": pid,
            "started": started,
            "updated": now,
        }
        self._addresses = host_addresses()
        self._write_entry()
        if not self._exit_hook_set:
            atexit.register(self._unregister_at_exit)
            self._exit_hook_set = True

    def refresh(self) -> None:
        """Mark this process alive now; also rewrites the entry if someone removed it."""
        if not self._registered():
            return
        assert self._entry is not None
        self._entry["updated"] = _now()
        self._addresses = host_addresses()  # DHCP and container restarts change them
        self._write_entry()

    def unregister(self) -> None:
        """Remove this process's entry (runs by itself at exit)."""
        if not self._registered():
            return
        key = self.key
        self._update(lambda processes: processes.pop(key, None))
        self._entry = None

    def _registered(self) -> bool:
        return self._entry is not None and self._pid == os.getpid()

    def _write_entry(self) -> None:
        key, entry = self.key, dict(self._entry or {})
        self._update(lambda processes: processes.__setitem__(key, entry))

    def _update(self, change: Callable[[JsonObject], object]) -> None:
        assert self._path is not None
        try:
            with _locked(self._path):
                document = _read(self._path)
                processes = _processes_of(document)
                change(processes)
                _drop_dead(processes, socket.gethostname())
                _write_document(self._path, self._header() | {"processes": processes})
        except OSError as exc:
            raise InfoError(
                f"[DEFAULT] hamal_info_path = {self._path}: cannot update: {exc.strerror or exc}"
            ) from exc

    def _header(self) -> JsonObject:
        return {
            "version": hamal_workers.__version__,
            "exporter_id": self._exporter_id,
            "host": socket.gethostname(),
            "addresses": self._addresses,
            "updated": _now(),
        }

    def _unregister_at_exit(self) -> None:
        # An exit must not fail because the info file is gone or read-only.
        try:
            self.unregister()
        except InfoError as exc:
            log.warning("%s", exc)


def _now() -> str:
    return datetime.now(UTC).isoformat(timespec="seconds")


@contextlib.contextmanager
def _locked(path: Path) -> Iterator[None]:
    # A sidecar file: the info file itself is replaced by rename, so a lock on it
    # would be on an inode that is no longer the file.
    with open(path.with_name(path.name + ".lock"), "a") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        yield  # closing the file releases the lock


def _read(path: Path) -> JsonObject:
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        return {}
    try:
        document = json.loads(text) if text.strip() else {}
    except ValueError as exc:
        # Derived state: every live process writes its entry again on its next refresh.
        log.warning("%s is not valid JSON (%s): starting it afresh", path, exc)
        return {}
    return document if isinstance(document, dict) else {}


def _processes_of(document: JsonObject) -> JsonObject:
    processes = document.get("processes")
    return dict(processes) if isinstance(processes, dict) else {}


def _drop_dead(processes: JsonObject, host: str) -> None:
    for key in list(processes):
        entry_host, _, _ = key.rpartition(":")
        if entry_host != host:
            continue
        entry = processes[key]
        pid = entry.get("pid") if isinstance(entry, dict) else None
        if not isinstance(pid, int) or not pid_alive(pid):
            del processes[key]


def pid_alive(pid: int) -> bool:
    """Whether a process with this pid exists on this host (in this pid namespace)."""
    if pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True  # exists, owned by another user
    return True


def _write_document(path: Path, document: JsonObject) -> None:
    text = json.dumps(document, indent=2, sort_keys=True) + "\n"
    # 0644: operators and monitoring read this file; it holds nothing secret.
    fsutil.write_atomic(path, [text.encode()], mode=0o644)


# --- host addresses --------------------------------------------------------------------


def host_addresses() -> list[str]:
    """IPv4 and IPv6 addresses of this host's interfaces, loopback last; no network traffic."""
    found = [
        address.address
        for addresses in psutil.net_if_addrs().values()
        for address in addresses
        if address.family in (socket.AF_INET, socket.AF_INET6)
    ]
    return _ordered(found)


def _ordered(addresses: Iterable[str]) -> list[str]:
    parsed = set()
    for text in addresses:
        with contextlib.suppress(ValueError):
            # "fe80::1%eth0" carries a zone; the address is what identifies the host.
            parsed.add(ipaddress.ip_address(text.split("%")[0]))
    ordered = sorted(parsed, key=lambda a: (a.is_loopback, a.version, int(a)))
    return [str(a) for a in ordered]


__all__ = [
    "InfoError",
    "InfoSettings",
    "ProcessInfo",
    "ensure_lib_dir",
    "host_addresses",
    "pid_alive",
]
