"""Huawei FusionCompute VMs, read the way its backup interface intends: CBT backup snapshots,
changed-block bitmaps from `getcbt`, and data from the CNA host over the backup socket.

- **Session** (`VrmSession`): one per worker process; login with the SHA-256 key of the
  password (`X-Auth-Key`), the token reused by every call of the process, logged in again
  once when the VRM answers 10000002 (expired), logged out at exit. Verified TLS by default
  (`[fusion_compute] ca_file`, else the system's CAs; `insecure` only when set). Every
  `{errorCode, errorDes}` becomes an error naming the call; busy answers are asked again
  with backoff. The whole fleet keeps to `api_calls_per_minute` (a Redis-held window):
  the VRM is shared with its own operators.
- **Discovery**: every VM of every site (templates aside), or those `[fusion_compute] vms`
  names by UUID, URN or name, 100 per page; disks named `disk<sequenceNum>`. Shared and
  independent disks are skipped and named: a VM snapshot does not cover them.
- **Snapshots**: one `CBTbackup` snapshot `hamal-<run id>` per run (all the VM's disks at
  one instant, crash-consistent); while another snapshot task of the VM runs the proxy
  waits and asks again; the snapshot limit is a clear status. A snapshot task that fails or
  outlasts `create_snap_task_timeout` leaves nothing: the snapshot is deleted. The newest
  committed snapshot is kept as the base of the next sync (`keeps_base_snapshot`): the
  VRM answers getcbt between two snapshots of one chain. Never a snapshot of another name.
- **Change tokens** are `<volCBTCreateTime>|<ChgID>` of the disk at the snapshot. The next
  sync asks getcbt from the recorded ChgID; another CBT epoch (tracking was reset), a
  broken chain (10300408) or a missing base makes `changed_extents` answer None: the
  engine reads what the bitmap marks from the first version and stores only new content.
  Every bitmap is checked against its own `bit1Num` (`fusion_wire.decode_bitmap`).
- **Reads**: per disk one backup resource (`backupresources`, `ip` = `local_host_ip` or the
  address this machine reaches the VRM from), kept alive while the disk syncs, released on
  every exit path (else it expires by itself after `backup_resource_delay`); readers speak
  the backup socket protocol (`fusion_wire`) to the CNA host, TLS pinned to the resource's
  CA with `transport_mode = lanssl`. At most `max_socket_connections_per_host` sockets to
  one host from the whole fleet (Redis-held slots that expire with a killed holder). A
  dropped socket is reopened, an expired resource made again, I/O errors retried, then the
  read fails with the host's answer.

Everything the public documents leave open is assumed in `fusion_wire.py`, not here.
"""

from __future__ import annotations

import calendar
import contextlib
import hashlib
import logging
import os
import secrets
import socket
import ssl
import threading
import time
import zlib
from collections.abc import Iterator
from typing import TYPE_CHECKING, Any

import requests

from hamal_workers.engine.extents import Extent
from hamal_workers.platforms import PlatformSpec
from hamal_workers.platforms import fusion_wire as wire
from hamal_workers.platforms.base import (
    DiskReader,
    DiskRef,
    DiskSource,
    Platform,
    PlatformError,
    RequestReader,
    Snapshot,
    TransientPlatformError,
    VmRef,
    describe_vm,
    run_of_snapshot,
)
from hamal_workers.platforms.shared import at_process_exit, process_shared

if TYPE_CHECKING:
    from hamal_workers.config import FusionComputeSection, Settings
    from hamal_workers.state import CallRate, Slots, State

log = logging.getLogger("hamal.fusion")
NAME = "fusion"
# Backoff of busy answers and of "a snapshot task already runs": from 0.5 s up to 15 s.
BUSY_BACKOFF_S = (0.5, 1.0, 2.0, 4.0, 8.0, 15.0)
# Task polling: quick first (a snapshot of an idle VM is done in a second), then every 3 s as
# Huawei's own clients do.
POLL_FIRST_S, POLL_MOST_S = 0.1, 3.0
READ_ATTEMPTS = 4  # a read is tried this many times (reconnects, I/O errors) before failing
SLOT_HOLD_S = 120.0  # a reader's slot on a host lasts this long unless renewed


class VrmError(PlatformError):
    """The VRM answered an error: `code` is its errorCode ("" when it gave none)."""

    def __init__(self, message: str, code: str = "", status: int = 0) -> None:
        super().__init__(message)
        self.code = code
        self.status = status


class TransientVrmError(VrmError, TransientPlatformError):
    """Busy, unreachable or a lost session: worth asking again later."""


def _one_line(text: str, limit: int = 300) -> str:
    text = " ".join(str(text).split())
    return text if len(text) <= limit else text[: limit - 3] + "..."


# --------------------------------------------------------------------------- the VRM session


