"""The Mass management service (`[mass]`): the client of `docs/mass-api.yaml`, the checks of
the sync tasks it signs, and where their credentials live.

- **Calls**: HTTPS to `mass_endpoint` with `X-Auth-Key: auth_key`, the certificate checked
  against `ca_file` (or the system's CAs; `insecure` only when set), every call bounded by
  `default_request_timeout`. Unreachable or 5xx is `MassUnreachable` (the caller keeps the
  last verified list and queues its reports); a refused key is a `MassError` that says to
  check `[mass] auth_key`. No error message carries a secret or a task's content.
- **Tasks**: each arrives as `{document, signature}`: the base64 of a JSON text and Mass'
  Ed25519 signature over exactly those bytes, checked with the public key at
  `public_key_path`. A task is refused -- and reported and logged, by its id only -- when it
  is unsigned, wrongly signed, not JSON, meant for another exporter, missing a field, for an
  unknown platform, or older than a version of the same task already accepted (a replay).
- **Credentials** (a task's `source`) never reach a log, a Celery message, a result or
  Flower, and reach Redis only sealed: AES-256-GCM under the proxy's own key
  (`hamal_lib_dir/mass/sources.key`, 32 random bytes, mode 0600, made once), the task id and
  version as associated data. What Redis holds in clear is the task without its source
  (`TaskView`); a worker that needs the connection opens the sealed source by task id.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import json
import logging
import os
import re
import secrets
import stat
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import requests
from cryptography.exceptions import InvalidSignature, InvalidTag
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from cryptography.hazmat.primitives.serialization import load_pem_public_key

import hamal_workers
from hamal_workers import fsutil
from hamal_workers.config import mask_url

if TYPE_CHECKING:
    from hamal_workers.config import MassSection, Settings
    from hamal_workers.state import State

log = logging.getLogger("hamal.mass")

PLATFORMS = ("vmware", "ceph", "fusion", "local")
MIN_INTERVAL_S = 5  # as [period] interval
_TASK_ID = re.compile(r"^[A-Za-z0-9_.-]{1,64}$")
SOURCES_KEY = "mass/sources.key"
KEY_SIZE = 32
NONCE_SIZE = 12


class MassError(Exception):
    """Mass refused a call, or its answer cannot be used; the message says which call."""


class MassUnreachable(MassError):
    """Mass cannot be reached or answers errors: try later, protect with the last list."""


# --------------------------------------------------------------------------- the client


class MassClient:
    def __init__(self, section: MassSection) -> None:
        self.section = section
        self.base = section.mass_endpoint.rstrip("/")
        self.shown = mask_url(self.base)  # what messages say: never a password in the URL
        self.exporter = section.hyper_exporter_id
        self.http = requests.Session()
        self.http.headers["X-Auth-Key"] = section.auth_key
        self.http.headers["Accept"] = "application/json"
        # Passed with every request: a Session's own `verify` loses to REQUESTS_CA_BUNDLE.
        self.verify: bool | str = False if section.insecure else (section.ca_file or True)

    def _call(self, method: str, path: str, what: str, body: Any = None) -> requests.Response:
        url = f"{self.base}/exporters/{self.exporter}{path}"
        try:
            answer = self.http.request(
                method, url, json=body, verify=self.verify,
                timeout=self.section.default_request_timeout,
            )  # fmt: skip
        except requests.exceptions.SSLError as exc:
            raise MassError(
                f"mass: {what}: the certificate of {self.shown} is not trusted "
                f"({_short(exc)}): set [mass] ca_file to the CA that signed it"
            ) from None
        except requests.RequestException as exc:
            raise MassUnreachable(
                f"mass: {what}: cannot reach {self.shown}: {_short(exc)}"
            ) from None
        if answer.status_code == 401:
            raise MassError(
                f"mass: {what}: {self.shown} refused the auth key: check [mass] auth_key"
            )
        if answer.status_code >= 500:
            raise MassUnreachable(f"mass: {what}: {self.shown} answered HTTP {answer.status_code}")
        return answer

    def register(self, body: dict[str, Any]) -> dict[str, Any]:
        answer = self._call("POST", "/register", "registering", body)
        if answer.status_code != 200:
            raise MassError(f"mass: registering: HTTP {answer.status_code}: {_message(answer)}")
        return _object(answer, "registering")

    def heartbeat(self, body: dict[str, Any]) -> bool:
        """True when received; False when Mass does not know this exporter (register again)."""
        answer = self._call("POST", "/heartbeat", "heartbeat", body)
        if answer.status_code == 404:
            return False
        if answer.status_code != 200:
            raise MassError(f"mass: heartbeat: HTTP {answer.status_code}: {_message(answer)}")
        return True

    def tasks(self) -> list[Any]:
        answer = self._call("GET", "/tasks", "listing tasks")
        if answer.status_code != 200:
            raise MassError(f"mass: listing tasks: HTTP {answer.status_code}: {_message(answer)}")
        found = _object(answer, "listing tasks").get("tasks")
        if not isinstance(found, list):
            raise MassError("mass: listing tasks: the answer has no task list")
        return found

    def report(self, task_id: str, report: dict[str, Any]) -> bool:
        """True when Mass has the report (now, or from an earlier delivery: 409)."""
        answer = self._call("POST", f"/tasks/{task_id}/status", f"reporting task {task_id}", report)
        if answer.status_code in (200, 409):
            return True
        if answer.status_code == 404:
            log.warning("mass: task %s is unknown to Mass; its report is dropped", task_id)
            return True
        raise MassError(
            f"mass: reporting task {task_id}: HTTP {answer.status_code}: {_message(answer)}"
        )


def _short(exc: BaseException, limit: int = 200) -> str:
    text = " ".join(str(exc).split()) or type(exc).__name__
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _message(answer: requests.Response) -> str:
    try:
        body = answer.json()
    except ValueError:
        return answer.reason or ""
    if isinstance(body, dict):
        return _short(f"{body.get('code', '')} {body.get('message', '')}".strip(), 160)
    return ""


def _object(answer: requests.Response, what: str) -> dict[str, Any]:
    try:
        body = answer.json()
    except ValueError:
        raise MassError(f"mass: {what}: the answer is not JSON") from None
    if not isinstance(body, dict):
        raise MassError(f"mass: {what}: the answer is not a JSON object")
    return body


# --------------------------------------------------------------------------- signed tasks


def load_public_key(path: str) -> Ed25519PublicKey:
    """Mass' public key; a clear error naming `[mass] public_key_path` otherwise."""
    where = f"[mass] public_key_path = {path}"
    try:
        info = os.stat(path)
        if not stat.S_ISREG(info.st_mode):
            raise MassError(f"{where}: not a regular file")
        if info.st_size > 64 * 1024:
            raise MassError(f"{where}: larger than 64 KiB, not a public key")
        with open(path, "rb") as f:
            data = f.read()
    except OSError as exc:
        raise MassError(f"{where}: cannot read: {exc.strerror or exc}") from None
    try:
        key = load_pem_public_key(data)
    except ValueError:
        raise MassError(f"{where}: not a PEM public key") from None
    if not isinstance(key, Ed25519PublicKey):
        raise MassError(f"{where}: not an Ed25519 key (Mass signs tasks with Ed25519)")
    return key


@dataclass(frozen=True)
class TaskView:
    """A verified task without its credentials: what Redis, logs and reports may hold."""

    task_id: str
    version: int
    platform: str
    vm_id: str
    vm_name: str
    interval_s: int
    enabled: bool = True
    ip_mapping: list[dict[str, Any]] = field(default_factory=list)
    issued_at: float = 0.0

    def to_json(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> TaskView:
        return cls(**data)


@dataclass(frozen=True)
class VerifiedTask:
    view: TaskView
    source: dict[str, Any]  # the connection, credentials included: seal before storing


@dataclass(frozen=True)
class Refusal:
    task_id: str  # "" when the envelope does not say
    reason: str  # says why; never the document's content


def verify(
    envelope: Any, public_key: Ed25519PublicKey, exporter_id: str, accepted: dict[str, int]
) -> VerifiedTask | Refusal:
    """Check one envelope of the task list; `accepted` maps task id -> highest version taken."""
    if not isinstance(envelope, dict) or not isinstance(envelope.get("document"), str):
        return Refusal("", "not a task envelope (no document)")
    try:
        document = base64.b64decode(envelope["document"], validate=True)
    except (binascii.Error, ValueError):
        return Refusal("", "the document is not base64")
    claimed = _claimed_id(document)
    signature = envelope.get("signature")
    if not signature:
        return Refusal(claimed, "unsigned")
    try:
        public_key.verify(base64.b64decode(str(signature), validate=True), document)
    except (InvalidSignature, binascii.Error, ValueError):
        return Refusal(claimed, "wrongly signed: the signature does not verify with Mass' key")
    try:
        task = json.loads(document)
    except ValueError:
        return Refusal(claimed, "signed, but not JSON")
    if not isinstance(task, dict):
        return Refusal(claimed, "signed, but not a JSON object")
    task_id = task.get("task_id")
    if not isinstance(task_id, str) or not _TASK_ID.match(task_id):
        return Refusal("", "no valid task_id")
    if task.get("exporter_id") != exporter_id:
        return Refusal(task_id, f"meant for exporter {str(task.get('exporter_id'))[:64]!r}")
    version = task.get("version")
    if not isinstance(version, int) or isinstance(version, bool) or version < 1:
        return Refusal(task_id, "no valid version")
    known = accepted.get(task_id, 0)
    if version < known:
        return Refusal(task_id, f"replayed: version {version}, version {known} already accepted")
    platform = task.get("platform")
    if platform not in PLATFORMS:
        return Refusal(task_id, f"unknown platform {str(platform)[:32]!r}")
    vm = task.get("vm")
    source = task.get("source")
    schedule = task.get("schedule")
    if not isinstance(vm, dict) or not isinstance(vm.get("id"), str) or not vm["id"]:
        return Refusal(task_id, "no vm.id")
    if not isinstance(source, dict):
        return Refusal(task_id, "no source")
    interval = schedule.get("interval_s") if isinstance(schedule, dict) else None
    if not isinstance(interval, int) or isinstance(interval, bool) or interval < MIN_INTERVAL_S:
        return Refusal(task_id, f"no schedule.interval_s of {MIN_INTERVAL_S} seconds or more")
    mapping = task.get("ip_mapping") or []
    if not isinstance(mapping, list) or not all(isinstance(m, dict) for m in mapping):
        return Refusal(task_id, "ip_mapping is not a list of objects")
    view = TaskView(
        task_id=task_id,
        version=version,
        platform=platform,
        vm_id=vm["id"],
        vm_name=str(vm.get("name") or vm["id"]),
        interval_s=interval,
        enabled=task.get("enabled", True) is not False,
        ip_mapping=[_public_mapping(m) for m in mapping],
        issued_at=float(task.get("issued_at") or 0),
    )
    return VerifiedTask(view, source)


def _claimed_id(document: bytes) -> str:
    """The task id an unverified document claims, for the refusal report only."""
    try:
        claimed = json.loads(document).get("task_id")
    except (ValueError, AttributeError):
        return ""
    return claimed if isinstance(claimed, str) and _TASK_ID.match(claimed) else ""


_MAPPING_KEYS = ("mac", "source_ip", "target_ip", "target_netmask", "target_gateway", "target_dns")


def _public_mapping(mapping: dict[str, Any]) -> dict[str, Any]:
    return {k: mapping[k] for k in _MAPPING_KEYS if k in mapping}


# --------------------------------------------------------------------------- sealed sources


class SourceKey:
    """The proxy's own key for the sources it keeps in Redis (`hamal_lib_dir/mass/`)."""

    def __init__(self, lib_dir: str) -> None:
        self.path = Path(lib_dir) / SOURCES_KEY
        self._aead: AESGCM | None = None

    def _cipher(self) -> AESGCM:
        if self._aead is None:
            self._aead = AESGCM(self._load_or_make())
        return self._aead

    def _load_or_make(self) -> bytes:
        self.path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
        try:
            fd = os.open(self.path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o600)
        except FileExistsError:
            pass
        else:
            # Written whole before anyone reads it: a reader that finds it short waits.
            with os.fdopen(fd, "wb") as f:
                f.write(secrets.token_bytes(KEY_SIZE))
                f.flush()
                os.fsync(f.fileno())
        fd = os.open(self.path, os.O_RDONLY | os.O_NOFOLLOW)
        with os.fdopen(fd, "rb") as f:
            data = f.read(KEY_SIZE + 1)
        if len(data) != KEY_SIZE:
            raise MassError(
                f"{self.path}: holds {len(data)} bytes, not a key of {KEY_SIZE}: remove it (the "
                "task list is fetched and sealed again)"
            )
        return data

    def seal(self, view: TaskView, source: dict[str, Any]) -> bytes:
        nonce = secrets.token_bytes(NONCE_SIZE)
        plain = json.dumps(source, sort_keys=True).encode()
        return nonce + self._cipher().encrypt(nonce, plain, _bound(view.task_id, view.version))

    def open(self, task_id: str, version: int, sealed: bytes) -> dict[str, Any]:
        try:
            plain = self._cipher().decrypt(
                sealed[:NONCE_SIZE], sealed[NONCE_SIZE:], _bound(task_id, version)
            )
        except InvalidTag:
            raise MassError(
                f"mass: the sealed source of task {task_id} does not open with {self.path}"
            ) from None
        source = json.loads(plain)
        if not isinstance(source, dict):
            raise MassError(f"mass: the sealed source of task {task_id} is not an object")
        return source


def _bound(task_id: str, version: int) -> bytes:
    return f"hamal-mass-source:{task_id}:{version}".encode()


def registration_body(platforms: list[str]) -> dict[str, Any]:
    import socket

    from hamal_workers.info import host_addresses

    return {
        "version": hamal_workers.__version__,
        "hostname": socket.gethostname(),
        "host_addresses": host_addresses(),
        "platforms": platforms,
    }


# --------------------------------------------------------------------------- the exchange

# After a failed exchange the next waits 15 s, then twice as long each time, up to 10 min.
RETRY_FIRST_S, RETRY_MOST_S = 15.0, 600.0
DELIVER_BATCH = 100


def status_report(view: TaskView | None, task_id: str, state: str, **fields: Any) -> dict[str, Any]:
    """A StatusReport of docs/mass-api.yaml; `fields` adds run_id, point_id, error ..."""
    report: dict[str, Any] = {
        "report_id": secrets.token_hex(16),
        "task_id": task_id,
        "state": state,
        "at": time.time(),
    }
    if view is not None:
        report["task_version"] = view.version
    report.update({k: v for k, v in fields.items() if v is not None})
    return report


class MassLink:
    """One exchange with Mass: register when needed, heartbeat, take the task list, deliver
    the waiting status reports. When Mass cannot be reached it says so, since when, and
    waits longer before the next try; protection goes on with the last verified list."""

    def __init__(self, settings: Settings, state: State, client: MassClient | None = None) -> None:
        self.settings = settings
        self.section = settings.mass
        self.state = state
        self.client = client or MassClient(settings.mass)
        self.sources = SourceKey(settings.default.hamal_lib_dir)

    def exchange(self, now: float | None = None) -> dict[str, Any]:
        now = time.time() if now is None else now
        link = self.state.mass_link()
        if float(link.get("next_attempt") or 0) > now:
            return {"event": "mass", "ok": False, "skipped": True}
        summary: dict[str, Any] = {"event": "mass", "ok": True}
        try:
            if link.get("registered") != self.section.hyper_exporter_id:
                self._register()
            if self.section.enable_heartbeat_msg and not self.client.heartbeat(self.heartbeat()):
                self._register()  # Mass forgot this exporter
                self.client.heartbeat(self.heartbeat())
            summary.update(self.pull())
            summary["delivered"] = self.deliver()
        except MassUnreachable as exc:
            return self._unreachable(link, now, str(exc), summary)
        except MassError as exc:
            log.error("%s", exc)
            return self._unreachable(link, now, str(exc), summary)
        since = float(link.get("unreachable_since") or 0)
        if since:
            log.warning(
                "mass: %s answers again after %.0f s unreachable; %d status reports delivered",
                self.client.shown, now - since, summary["delivered"],
            )  # fmt: skip
        self.state.clear_mass_link("unreachable_since", "next_attempt", "failures", "last_error")
        self.state.set_mass_link(last_contact=str(now))
        summary["waiting"] = self.state.mass_reports_waiting()
        return summary

    def _register(self) -> None:
        from hamal_workers.platforms import platform_names

        self.client.register(registration_body(platform_names()))
        self.state.set_mass_link(registered=self.section.hyper_exporter_id)
        log.info("mass: registered with %s as %s", self.client.shown,
                 self.section.hyper_exporter_id)  # fmt: skip

    def _unreachable(
        self, link: dict[str, str], now: float, why: str, summary: dict[str, Any]
    ) -> dict[str, Any]:
        failures = int(link.get("failures") or 0) + 1
        since = float(link.get("unreachable_since") or now)
        pause = min(RETRY_FIRST_S * 2 ** (failures - 1), RETRY_MOST_S)
        self.state.set_mass_link(
            unreachable_since=str(since), failures=str(failures),
            next_attempt=str(now + pause), last_error=why[:500],
        )  # fmt: skip
        waiting = self.state.mass_reports_waiting()
        log.error(
            # `why` names the endpoint: one URL a line, so that masking hides nothing else.
            "Mass unreachable since %s (%.0f s): %s; protecting with the last verified task "
            "list (%d tasks); %d status reports waiting; next try in %.0f s",
            time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(since)), now - since, why,
            self.state.mass_task_count(), waiting, pause,
        )  # fmt: skip
        return {**summary, "ok": False, "error": why, "waiting": waiting, "failures": failures}

    # --- heartbeat ---------------------------------------------------------------------
    def heartbeat(self) -> dict[str, Any]:
        from hamal_workers.info import host_addresses

        workers: dict[str, int] = {}
        for record in self.state.live_workers().values():
            for queue in record.get("queues") or []:
                workers[queue] = workers.get(queue, 0) + 1
        body: dict[str, Any] = {
            "version": hamal_workers.__version__,
            "exporter_id": self.section.hyper_exporter_id,
            "sent_at": time.time(),
            "host_addresses": host_addresses(),
            "workers_online": workers,
            "syncs_running": len(self.state.active_runs()),
            "last_scan_at": self.state.last_scan_time(),
            "tasks_known": self.state.mass_task_count(),
        }
        if self.section.enable_get_public_ips:
            found = public_addresses(float(self.section.get_public_ip_timeout))
            if found is not None:
                body["public_addresses"] = found
        return body

    # --- tasks --------------------------------------------------------------------------
    def pull(self) -> dict[str, int]:
        envelopes = self.client.tasks()
        public_key = load_public_key(self.section.public_key_path)
        versions = self._versions()
        current = {t: TaskView.from_json(v) for t, v in self.state.mass_tasks().items()}
        accepted: dict[str, tuple[dict[str, Any], bytes]] = {}
        refused = 0
        # Of one task's documents in the list, the newest is taken; older ones are replays.
        newest: dict[str, tuple[VerifiedTask, Any]] = {}
        for envelope in envelopes:
            found = verify(envelope, public_key, self.section.hyper_exporter_id, versions)
            if isinstance(found, VerifiedTask):
                task_id = found.view.task_id
                if task_id not in newest:
                    newest[task_id] = (found, envelope)
                    continue
                other, other_envelope = newest[task_id]
                if found.view.version == other.view.version:
                    continue  # the same task twice
                if found.view.version > other.view.version:
                    newest[task_id] = (found, envelope)
                    found, envelope = other, other_envelope
                known = newest[task_id][0].view.version
                found = Refusal(
                    task_id, f"replayed: version {found.view.version}, version {known} listed"
                )
            refused += 1
            self._refused(envelope, found)
        seen = set(newest)
        for task_id, (found, _) in newest.items():
            view = found.view
            if task_id in current and current[task_id].version == view.version:
                continue
            accepted[task_id] = (view.to_json(), self.sources.seal(view, found.source))
            log.info("mass: task %s version %d accepted: %s VM %s (%s), every %d s",
                     view.task_id, view.version, view.platform, view.vm_name, view.vm_id,
                     view.interval_s)  # fmt: skip
            self.state.queue_mass_report(status_report(view, task_id, "accepted"))
        removed = [task_id for task_id in current if task_id not in seen]
        for task_id in removed:
            log.info("mass: task %s is no longer in Mass' list: not protected any more", task_id)
            self.state.queue_mass_report(status_report(current[task_id], task_id, "removed"))
        self.state.set_mass_tasks(accepted, removed)
        if accepted:
            self._keep_versions({**versions, **{t: v[0]["version"] for t, v in accepted.items()}})
        if accepted or removed:
            self._backup_ip_mapping()
        return {"accepted": len(accepted), "refused": refused, "removed": len(removed),
                "tasks": len(seen)}  # fmt: skip

    @property
    def _versions_file(self) -> Path:
        return Path(self.settings.default.hamal_lib_dir) / "mass" / "versions.json"

    def _versions(self) -> dict[str, int]:
        """The highest version accepted of each task, from Redis and from the lib dir: a
        flushed Redis must not make an old signed document acceptable again."""
        versions = self.state.mass_versions()
        try:
            kept = json.loads(self._versions_file.read_text())
        except (OSError, ValueError):
            kept = {}
        for task_id, version in kept.items() if isinstance(kept, dict) else ():
            if isinstance(version, int) and version > versions.get(task_id, 0):
                versions[task_id] = version
        return versions

    def _keep_versions(self, versions: dict[str, int]) -> None:
        self._versions_file.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
        text = json.dumps(versions, sort_keys=True)
        fsutil.write_atomic(self._versions_file, [text.encode()], mode=0o600)

    def _refused(self, envelope: Any, refusal: Refusal) -> None:
        digest = hashlib.sha256(json.dumps(envelope, sort_keys=True, default=str).encode())
        if not self.state.mass_refusal_new(digest.hexdigest()):
            return  # reported when first seen
        log.warning("mass: task %s refused: %s", refusal.task_id or "(no valid id)",
                    refusal.reason)  # fmt: skip
        if refusal.task_id:
            self.state.queue_mass_report(
                status_report(None, refusal.task_id, "refused", error=refusal.reason)
            )

    def _backup_ip_mapping(self) -> None:
        """ip_mapping.backup in the log directory: every task's IP mapping, as the operations
        guide lists it (what a recovery needs if Mass is gone)."""
        mappings = {
            task_id: view.get("ip_mapping") or []
            for task_id, view in sorted(self.state.mass_tasks().items())
        }
        text = json.dumps({"updated": time.time(), "tasks": mappings}, indent=2, sort_keys=True)
        path = Path(self.settings.default.log_dir) / "ip_mapping.backup"
        try:
            fsutil.write_atomic(path, [(text + "\n").encode()], mode=0o640)
        except OSError as exc:
            log.warning("mass: cannot write %s: %s", path, exc.strerror or exc)

    # --- reports ------------------------------------------------------------------------
    def deliver(self) -> int:
        """Send waiting reports, newest first, until none waits; MassUnreachable stops it
        with the rest still waiting."""
        delivered = 0
        while batch := self.state.waiting_mass_reports(DELIVER_BATCH):
            for report in batch:
                self.client.report(str(report["task_id"]), report)
                self.state.mass_report_delivered(report)
                delivered += 1
        return delivered


def public_addresses(timeout_s: float) -> list[str] | None:
    """This host's global (public) addresses, from its own interfaces (no traffic sent);
    None when finding them takes longer than `timeout_s`: the heartbeat does not wait."""
    import ipaddress
    import threading

    from hamal_workers.info import host_addresses

    found: list[list[str]] = []

    def look() -> None:
        found.append([a for a in host_addresses() if ipaddress.ip_address(a).is_global])

    worker = threading.Thread(target=look, daemon=True, name="public-addresses")
    worker.start()
    worker.join(timeout_s)
    return found[0] if found else None