class VrmSession:
    """A logged-in VRM session, shared by a worker process's tasks; see the module's doc."""

    def __init__(self, section: FusionComputeSection, rate: CallRate | None) -> None:
        self.section = section
        self.rate = rate
        self.base = f"https://{_host_in_url(section.vrm_host)}:{section.vrm_port}"
        self.http = requests.Session()
        # Passed with every request: a Session's own `verify` loses to REQUESTS_CA_BUNDLE.
        self.verify: bool | str = False if section.insecure else (section.ca_file or True)
        self.http.headers["Accept"] = wire.ACCEPT.format(version=section.api_version)
        self.http.headers["Content-Type"] = "application/json;charset=UTF-8"
        self._token: str | None = None
        self._lock = threading.Lock()
        self.logins = 0
        self.calls = 0
        at_process_exit(self.logout)

    # --- login ------------------------------------------------------------------------
    def _login(self) -> str:
        s = self.section
        headers = {
            "X-Auth-User": s.user,
            "X-Auth-Key": hashlib.sha256(s.password.encode()).hexdigest(),
            "X-Auth-UserType": str(s.user_type),
            "X-ENCRIPT-ALGORITHM": wire.KEY_ALGORITHM_SHA256,
        }
        answer = self._send("POST", wire.API_PREFIX + "/session", headers=headers, json={})
        body = _json(answer)
        code = _error_code(body)
        where = f"the VRM {s.vrm_host}"
        if answer.status_code != 200 or (code and code != wire.PASSWORD_EXPIRES_SOON):
            if code == wire.BAD_CREDENTIALS:
                raise VrmError(
                    f"fusion: {where} refused the login of {s.user!r}: check [fusion_compute] "
                    "user, password and user_type",
                    code, answer.status_code,
                )  # fmt: skip
            if code in wire.ACCOUNT_LOCKED:
                raise VrmError(f"fusion: {where}: the account {s.user!r} is locked", code)
            if code in wire.PASSWORD_MUST_CHANGE:
                raise VrmError(
                    f"fusion: {where}: the password of {s.user!r} has expired or must be "
                    "changed before the account can be used", code,
                )  # fmt: skip
            raise _error_of(f"login to {where}", answer, body)
        if code == wire.PASSWORD_EXPIRES_SOON:
            log.warning("fusion: the password of %r at %s expires soon", s.user, s.vrm_host)
        token = answer.headers.get("X-Auth-Token", "")
        if not token:
            raise VrmError(f"fusion: {where} answered the login without a token")
        self.logins += 1
        return token

    def logout(self) -> None:
        with self._lock:
            token, self._token = self._token, None
        if token is not None:
            with contextlib.suppress(Exception):
                self.http.delete(
                    self.base + wire.API_PREFIX + "/session",
                    headers={"X-Auth-Token": token},
                    timeout=min(10, self.section.request_timeout),
                    verify=self.verify,
                )

    # --- calls --------------------------------------------------------------------------
    def _send(
        self, method: str, path: str, *, headers: dict[str, str] | None = None, **kwargs: Any
    ) -> requests.Response:
        if self.rate is not None:
            waited = self.rate.take()
            if waited > 1:
                log.info("fusion: waited %.1f s for the fleet's VRM call budget", waited)
        self.calls += 1
        try:
            return self.http.request(
                method, self.base + path, headers=headers,
                timeout=self.section.request_timeout, verify=self.verify, **kwargs,
            )  # fmt: skip
        except requests.exceptions.SSLError as exc:
            raise VrmError(
                f"fusion: the VRM {self.section.vrm_host}'s certificate is not trusted "
                f"({_one_line(str(exc), 160)}): set [fusion_compute] ca_file to the CA that "
                "signed it"
            ) from None
        except requests.RequestException as exc:
            raise TransientVrmError(
                f"fusion: cannot reach the VRM {self.section.vrm_host}:{self.section.vrm_port}: "
                f"{_one_line(str(exc), 200)}"
            ) from None

    def call(
        self, method: str, path: str, what: str, *, json: Any = None,
        params: dict[str, Any] | None = None, busy_codes: frozenset[str] = wire.RETRY_LATER,
    ) -> dict[str, Any]:  # fmt: skip
        """One REST call (`path` under the VRM): its JSON answer, or a VrmError naming `what`.

        An expired session is logged in again once; busy answers are asked again with
        backoff, and a TransientVrmError says so when the VRM stays busy.
        """
        relogged = False
        busy = iter(BUSY_BACKOFF_S)
        while True:
            with self._lock:
                if self._token is None:
                    self._token = self._login()
                token = self._token
            answer = self._send(
                method, path, headers={"X-Auth-Token": token}, json=json, params=params
            )
            if answer.status_code == 200:
                return _json(answer)
            body = _json(answer)
            code = _error_code(body)
            if code == wire.NOT_LOGGED_IN or (answer.status_code == 401 and not code):
                with self._lock:
                    if self._token == token:
                        self._token = None
                if relogged:
                    raise TransientVrmError(
                        f"fusion: {what}: not logged in after a new login", code, 401
                    )
                relogged = True
                log.info("fusion: the VRM session expired; logging in again")
                continue
            if code in busy_codes or answer.status_code == 503:
                pause = next(busy, None)
                if pause is None:
                    raise TransientVrmError(
                        f"fusion: {what}: the VRM stays busy ({_describe(body, answer)})",
                        code, answer.status_code,
                    )  # fmt: skip
                time.sleep(pause)
                continue
            raise _error_of(what, answer, body)

    def pages(self, path: str, key: str, what: str, **params: Any) -> Iterator[dict[str, Any]]:
        """Every item of a listing, `wire.PAGE_LIMIT` at a time."""
        offset = 0
        while True:
            page = self.call(
                "GET", path, what, params={**params, "limit": wire.PAGE_LIMIT, "offset": offset}
            )
            items = page.get(key) or []
            yield from items
            offset += len(items)
            total = int(page.get("total", offset))
            if not items or offset >= total:
                return

    def wait_task(self, task_uri: str, timeout_s: float, what: str) -> dict[str, Any]:
        """Poll a task until it succeeds; VrmError when it fails or outlasts `timeout_s`."""
        deadline = time.monotonic() + timeout_s
        pause = POLL_FIRST_S
        while True:
            task = self.call("GET", task_uri, f"{what} (task)")
            status = str(task.get("status", ""))
            if status == "success":
                return task
            if status in ("failed", "cancelled", "cancelling"):
                reason = task.get("reasonDes") or task.get("reason") or "no reason given"
                raise VrmError(f"fusion: {what} failed: {_one_line(str(reason))}")
            if time.monotonic() + pause > deadline:
                raise VrmError(
                    f"fusion: {what} did not finish within {timeout_s:g} s "
                    f"(the task is {status or 'unknown'}, {task.get('progress', '?')}%)"
                )
            time.sleep(pause)
            pause = min(pause * 2, POLL_MOST_S)

    def local_address(self) -> str:
        """The address this machine reaches the VRM from: the one its hosts can send to."""
        family = socket.AF_INET6 if ":" in self.section.vrm_host else socket.AF_INET
        with socket.socket(family, socket.SOCK_DGRAM) as probe:
            probe.connect((self.section.vrm_host, self.section.vrm_port))
            return str(probe.getsockname()[0])


def _host_in_url(host: str) -> str:
    return f"[{host}]" if ":" in host and not host.startswith("[") else host


def _json(answer: requests.Response) -> dict[str, Any]:
    try:
        body = answer.json()
    except ValueError:
        return {}
    return body if isinstance(body, dict) else {"items": body}


def _error_code(body: dict[str, Any]) -> str:
    return str(body.get("errorCode") or "")


def _describe(body: dict[str, Any], answer: requests.Response) -> str:
    code = _error_code(body)
    text = body.get("errorDes") or answer.reason or ""
    return (
        f"HTTP {answer.status_code}"
        + (f", {code}" if code else "")
        + (f": {_one_line(str(text), 200)}" if text else "")
    )


def _error_of(what: str, answer: requests.Response, body: dict[str, Any]) -> VrmError:
    code = _error_code(body)
    kind = TransientVrmError if answer.status_code >= 500 else VrmError
    return kind(f"fusion: {what}: {_describe(body, answer)}", code, answer.status_code)


def session_for(section: FusionComputeSection, settings: Settings) -> VrmSession:
    def make() -> VrmSession:
        from hamal_workers.state import State

        state = State.from_url(settings.redis.url, settings.redis.socket_timeout)
        rate = state.call_rate(
            f"fusion-vrm:{section.vrm_host}:{section.vrm_port}", section.api_calls_per_minute
        )
        return VrmSession(section, rate)

    return process_shared("fusion-vrm", (section, settings.redis), make)


def fleet_state(settings: Settings) -> State:
    from hamal_workers.state import State

    def make() -> State:
        return State.from_url(settings.redis.url, settings.redis.socket_timeout)

    state: State = process_shared("fusion-state", settings.redis, make)
    return state


def host_slots(settings: Settings, host_ip: str) -> Slots:
    limit = settings.fusion_compute.max_socket_connections_per_host
    return fleet_state(settings).slots(f"fusion-host:{host_ip}", limit, SLOT_HOLD_S)


# --------------------------------------------------------------------------- the VMs


def disk_name(entry: dict[str, Any]) -> str:
    return f"disk{int(entry.get('sequenceNum', 0))}"


def _skip_reason(entry: dict[str, Any]) -> str:
    if entry.get("type") == "share":
        return "a shared disk, which a VM snapshot does not cover"
    if entry.get("indepDisk") is True:
        return "an independent disk, which a VM snapshot does not cover"
    if not entry.get("volumeUrn"):
        return "no volume"
    return ""


def vm_ref_of(vm: dict[str, Any]) -> VmRef | None:
    """The VmRef of a VM listed with its disks (detail=2 or a single GET); None for templates."""
    if vm.get("isTemplate") is True or not vm.get("uuid"):
        return None
    config = vm.get("vmConfig") or {}
    entries = sorted(config.get("disks") or [], key=lambda d: int(d.get("sequenceNum", 0)))
    disks, skipped = [], []
    for entry in entries:
        why = _skip_reason(entry)
        if why:
            skipped.append(f"{disk_name(entry)} ({why})")
            continue
        size = int(float(entry.get("quantityGB") or 0) * (1 << 30))
        disks.append(DiskRef(disk_name(entry), size, str(entry["volumeUrn"])))
    return VmRef(
        str(vm["uuid"]), str(vm.get("name") or vm["uuid"]), NAME, tuple(disks), tuple(skipped),
        facts=vm_facts(vm),
    )  # fmt: skip


def vm_facts(vm: dict[str, Any]) -> dict[str, Any]:
    """What `describe_vm` takes, from a VM's detail."""
    config = vm.get("vmConfig") or {}
    os_options = vm.get("osOptions") or {}
    firmware = str((config.get("properties") or {}).get("bootFirmware") or "").lower()
    nics = []
    for nic in config.get("nics") or []:
        addresses = [nic.get("ip")] if nic.get("ip") else []
        addresses += [a for a in nic.get("ips6") or [] if isinstance(a, str)]
        nics.append({
            "name": nic.get("name"), "mac": nic.get("mac"),
            "network": nic.get("portGroupName") or nic.get("portGroupUrn"),
            "addresses": addresses,
        })  # fmt: skip
    disks = [
        {"name": disk_name(d), "device": f"{str(d.get('pciType') or 'disk').lower()}:"
         f"{d.get('sequenceNum')}", "boot": d.get("systemVolume") is True}
        for d in sorted(config.get("disks") or [], key=lambda d: int(d.get("sequenceNum", 0)))
    ]  # fmt: skip
    return {
        "cpus": (config.get("cpu") or {}).get("quantity"),
        "memory_mib": (config.get("memory") or {}).get("quantityMB"),
        "guest_os": os_options.get("osVersion") or os_options.get("osType"),
        "firmware": {"uefi": "efi"}.get(firmware, firmware or None),
        "nics": nics,
        "disks": disks,
    }


def make_token(cbt_time: str, chg_id: str) -> str:
    return f"{cbt_time}|{chg_id}" if chg_id else ""


def split_token(token: str) -> tuple[str, str] | None:
    cbt_time, sep, chg_id = token.rpartition("|")
    return (cbt_time, chg_id) if sep and chg_id else None


def extents_of_blocks(blocks: list[int], block_size: int, size: int) -> list[Extent]:
    """Adjacent blocks as one extent each, the last clipped to the disk's end."""
    found: list[Extent] = []
    start = previous = None
    for block in [*blocks, None]:
        if block is not None and previous is not None and block == previous + 1:
            previous = block
            continue
        if start is not None and previous is not None:
            offset = start * block_size
            end = min((previous + 1) * block_size, size)
            if end > offset:
                found.append(Extent(offset, end - offset))
        start = previous = block
    return found


# --------------------------------------------------------------------------- reading


class BackupResource:
    """One disk's backup resource: made, kept alive while the disk syncs, released."""

    def __init__(self, source: FusionDiskSource) -> None:
        self.source = source
        self.session = source.platform.session
        self.section = source.platform.section
        self.generation = 0
        self.info: dict[str, Any] = {}
        self.uri = ""
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._keeper: threading.Thread | None = None

    def current(self) -> tuple[int, dict[str, Any]]:
        with self._lock:
            if not self.uri:
                self._make()
            return self.generation, self.info

    def renew(self, generation: int, why: str) -> None:
        """The host refused the resource of `generation` (expired): make a new one, once."""
        with self._lock:
            if generation != self.generation or not self.uri:
                return  # another reader already did
            log.warning("fusion: %s: %s: making the backup resource again", self.source.where,
                        why)  # fmt: skip
            self._release_locked()
            self._make()

    def _make(self) -> None:
        s, src = self.section, self.source
        info = src.info
        body = {
            "delay": s.backup_resource_delay,
            "taskType": "CBTBackup",
            "ip": src.platform.local_ip(),
            "snapUrn2": src.snapshot.details["snapshot_urn"],
            "volCBTCreateTime": info["cbt_time"],
            "transMode": s.transport_mode,
        }
        path = f"{info['site_uri']}/volumes/{info['volume_id']}/backupresources"
        made = self.session.call("POST", path, f"a backup resource for {src.where}", json=body)
        self.uri = str(made.get("uri") or wire.urn_to_uri(str(made["urn"])))
        # Held in Redis at once: if this worker is killed, the next attempt releases it.
        src.platform.hold(src.snapshot, self.uri, src.disk)
        self.generation += 1
        deadline = time.monotonic() + s.task_timeout
        pause = POLL_FIRST_S
        while True:
            found = self.session.call("GET", self.uri, f"the backup resource of {src.where}")
            status = str(found.get("status", ""))
            if status == "success":
                self.info = found
                break
            if status in ("failed", "error"):
                self._release_locked()
                # Only its status: the answer carries the resource's token, which reads the disk.
                raise VrmError(
                    f"fusion: the backup resource of {src.where} ended {status}: "
                    f"{_one_line(str(found.get('reasonDes') or found.get('reason') or ''))}"
                )
            if time.monotonic() + pause > deadline:
                self._release_locked()
                raise VrmError(
                    f"fusion: the backup resource of {src.where} was not ready within "
                    f"{s.task_timeout} s"
                )
            time.sleep(pause)
            pause = min(pause * 2, POLL_MOST_S)
        if self._keeper is None:
            self._keeper = threading.Thread(
                target=self._keep_alive, daemon=True, name=f"fusion-keepalive:{src.disk}"
            )
            self._keeper.start()

    def _keep_alive(self) -> None:
        every = self.section.backup_resource_delay / 3
        while not self._stop.wait(every):
            with self._lock:
                uri = self.uri
            if not uri:
                continue
            try:
                self.session.call(
                    "PUT", uri, f"keeping the backup resource of {self.source.where}",
                    json={"delay": self.section.backup_resource_delay},
                )  # fmt: skip
            except PlatformError as exc:
                # A reader that meets the expired resource makes it again.
                log.warning("fusion: %s", exc)

    def _release_locked(self) -> None:
        uri, self.uri, self.info = self.uri, "", {}
        if uri:
            self.source.platform.release_resource(self.source.snapshot, uri, self.source.where)

    def close(self) -> None:
        self._stop.set()
        with self._lock:
            self._release_locked()
        if self._keeper is not None:
            self._keeper.join(timeout=5)


class _Refused(Exception):
    """The host refused the resource (bad token, no file): it must be made again."""


class FusionSocketReader(RequestReader):
    """One backup-socket connection to the disk's host, opened at the first read."""

    def __init__(self, source: FusionDiskSource) -> None:
        self.source = source
        self.settings = source.platform.settings
        self.section = source.platform.section
        self.holder = f"{socket.gethostname()}:{os.getpid()}:{secrets.token_hex(6)}"
        self._sock: socket.socket | None = None
        self._slots: Slots | None = None
        self._handle = 0
        self._generation = 0
        self._sequence = 0
        self._renewed_at = 0.0
        self._head = bytearray(wire.READ_REPLY.size)
        self.max_request = wire.ASSUMED_MAX_READ

    def read_request(self, offset: int, view: memoryview) -> int:
        failures: list[str] = []
        while True:
            try:
                self._connect()
                return self._read(offset, view)
            except _Refused as exc:
                self._disconnect()
                failures.append(str(exc))
                self.source.resource.renew(self._generation, str(exc))
            except (OSError, wire.WireError, _IoError) as exc:
                self._disconnect()
                failures.append(_one_line(str(exc) or type(exc).__name__, 200))
                log.warning("fusion: %s: read at %d: %s; trying again", self.source.where,
                            offset, failures[-1])  # fmt: skip
            if len(failures) >= READ_ATTEMPTS:
                raise TransientPlatformError(
                    f"fusion: {self.source.where}: reading {len(view)} bytes at {offset} failed "
                    f"{len(failures)} times; last: {failures[-1]}"
                )
            time.sleep(min(0.2 * 2 ** len(failures), 5))

    # --- connection -------------------------------------------------------------------
    def _connect(self) -> None:
        if self._sock is not None:
            if time.monotonic() - self._renewed_at > SLOT_HOLD_S / 3:
                self._renew_slot()
            return
        generation, info = self.source.resource.current()
        host, port = str(info["hostIP"]), int(info["hostPort"])
        self._slots = host_slots(self.settings, host)
        self._take_slot(host)
        try:
            sock = socket.create_connection((host, port), timeout=self.section.request_timeout)
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            if self.section.transport_mode == "lanssl":
                sock = self._tls(sock, str(info.get("caCert") or ""), host)
            self._sock = sock
            self._generation = generation
            body = wire.OPEN_REQUEST.pack(
                str(info["targetFile"]).encode(), str(info["token"]).encode(), 0
            )
            reply = self._call(wire.OP_OPEN, body)
            result, handle = wire.OPEN_REPLY.unpack_from(reply)
            if result in (wire.BAD_TOKEN, wire.NO_FILE):
                raise _Refused(f"the host refused the resource: {wire.result_text(result)}")
            if result != wire.OK:
                raise PlatformError(
                    f"fusion: {self.source.where}: the host {host} refused to open the snapshot: "
                    f"{wire.result_text(result)}"
                )
            self._handle = handle
        except BaseException:
            self._disconnect()
            raise

    def _tls(self, sock: socket.socket, ca_pem: str, host: str) -> socket.socket:
        if not ca_pem:
            sock.close()
            raise PlatformError(
                f"fusion: {self.source.where}: transport_mode is lanssl but the backup resource "
                "gave no CA certificate"
            )
        context = ssl.create_default_context(cadata=ca_pem)
        # The CA comes from the authenticated VRM for this one resource: the chain is checked
        # against it; a CNA host's certificate need not name the address it is reached at.
        context.check_hostname = False
        return context.wrap_socket(sock, server_hostname=host)

    def _take_slot(self, host: str) -> None:
        assert self._slots is not None
        deadline = time.monotonic() + self.section.task_timeout
        pause = 0.05
        while not self._slots.try_take(self.holder):
            if time.monotonic() > deadline:
                raise TransientPlatformError(
                    f"fusion: {self.source.where}: no socket to host {host} came free within "
                    f"{self.section.task_timeout} s ({self._slots.limit} in use)"
                )
            time.sleep(pause)
            pause = min(pause * 2, 1.0)
        self._renewed_at = time.monotonic()

    def _renew_slot(self) -> None:
        assert self._slots is not None
        if not self._slots.renew(self.holder):
            # The hold ran out (a long stall): the slot may be another's now; start again.
            self._disconnect()
            raise OSError("the slot on the host ran out")
        self._renewed_at = time.monotonic()

    def _disconnect(self) -> None:
        sock, self._sock = self._sock, None
        if sock is not None:
            with contextlib.suppress(OSError):
                sock.close()
        if self._slots is not None:
            with contextlib.suppress(Exception):
                self._slots.release(self.holder)

    # --- frames ---------------------------------------------------------------------
    def _send(self, operation: int, body: bytes) -> int:
        assert self._sock is not None
        self._sequence = (self._sequence + 1) & 0xFFFFFFFF
        self._sock.sendall(wire.frame(operation, self._sequence, body))
        return self._sequence

    def _answer(self, operation: int, sequence: int) -> wire.Header:
        assert self._sock is not None
        header = wire.recv_header(self._sock)
        if header.operation != operation or header.sequence != sequence:
            raise wire.WireError(
                f"an answer to operation {header.operation} #{header.sequence}, expected "
                f"{operation} #{sequence}"
            )
        return header

    def _call(self, operation: int, body: bytes) -> memoryview:
        sequence = self._send(operation, body)
        assert self._sock is not None
        return wire.recv_body(self._sock, self._answer(operation, sequence))

    def _read(self, offset: int, view: memoryview) -> int:
        sequence = self._send(wire.OP_READ, wire.READ_REQUEST.pack(self._handle, offset, len(view)))
        header = self._answer(wire.OP_READ, sequence)
        assert self._sock is not None
        head = memoryview(self._head)
        if header.length < len(head):
            raise wire.WireError(f"a read answer of {header.length} bytes")
        wire.recv_exact(self._sock, head)
        result, length = wire.READ_REPLY.unpack(head)
        if length != header.length - len(head) or length > len(view):
            raise wire.WireError(f"a read answer of {length} bytes in a frame of {header.length}")
        wire.recv_exact(self._sock, view[:length])
        checksum = zlib.crc32(view[:length], zlib.crc32(head)) & 0xFFFFFFFF
        if checksum.to_bytes(4, "big") != header.crc:
            raise wire.WireError(f"CRC mismatch in a read answer of {length} bytes")
        if result in (wire.BAD_TOKEN, wire.NO_FILE):
            raise _Refused(f"the host refused the read: {wire.result_text(result)}")
        if result == wire.BAD_HANDLE:  # the host forgot the open file: open it again
            raise wire.WireError(f"the host answered {wire.result_text(result)}")
        if result in wire.IO_ERRORS:
            raise _IoError(f"the host answered {wire.result_text(result)}")
        if result != wire.OK:
            raise PlatformError(
                f"fusion: {self.source.where}: reading {len(view)} bytes at {offset}: the host "
                f"answered {wire.result_text(result)}"
            )
        return length

    def close(self) -> None:
        if self._sock is not None and self._handle:
            with contextlib.suppress(Exception):
                self._call(wire.OP_CLOSE, wire.CLOSE_REQUEST.pack(self._handle))
        self._disconnect()


class _IoError(Exception):
    """The host could not read its disk (result 8 or 10): worth one more try."""


class FusionDiskSource(DiskSource):
    """One disk at one of the proxy's snapshots: its bitmaps, its backup resource, readers."""

    def __init__(self, platform: FusionComputePlatform, snapshot: Snapshot, disk: str) -> None:
        super().__init__(snapshot, disk)
        self.platform = platform
        self.info = snapshot.disks[disk]
        self.where = f"VM {snapshot.vm_id} {disk}"
        platform.release_stale(snapshot, disk)
        self.resource = BackupResource(self)

    def _bitmap(self, chg_id: str | None) -> list[Extent] | None:
        """getcbt over the whole disk; None when the VRM says the base is not on the chain."""
        info = self.info
        session = self.platform.session
        blocks: list[int] = []
        block_size = 0
        start, total = 0, None
        while total is None or start < total:
            body: dict[str, Any] = {
                "type": "DiffBitmapAndBit1Num",
                "snapUuid": info["snap_uuid"],
                "volCBTCreateTime": info["cbt_time"],
                "startBlock": start,
                "blockNum": wire.CBT_BLOCKS_PER_CALL,
            }
            if chg_id:
                body["chgID"] = chg_id
            try:
                answer = session.call(
                    "POST", f"{info['volume_uri']}/getcbt", f"changed blocks of {self.where}",
                    json=body,
                )  # fmt: skip
            except VrmError as exc:
                if chg_id and exc.code in (wire.NOT_ON_ONE_CHAIN, wire.SNAPSHOT_MISSING):
                    log.warning("fusion: %s: no changes since ChgID %s: %s", self.where, chg_id,
                                exc)  # fmt: skip
                    return None
                raise
            sectors = int(answer.get("sectorOfBlock") or 0)
            bit_num = int(answer.get("bitNum") or 0)
            if sectors <= 0 or (block_size and sectors * wire.ASSUMED_SECTOR_SIZE != block_size):
                raise PlatformError(f"fusion: {self.where}: getcbt gave sectorOfBlock {sectors}")
            block_size = sectors * wire.ASSUMED_SECTOR_SIZE
            total = -(-self.size // block_size)
            try:
                blocks += wire.decode_bitmap(
                    str(answer.get("bitMap") or ""), start, bit_num, int(answer.get("bit1Num", -1))
                )
            except wire.BitmapError as exc:
                raise PlatformError(
                    f"fusion: {self.where}: getcbt from block {start}: {exc}; refusing to guess "
                    "which blocks changed"
                ) from None
            if bit_num <= 0 and start < total:
                raise PlatformError(f"fusion: {self.where}: getcbt stops at block {start}")
            start += bit_num
        return extents_of_blocks(blocks, block_size, self.size)

    def allocated_extents(self) -> list[Extent]:
        found = self._bitmap(None)
        return found if found is not None else [Extent(0, self.size)]

    def changed_extents(self, base_token: str) -> list[Extent] | None:
        base = split_token(base_token)
        if base is None or not self.token:
            return None
        if base[0] != self.info["cbt_time"]:
            log.warning("fusion: %s: change tracking was reset since %r: reading everything "
                        "the bitmap marks", self.where, base_token)  # fmt: skip
            return None
        return self._bitmap(base[1])

    def open_reader(self) -> DiskReader:
        return FusionSocketReader(self)

    def close(self) -> None:
        self.resource.close()


# --------------------------------------------------------------------------- the platform


class FusionComputePlatform(Platform):
    name = NAME
    # getcbt answers between two snapshots of one chain: the base stays until the next commit.
    keeps_base_snapshot = True
    # One snapshot listing per VM: at 1,000 VMs that is minutes of the VRM's call budget.
    leftover_listing_every_s = 3600

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.section = settings.fusion_compute
        self.session = session_for(self.section, settings)
        self._vm_uris: dict[str, str] = {}
        self._local_ip = self.section.local_host_ip

    # --- backup resources held in Redis -----------------------------------------------
    def hold(self, snapshot: Snapshot, uri: str, disk: str) -> None:
        fleet_state(self.settings).hold(
            NAME, snapshot.snapshot_id, uri, {"disk": disk, "made": time.time()}
        )

    def release_resource(self, snapshot: Snapshot, uri: str, where: str) -> None:
        """DELETE a backup resource and forget it; one already gone is released."""
        try:
            self.session.call("DELETE", uri, f"releasing the backup resource of {where}")
        except VrmError as exc:
            if exc.code != wire.NO_SUCH_OBJECT:
                log.warning("fusion: %s (it expires by itself)", exc)
                return
        fleet_state(self.settings).unhold(NAME, snapshot.snapshot_id, uri)

    def release_stale(self, snapshot: Snapshot, disk: str | None = None) -> None:
        """Release what an earlier attempt (a killed worker) held for this snapshot's `disk`,
        or for all its disks. The disk's lease makes this task the only one reading it."""
        held = fleet_state(self.settings).held(NAME, snapshot.snapshot_id)
        for uri, record in held.items():
            if disk is None or record.get("disk") == disk:
                log.info("fusion: releasing the backup resource %s left by an earlier attempt "
                         "on %s", uri, record.get("disk"))  # fmt: skip
                self.release_resource(snapshot, uri, f"VM {snapshot.vm_id} {record.get('disk')}")

    def local_ip(self) -> str:
        if not self._local_ip:
            self._local_ip = self.session.local_address()
        return self._local_ip

    def _wanted(self) -> set[str]:
        return {v.strip() for v in self.section.vms.split(",") if v.strip()}

    def _sites(self) -> list[dict[str, Any]]:
        found = self.session.call("GET", wire.API_PREFIX + "/sites", "listing sites")
        return [s for s in found.get("sites") or [] if s.get("uri")]

    def discover(self) -> list[VmRef]:
        wanted = self._wanted()
        refs = []
        for site in self._sites():
            for vm in self.session.pages(f"{site['uri']}/vms", "vms", "listing VMs", detail=2):
                if wanted and not wanted & {vm.get("uuid"), vm.get("urn"), vm.get("name")}:
                    continue
                ref = vm_ref_of(vm)
                if ref is not None:
                    self._vm_uris[ref.vm_id] = str(vm.get("uri") or wire.urn_to_uri(vm["urn"]))
                    refs.append(ref)
        return refs

    def _vm_uri(self, vm_id: str) -> str | None:
        uri = self._vm_uris.get(vm_id)
        if uri:
            return uri
        for site in self._sites():
            page = self.session.call(
                "GET", f"{site['uri']}/vms", f"finding VM {vm_id}",
                params={"uuid": vm_id, "limit": 1, "offset": 0},
            )  # fmt: skip
            for vm in page.get("vms") or []:
                if vm.get("uuid") == vm_id:
                    uri = str(vm.get("uri") or wire.urn_to_uri(vm["urn"]))
                    self._vm_uris[vm_id] = uri
                    return uri
        return None

    def _vm_detail(self, vm_id: str) -> dict[str, Any]:
        uri = self._vm_uri(vm_id)
        if uri is None:
            raise PlatformError(f"fusion: no VM with UUID {vm_id}")
        try:
            return self.session.call("GET", uri, f"reading VM {vm_id}")
        except VrmError as exc:
            if exc.code == wire.NO_SUCH_OBJECT:
                self._vm_uris.pop(vm_id, None)
                raise PlatformError(f"fusion: no VM with UUID {vm_id} (it was deleted)") from None
            raise

    def vm(self, vm_id: str) -> VmRef:
        ref = vm_ref_of(self._vm_detail(vm_id))
        if ref is None:
            raise PlatformError(f"fusion: {vm_id} is a template, not a VM")
        return ref

    def describe(self, vm: VmRef) -> dict[str, Any]:
        return describe_vm(vm, vm_facts(self._vm_detail(vm.vm_id)))

    # --- snapshots ----------------------------------------------------------------
    def create_snapshot(self, vm: VmRef, snapshot_id: str) -> Snapshot:
        run_id = run_of_snapshot(snapshot_id)
        if run_id is None:
            raise PlatformError(f"fusion: {snapshot_id!r} is not a name of the proxy's snapshots")
        detail = self._vm_detail(vm.vm_id)
        vm_uri = str(detail.get("uri") or wire.urn_to_uri(detail["urn"]))
        created = time.time()
        body = {
            "name": snapshot_id,
            "description": f"Hamal restore point {run_id}; the proxy removes it",
            "needMemoryShot": False,
            "isConsistent": False,
            "type": "CBTbackup",
        }
        made = self._snapshot_call(
            "POST", f"{vm_uri}/snapshots", f"snapshot of VM {vm.name}", body,
            self.section.create_snap_task_timeout,
        )  # fmt: skip
        snapshot_uri = str(made.get("uri") or wire.urn_to_uri(str(made["urn"])))
        record = Snapshot(snapshot_id, vm.vm_id, self.name, created,
                          details={"vm_uri": vm_uri, "snapshot_uri": snapshot_uri})  # fmt: skip
        try:
            self.session.wait_task(
                str(made["taskUri"]), self.section.create_snap_task_timeout,
                f"snapshot {snapshot_id} of VM {vm.name}",
            )  # fmt: skip
            found = self.session.call("GET", snapshot_uri, f"snapshot {snapshot_id}")
            disks = self._snapshot_disks(vm, detail, found)
        except BaseException:
            with contextlib.suppress(Exception):
                self.delete_snapshot(record)
            raise
        details = {
            "vm_uri": vm_uri,
            "snapshot_uri": snapshot_uri,
            "snapshot_urn": str(found.get("urn") or made.get("urn") or ""),
        }
        description = describe_vm(vm, vm_facts(detail), disks)
        return Snapshot(
            snapshot_id, vm.vm_id, self.name, created, disks, "vm",
            "crash-consistent (FusionCompute snapshots without quiescing)", details, description,
        )  # fmt: skip

    def _snapshot_call(
        self, method: str, path: str, what: str, body: Any, timeout_s: float
    ) -> dict[str, Any]:
        """A snapshot call that waits while another snapshot task of the VM runs (10300112)."""
        deadline = time.monotonic() + timeout_s
        pause = 0.5
        while True:
            try:
                return self.session.call(method, path, what, json=body)
            except VrmError as exc:
                if exc.code == wire.SNAPSHOT_LIMIT:
                    raise PlatformError(
                        f"fusion: {what}: the VM has as many snapshots as FusionCompute allows "
                        "(10300111): delete some of its snapshots (the proxy keeps at most two)"
                    ) from None
                if exc.code != wire.SNAPSHOT_TASK_RUNNING:
                    raise
                if time.monotonic() + pause > deadline:
                    raise PlatformError(
                        f"fusion: {what}: another snapshot task of the VM kept running for "
                        f"{timeout_s:g} s"
                    ) from None
                log.info("fusion: %s: another snapshot task of the VM runs; waiting", what)
                time.sleep(pause)
                pause = min(pause * 2, 15.0)

    def _snapshot_disks(
        self, vm: VmRef, detail: dict[str, Any], found: dict[str, Any]
    ) -> dict[str, dict[str, Any]]:
        by_volume = {str(v.get("volumeUrn")): v for v in found.get("volsnapshots") or []}
        site_uri = wire.urn_to_uri(":".join(str(detail["urn"]).split(":")[:3]))
        disks: dict[str, dict[str, Any]] = {}
        for ref in vm.disks:
            entry = by_volume.get(ref.locator)
            if entry is None:
                raise PlatformError(
                    f"fusion: snapshot of VM {vm.name} has no volume {ref.locator} ({ref.name})"
                )
            volume_uri = str(entry.get("volumeUri") or wire.urn_to_uri(ref.locator))
            volume = self.session.call("GET", volume_uri, f"volume of {vm.name} {ref.name}")
            size = int(volume.get("size") or 0) or int(float(volume["quantityGB"]) * (1 << 30))
            cbt_time, chg_id = str(entry.get("volCBTCreateTime") or ""), str(entry.get("ChgID", ""))
            disks[ref.name] = {
                "size": size,
                "token": make_token(cbt_time, chg_id),
                "identity": f"fusion:{vm.vm_id}/{volume.get('uuid') or ref.locator}",
                "volume_urn": ref.locator,
                "volume_uri": volume_uri,
                "volume_id": volume_uri.rsplit("/", 1)[-1],
                "site_uri": site_uri,
                "snap_uuid": str(entry.get("snapUuid") or ""),
                "cbt_time": cbt_time,
            }
        return disks

    def delete_snapshot(self, snapshot: Snapshot) -> None:
        name = snapshot.snapshot_id
        if run_of_snapshot(name) is None:
            raise PlatformError(
                f"fusion: {name!r} is not one of the proxy's snapshots: not deleted"
            )
        self.release_stale(snapshot)
        uris = (
            [str(snapshot.details["snapshot_uri"])] if snapshot.details.get("snapshot_uri") else []
        )
        if not uris:
            vm_uri = snapshot.details.get("vm_uri") or self._vm_uri(snapshot.vm_id)
            if vm_uri is None:
                return  # the VM is gone, and its snapshots with it
            uris = [s["uri"] for s in self._snapshots(str(vm_uri)) if s.get("name") == name]
        for uri in uris:
            try:
                task = self._snapshot_call(
                    "DELETE", uri, f"removing snapshot {name}", None,
                    self.section.delete_snap_task_timeout,
                )  # fmt: skip
            except VrmError as exc:
                if exc.code in (wire.SNAPSHOT_MISSING, wire.NO_SUCH_OBJECT):
                    continue  # gone already
                raise
            self.session.wait_task(
                str(task["taskUri"]), self.section.delete_snap_task_timeout,
                f"removing snapshot {name}",
            )  # fmt: skip

    def _snapshots(self, vm_uri: str) -> list[dict[str, Any]]:
        tree = self.session.call("GET", f"{vm_uri}/snapshots", "listing snapshots")
        found: list[dict[str, Any]] = []
        todo = list(tree.get("rootSnapshots") or [])
        while todo:
            item = todo.pop()
            found.append(item)
            todo.extend(item.get("childSnapshots") or [])
        return found

    def leftover_snapshots(self) -> list[Snapshot]:
        wanted = self._wanted()
        found = []
        for site in self._sites():
            for vm in self.session.pages(f"{site['uri']}/vms", "vms", "listing VMs"):
                if wanted and not wanted & {vm.get("uuid"), vm.get("urn"), vm.get("name")}:
                    continue
                vm_uri = str(vm.get("uri") or wire.urn_to_uri(vm["urn"]))
                for snap in self._snapshots(vm_uri):
                    if run_of_snapshot(str(snap.get("name"))) is None:
                        continue
                    found.append(Snapshot(
                        str(snap["name"]), str(vm["uuid"]), self.name, _created(snap),
                        details={"vm_uri": vm_uri, "snapshot_uri": str(snap.get("uri") or "")},
                    ))  # fmt: skip
        return found

    # --- disks --------------------------------------------------------------------
    def open_disk(self, snapshot: Snapshot, disk: str) -> DiskSource:
        if disk not in snapshot.disks:
            raise PlatformError(f"fusion: snapshot {snapshot.snapshot_id} has no disk {disk}")
        return FusionDiskSource(self, snapshot, disk)


def _created(snap: dict[str, Any]) -> float:
    """When a snapshot was made (its createTime, UTC); now when the VRM's text is not a time."""
    text = str(snap.get("createTime") or "").replace("T", " ")[:19]
    with contextlib.suppress(ValueError):
        return calendar.timegm(time.strptime(text, "%Y-%m-%d %H:%M:%S"))
    return time.time()


def _create(settings: Settings) -> Platform:
    return FusionComputePlatform(settings)


SPEC = PlatformSpec(
    name=NAME,
    enabled=lambda settings: bool(settings.fusion_compute.vrm_host),
    create=_create,
    max_writers=lambda settings: settings.fusion_compute.max_writer_num,
)
