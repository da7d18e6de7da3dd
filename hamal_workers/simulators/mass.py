"""The Mass management service on 127.0.0.1 for tests and the demo: what a Hamal proxy (an
"exporter") registers with, sends heartbeats and status reports to, and takes its signed sync
tasks from.

    with MassSimulator(tmp_path) as sim:
        sim.put_task({"task_id": "t1", "platform": "local", "source": {}, "vm": {"id": "vm-1"},
                      "schedule": {"interval_s": 60}})       # version 1, signed when listed
        http.get(f"{sim.endpoint}/exporters/exporter-1/tasks",
                 headers={"X-Auth-Key": sim.auth_key}, verify=str(sim.ca_file))

Contract: exactly `docs/mass-api.yaml`; a client written from it talks to this as to Mass.

- Every path is under `base_path` (`/hypermotion/v1`, as the YAML's server), over HTTPS with a
  certificate made here (`ca_file`), and needs `X-Auth-Key: <auth_key>`: missing or wrong is
  401. Every error has the body `{code, message}`; 400 `bad_request` for a body that is not a
  JSON object, lacks a field the YAML requires or has one of the wrong type, or an
  `exporter_id` outside its pattern.
- `POST /exporters/{exporter_id}/register` (Registration) answers `{exporter_id,
  heartbeat_interval_s}` and makes the exporter known; `POST .../heartbeat` (Heartbeat, whose
  `exporter_id` must be the path's) and `POST .../tasks/{task_id}/status` answer 404
  `unknown_exporter` until it registered (and again after `forget_exporters`).
- `GET /exporters/{exporter_id}/tasks` answers `{tasks: [SignedTask]}`: the current version of
  every task whose `exporter_id` is that exporter, in the order they were first put, then the
  extras (`serve_extra`) as given. A document is the base64 of the task's UTF-8 JSON text and
  its signature the base64 of the Ed25519 signature over exactly those bytes, by the key whose
  public half is `public_key_path` (PEM, SubjectPublicKeyInfo). Each version's envelope is made
  once, when put, and served byte for byte the same every time (`old_envelope` gives the one
  of any earlier version, for replays). The list needs no registration (the YAML names no 404
  for it).
- `POST .../tasks/{task_id}/status` (StatusReport; its `task_id` must be the path's, `state`
  one of the YAML's): 404 `unknown_task` for a task never put nor named by an extra's document
  (a removed task is still known: the proxy reports it `removed`), 409 `duplicate_report` for
  a `report_id` already accepted (from any exporter), else 200. `reports` holds the accepted
  ones in arrival order, `duplicate_reports` counts the 409s.
- 200 answers without a body in the YAML (heartbeat, status) carry `{}`.

Tasks (`put_task`, `remove_task`): a put without `version` takes the highest the task had + 1
(versions go on after a removal: a task put again is not a replay); without `exporter_id` the
sim's `exporter_id` ("exporter-1"), without `issued_at` the wall time. A put is checked against
the YAML's Task (required fields, their types, task_id's pattern, platform, vm.id,
schedule.interval_s at least 5): a malformed document is only served as an extra, made with
`envelope` and `serve_extra`.

Faults: `fail_all` (every API call answered with an error, before authentication, `count`
times or until `clear_faults`), `forget_exporters` (Mass lost its state), `stop()` then
`start()` (an outage: the same port again, the state kept). Records: `calls`,
`registrations`, `heartbeats` and `reports` (each the request body with the path's
`exporter_id` and `received_at`, wall time), `duplicate_reports`.

Admin surface under `/_sim/` (no auth key, not recorded, never failed; loopback only), for a
demo in another process: `POST /_sim/tasks` (a task -> the stored one), `DELETE
/_sim/tasks/<id>`, `GET /_sim/state`, and `POST /_sim/fail {status, count}`, `POST
/_sim/clear_faults`, `POST /_sim/forget_exporters`.

What a real Mass would do and this one does not:
- one auth key for every exporter, no key rotation; one signing key (kept in the directory so
  that a restarted simulator signs with the same one), `key_id` derived from it;
- tasks are made with Python calls or `/_sim/`, not from a user interface, a VM inventory or a
  policy; the list is recomputed on every call (a real one may cache and page it);
- no rate limits, no report retention limit (every report_id is remembered for good, across
  exporters), no check that a report's task belongs to the exporter sending it;
- `forget_exporters` forgets registrations only: tasks, reports and report_ids stay;
- no server-side timeouts or slow answers (a client's timeout is tested with `stop()`).
"""

from __future__ import annotations

import argparse
import base64
import contextlib
import copy
import hashlib
import hmac
import json
import logging
import re
import signal
import ssl
import sys
import threading
import time
from dataclasses import dataclass
from http import HTTPStatus
from pathlib import Path
from typing import Any
from urllib.parse import unquote, urlsplit

from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from hamal_workers.simulators.loopback_http import (
    JsonResponse as _Response,
)
from hamal_workers.simulators.loopback_http import (
    SimulatorHTTPServer,
    SimulatorRequestHandler,
    send_json,
)
from hamal_workers.testbeds.certs import make_certificate

log = logging.getLogger(__name__)

AUTH_HEADER = "X-Auth-Key"
EXPORTER_ID = re.compile(r"[A-Za-z0-9_-]{1,64}")
TASK_ID = re.compile(r"[A-Za-z0-9_.-]{1,64}")
PLATFORMS = ("vmware", "ceph", "fusion", "local")
STATES = ("accepted", "refused", "syncing", "committed", "failed", "removed")
MIN_HEARTBEAT_INTERVAL_S = 5
MIN_SCHEDULE_INTERVAL_S = 5

# The API the simulator serves, as the YAML's paths (relative to the base path): the tests check
# both ways that this and docs/mass-api.yaml name the same operations.
ROUTES: tuple[tuple[str, str], ...] = (
    ("POST", "/exporters/{exporter_id}/register"),
    ("POST", "/exporters/{exporter_id}/heartbeat"),
    ("GET", "/exporters/{exporter_id}/tasks"),
    ("POST", "/exporters/{exporter_id}/tasks/{task_id}/status"),
)

# The required fields of the YAML's request and task schemas, with their types (the tests check
# these against the YAML).
REQUIRED: dict[str, dict[str, str]] = {
    "Registration": {
        "version": "string",
        "hostname": "string",
        "host_addresses": "array",
        "platforms": "array",
    },
    "Heartbeat": {
        "version": "string",
        "exporter_id": "string",
        "sent_at": "number",
        "host_addresses": "array",
        "workers_online": "object",
        "syncs_running": "integer",
    },
    "StatusReport": {"report_id": "string", "task_id": "string", "state": "string", "at": "number"},
    "Task": {
        "task_id": "string",
        "version": "integer",
        "exporter_id": "string",
        "issued_at": "number",
        "platform": "string",
        "source": "object",
        "vm": "object",
        "schedule": "object",
    },
}

_TYPES: dict[str, type | tuple[type, ...]] = {
    "string": str,
    "number": (int, float),
    "integer": int,
    "array": list,
    "object": dict,
    "boolean": bool,
}


class SimulatorError(Exception):
    """A Python-side call refused: a malformed task, an unknown task or version."""


@dataclass(frozen=True)
class Call:
    """One API request answered (admin requests under /_sim/ are not recorded)."""

    method: str
    path: str  # without the query
    status: int
    at: float  # time.time() when it was answered
    body: dict[str, Any] | None  # the request's JSON object, if it had one


class _Fault(Exception):
    def __init__(self, status: int, code: str, message: str) -> None:
        super().__init__(f"{status} {code} {message}")
        self.status, self.code, self.message = status, code, message


def _error(status: int, code: str, message: str) -> _Response:
    return _Response(status, {"code": code, "message": message})


@dataclass
class _Request:
    method: str
    path: str
    headers: Any  # http.client.HTTPMessage
    body: bytes

    def json_object(self) -> dict[str, Any] | None:
        """The body as a JSON object; None when it is not one (or empty)."""
        try:
            value = json.loads(self.body) if self.body else None
        except ValueError:  # UnicodeDecodeError too
            return None
        return value if isinstance(value, dict) else None

    def json(self) -> dict[str, Any]:
        value = self.json_object()
        if value is None:
            raise _Fault(400, "bad_request", "the body is not a JSON object")
        return value


def _is(value: Any, kind: str) -> bool:
    if isinstance(value, bool) and kind in ("number", "integer"):
        return False
    return isinstance(value, _TYPES[kind])


def _missing(body: dict[str, Any], schema: str) -> str | None:
    """What is wrong with the required fields of `body` as the YAML's `schema`, if anything."""
    for name, kind in REQUIRED[schema].items():
        if name not in body:
            return f"{schema} requires {name!r}"
        if not _is(body[name], kind):
            return f"{schema}.{name} must be a {kind}"
    return None


def _snake(status: int) -> str:
    try:
        phrase = HTTPStatus(status).phrase
    except ValueError:
        return "error"
    return re.sub(r"[^a-z0-9]+", "_", phrase.lower()).strip("_")


def _b64(data: bytes) -> str:
    return base64.b64encode(data).decode("ascii")


def _key_id(key: Ed25519PrivateKey) -> str:
    raw = key.public_key().public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)
    return "mass-" + hashlib.sha256(raw).hexdigest()[:16]


def _signing_key(path: Path) -> Ed25519PrivateKey:
    """The key kept at `path` (made there the first time), so that a simulator started again
    on the same directory signs as before."""
    if path.exists():
        key = serialization.load_pem_private_key(path.read_bytes(), password=None)
        if isinstance(key, Ed25519PrivateKey):
            return key
    key = Ed25519PrivateKey.generate()
    partial = path.with_name(path.name + ".tmp")
    partial.write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
    )
    partial.chmod(0o600)
    partial.replace(path)
    return key


class MassSimulator:
    """Mass on 127.0.0.1; see the module's doc."""

    def __init__(
        self,
        directory: Path,
        *,
        auth_key: str = "mass-key",
        base_path: str = "/hypermotion/v1",
        heartbeat_interval_s: int = 30,
        tls: bool = True,
        port: int = 0,
    ) -> None:
        if heartbeat_interval_s < MIN_HEARTBEAT_INTERVAL_S:
            raise ValueError(
                f"heartbeat_interval_s is at least {MIN_HEARTBEAT_INTERVAL_S} (the YAML's minimum)"
            )
        self.directory = Path(directory)
        self.auth_key = auth_key
        self.base_path = "/" + base_path.strip("/") if base_path.strip("/") else ""
        self.heartbeat_interval_s = heartbeat_interval_s
        self.tls = tls
        self.exporter_id = "exporter-1"  # the exporter put_task gives tasks that name none
        self._requested_port = port
        self.directory.mkdir(parents=True, exist_ok=True)
        self.ca_file, key_file = make_certificate(self.directory / "tls", "mass")
        self._context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        self._context.load_cert_chain(self.ca_file, key_file)
        self.private_key = _signing_key(self.directory / "signing_key.pem")
        self.key_id = _key_id(self.private_key)
        self.public_key_path = self.directory / "public_key.pem"
        partial = self.public_key_path.with_name(self.public_key_path.name + ".tmp")
        partial.write_bytes(
            self.private_key.public_key().public_bytes(
                serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
            )
        )
        partial.replace(self.public_key_path)

        self._lock = threading.RLock()
        self._tasks: dict[str, dict[str, Any]] = {}  # task_id -> the current version
        self._last_version: dict[str, int] = {}  # task_id -> the last version put (kept)
        self._envelopes: dict[tuple[str, int], dict[str, str]] = {}  # every version's
        self._known_tasks: set[str] = set()  # put, or named by an extra: reports accepted
        self._extras: list[dict[str, Any]] = []
        self._registered: set[str] = set()
        self._report_ids: set[str] = set()
        self._fault: tuple[int, int | None] | None = None  # (status, remaining or None)
        self._hold = threading.Event()  # set: answers flow; clear: API calls wait (a hang)
        self._hold.set()
        self._calls: list[Call] = []
        self._registrations: list[dict[str, Any]] = []
        self._heartbeats: list[dict[str, Any]] = []
        self._reports: list[dict[str, Any]] = []
        self._duplicates = 0

        self._httpd: SimulatorHTTPServer | None = None
        self._thread: threading.Thread | None = None

    # -- lifecycle -------------------------------------------------------------------------------

    def start(self) -> str:
        """Serve on 127.0.0.1 (a free port the first time unless one was given, then always
        that one); the endpoint."""
        if self._httpd is not None:
            return self.endpoint
        httpd = SimulatorHTTPServer(("127.0.0.1", self._requested_port), self, _RequestHandler)
        if self.tls:
            # The handshake happens in the connection's thread (SimulatorRequestHandler.setup).
            httpd.socket = self._context.wrap_socket(
                httpd.socket, server_side=True, do_handshake_on_connect=False
            )
        self._requested_port = int(httpd.server_address[1])  # a start after stop() reuses it
        self._httpd = httpd
        self._thread = threading.Thread(
            target=httpd.serve_forever,
            kwargs={"poll_interval": 0.1},
            name=f"mass-sim:{self._requested_port}",
            daemon=True,
        )
        self._thread.start()
        return self.endpoint

    def stop(self) -> None:
        """Stop listening and close open connections; the state stays for the next start()."""
        self._hold.set()  # a hung call ends with the rest
        httpd, self._httpd = self._httpd, None
        if httpd is not None:
            httpd.stop()
        if self._thread is not None:
            self._thread.join(timeout=10)
            self._thread = None

    def __enter__(self) -> MassSimulator:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def hamal_env(self, exporter_id: str = "exporter-1") -> dict[str, str]:
        """HAMAL_MASS_* that put a proxy under this Mass as `exporter_id` (Mass mode)."""
        return {
            "HAMAL_MASS_MASS_ENDPOINT": self.endpoint,
            "HAMAL_MASS_AUTH_KEY": self.auth_key,
            "HAMAL_MASS_HYPER_EXPORTER_ID": exporter_id,
            "HAMAL_MASS_PUBLIC_KEY_PATH": str(self.public_key_path),
            "HAMAL_MASS_CA_FILE": str(self.ca_file),
        }

    @property
    def running(self) -> bool:
        return self._httpd is not None

    @property
    def port(self) -> int:
        """The port it listens on, or did and will again after a stop()."""
        if not self._requested_port:
            raise SimulatorError("the simulator was never started")
        return self._requested_port

    @property
    def base_url(self) -> str:
        """Scheme, host and port: where `/_sim/` is."""
        return f"{'https' if self.tls else 'http'}://127.0.0.1:{self.port}"

    @property
    def endpoint(self) -> str:
        """What `[mass] mass_endpoint` is set to: the base of every API path."""
        return self.base_url + self.base_path

    # -- tasks -----------------------------------------------------------------------------------

    def put_task(self, task: dict[str, Any]) -> dict[str, Any]:
        """Add a task, or replace the one with its task_id; the task as stored (and signed)."""
        stored = copy.deepcopy(task)
        with self._lock:
            task_id = stored.get("task_id")
            if not isinstance(task_id, str) or not TASK_ID.fullmatch(task_id):
                raise SimulatorError(f"task_id {task_id!r} is not as the YAML's pattern")
            stored.setdefault("version", self._last_version.get(task_id, 0) + 1)
            stored.setdefault("exporter_id", self.exporter_id)
            stored.setdefault("issued_at", time.time())
            problem = self._task_problem(stored)
            if problem is not None:
                raise SimulatorError(f"task {task_id}: {problem}")
            envelope = self.envelope(stored)
            self._tasks[task_id] = stored
            # An explicit older version is served as current; the next bump goes past both.
            last = self._last_version.get(task_id, 0)
            self._last_version[task_id] = max(last, stored["version"])
            self._envelopes[(task_id, stored["version"])] = envelope
            self._known_tasks.add(task_id)
            return copy.deepcopy(stored)

    @staticmethod
    def _task_problem(task: dict[str, Any]) -> str | None:
        problem = _missing(task, "Task")
        if problem is not None:
            return problem
        if task["version"] < 1:
            return "version is at least 1"
        if task["platform"] not in PLATFORMS:
            return f"platform is one of {', '.join(PLATFORMS)}"
        if not isinstance(task["vm"].get("id"), str):
            return "vm.id is required (a string)"
        interval = task["schedule"].get("interval_s")
        if not _is(interval, "integer") or interval < MIN_SCHEDULE_INTERVAL_S:
            return f"schedule.interval_s is an integer of at least {MIN_SCHEDULE_INTERVAL_S}"
        if "enabled" in task and not isinstance(task["enabled"], bool):
            return "enabled is a boolean"
        return None

    def remove_task(self, task_id: str) -> None:
        """The task is no longer listed (reports about it are still accepted)."""
        with self._lock:
            if self._tasks.pop(task_id, None) is None:
                raise SimulatorError(f"no task {task_id!r}")

    def tasks(self) -> list[dict[str, Any]]:
        """The current version of every task, for every exporter, in the order first put."""
        with self._lock:
            return copy.deepcopy(list(self._tasks.values()))

    def envelope(
        self, task: dict[str, Any], *, key: Ed25519PrivateKey | None = None
    ) -> dict[str, str]:
        """`task` as the list serves it: {document, signature, key_id}, signed by `key` (the
        simulator's own unless given; key_id names the key that signed)."""
        key = key or self.private_key
        document = json.dumps(task, ensure_ascii=False).encode("utf-8")
        return {
            "document": _b64(document),
            "signature": _b64(key.sign(document)),
            "key_id": _key_id(key),
        }

    def old_envelope(self, task_id: str, version: int) -> dict[str, str]:
        """The envelope made for that version of the task (current, older, or removed)."""
        with self._lock:
            envelope = self._envelopes.get((task_id, version))
            if envelope is None:
                raise SimulatorError(f"task {task_id!r} never had version {version}")
            return dict(envelope)

    def serve_extra(self, envelope: dict[str, Any]) -> None:
        """Serve `envelope` as is in every exporter's list, after the tasks; the task_id its
        document names (if it decodes) is known to status reports from now on."""
        with self._lock:
            self._extras.append(copy.deepcopy(envelope))
            with contextlib.suppress(Exception):
                task_id = json.loads(base64.b64decode(envelope["document"]))["task_id"]
                if isinstance(task_id, str):
                    self._known_tasks.add(task_id)

    def clear_extra(self) -> None:
        with self._lock:
            self._extras.clear()

    # -- faults ----------------------------------------------------------------------------------

    def fail_all(self, status: int = 503, count: int | None = None) -> None:
        """Answer the next `count` API calls (every one when None, until clear_faults) with
        `status` and an Error body, before anything else is looked at."""
        if not 400 <= status <= 599:
            raise ValueError(f"an error status is 4xx or 5xx, not {status}")
        with self._lock:
            self._fault = (status, count) if count is None or count > 0 else None

    def hang(self) -> None:
        """API calls get no answer until `clear_faults` (a Mass that accepts and stalls)."""
        self._hold.clear()

    def clear_faults(self) -> None:
        with self._lock:
            self._fault = None
        self._hold.set()

    def forget_exporters(self) -> None:
        """Mass lost its state: every exporter has to register again."""
        with self._lock:
            self._registered.clear()

    # -- records ---------------------------------------------------------------------------------

    @property
    def calls(self) -> list[Call]:
        with self._lock:
            return list(self._calls)

    @property
    def registrations(self) -> list[dict[str, Any]]:
        with self._lock:
            return copy.deepcopy(self._registrations)

    @property
    def heartbeats(self) -> list[dict[str, Any]]:
        with self._lock:
            return copy.deepcopy(self._heartbeats)

    @property
    def reports(self) -> list[dict[str, Any]]:
        with self._lock:
            return copy.deepcopy(self._reports)

    @property
    def duplicate_reports(self) -> int:
        with self._lock:
            return self._duplicates

    def registered(self, exporter_id: str) -> bool:
        with self._lock:
            return exporter_id in self._registered

    def state(self) -> dict[str, Any]:
        """What `GET /_sim/state` answers."""
        with self._lock:
            return {
                "tasks": self.tasks(),
                "registrations": self.registrations,
                "heartbeats": self.heartbeats,
                "reports": self.reports,
                "duplicate_reports": self._duplicates,
                "registered": sorted(self._registered),
            }

    # -- HTTP ------------------------------------------------------------------------------------

    def _handle(self, handler: _RequestHandler) -> None:
        """One request, from reading its body to writing the answer."""
        path = urlsplit(handler.path).path
        length = int(handler.headers.get("Content-Length") or 0)
        body = handler.rfile.read(length) if length else b""
        req = _Request(handler.command, path, handler.headers, body)
        if path == "/_sim" or path.startswith("/_sim/"):
            _send(handler, self._admin(req))
            return
        try:
            with self._lock:
                held = not self._hold.is_set()
            if held:
                self._hold.wait(60)
            with self._lock:
                if self._fault is not None:
                    status, remaining = self._fault
                    if remaining is not None:
                        self._fault = (status, remaining - 1) if remaining > 1 else None
                    raise _Fault(status, _snake(status), "injected fault")
            response = self._route(req)
        except _Fault as exc:
            response = _error(exc.status, exc.code, exc.message)
        except Exception:
            log.exception("%s %s failed", req.method, req.path)
            response = _error(500, "internal_error", "the simulator failed")
        with self._lock:
            self._calls.append(Call(req.method, path, response.status, time.time(),
                                    req.json_object()))  # fmt: skip
        _send(handler, response)

    def _route(self, req: _Request) -> _Response:
        base = self.base_path
        if not (req.path == base or req.path.startswith(base + "/")):
            raise _Fault(404, "not_found", f"nothing at {req.path} (the API is under {base}/)")
        self._authenticate(req)
        parts = [unquote(p) for p in req.path[len(base) :].split("/")]
        # ["", "exporters", exporter_id, *rest]
        if len(parts) < 4 or parts[:2] != ["", "exporters"] or not parts[2]:
            raise _Fault(404, "not_found", f"nothing at {req.path}")
        exporter_id, rest = parts[2], parts[3:]
        if rest == ["register"]:
            wanted, action = "POST", self._register
        elif rest == ["heartbeat"]:
            wanted, action = "POST", self._heartbeat
        elif rest == ["tasks"]:
            wanted, action = "GET", self._list
        elif len(rest) == 3 and rest[0] == "tasks" and rest[1] and rest[2] == "status":
            wanted, action = "POST", lambda r, e: self._status(r, e, rest[1])
        else:
            raise _Fault(404, "not_found", f"nothing at {req.path}")
        if req.method != wanted:
            return _Response(
                405,
                {"code": "method_not_allowed", "message": f"{req.path} takes {wanted}"},
                {"Allow": wanted},
            )
        if not EXPORTER_ID.fullmatch(exporter_id):
            raise _Fault(400, "bad_request", f"exporter_id {exporter_id!r} is not as its pattern")
        with self._lock:
            return action(req, exporter_id)

    def _authenticate(self, req: _Request) -> None:
        given = req.headers.get(AUTH_HEADER)
        if given is None:
            raise _Fault(401, "bad_auth_key", f"{AUTH_HEADER} is missing")
        if not hmac.compare_digest(given.encode(), self.auth_key.encode()):
            raise _Fault(401, "bad_auth_key", f"{AUTH_HEADER} is wrong")

    @staticmethod
    def _body(req: _Request, schema: str) -> dict[str, Any]:
        body = req.json()
        problem = _missing(body, schema)
        if problem is not None:
            raise _Fault(400, "bad_request", problem)
        return body

    def _known_exporter(self, exporter_id: str) -> None:
        if exporter_id not in self._registered:
            raise _Fault(404, "unknown_exporter", f"exporter {exporter_id} is not registered")

    @staticmethod
    def _record(body: dict[str, Any], exporter_id: str) -> dict[str, Any]:
        return {**body, "exporter_id": exporter_id, "received_at": time.time()}

    def _register(self, req: _Request, exporter_id: str) -> _Response:
        body = self._body(req, "Registration")
        for name in ("host_addresses", "platforms"):
            if not all(isinstance(item, str) for item in body[name]):
                raise _Fault(400, "bad_request", f"Registration.{name} is a list of strings")
        self._registered.add(exporter_id)
        self._registrations.append(self._record(body, exporter_id))
        return _Response(
            200, {"exporter_id": exporter_id, "heartbeat_interval_s": self.heartbeat_interval_s}
        )

    def _heartbeat(self, req: _Request, exporter_id: str) -> _Response:
        self._known_exporter(exporter_id)
        body = self._body(req, "Heartbeat")
        if body["exporter_id"] != exporter_id:
            raise _Fault(400, "bad_request", "Heartbeat.exporter_id is not the path's")
        self._heartbeats.append(self._record(body, exporter_id))
        return _Response(200, {})

    def _list(self, req: _Request, exporter_id: str) -> _Response:
        mine = [
            dict(self._envelopes[(task_id, task["version"])])
            for task_id, task in self._tasks.items()
            if task["exporter_id"] == exporter_id
        ]
        return _Response(200, {"tasks": mine + copy.deepcopy(self._extras)})

    def _status(self, req: _Request, exporter_id: str, task_id: str) -> _Response:
        self._known_exporter(exporter_id)
        body = self._body(req, "StatusReport")
        if body["task_id"] != task_id:
            raise _Fault(400, "bad_request", "StatusReport.task_id is not the path's")
        if body["state"] not in STATES:
            raise _Fault(400, "bad_request", f"StatusReport.state is one of {', '.join(STATES)}")
        if task_id not in self._known_tasks:
            raise _Fault(404, "unknown_task", f"no task {task_id}")
        if body["report_id"] in self._report_ids:
            self._duplicates += 1
            raise _Fault(409, "duplicate_report", f"report {body['report_id']} was received")
        self._report_ids.add(body["report_id"])
        self._reports.append(self._record(body, exporter_id))
        return _Response(200, {})

    # -- /_sim/ ----------------------------------------------------------------------------------

    def _admin(self, req: _Request) -> _Response:
        action = req.path.removeprefix("/_sim").strip("/")
        try:
            if req.method == "GET" and action == "state":
                return _Response(200, self.state())
            if req.method == "POST" and action == "tasks":
                return _Response(200, self.put_task(req.json()))
            if req.method == "DELETE" and action.startswith("tasks/"):
                self.remove_task(unquote(action.removeprefix("tasks/")))
                return _Response(200, {})
            if req.method == "POST" and action == "fail":
                args = req.json()
                self.fail_all(int(args.get("status", 503)), args.get("count"))
                return _Response(200, {})
            if req.method == "POST" and action == "clear_faults":
                self.clear_faults()
                return _Response(200, {})
            if req.method == "POST" and action == "forget_exporters":
                self.forget_exporters()
                return _Response(200, {})
        except _Fault as exc:
            return _error(exc.status, exc.code, exc.message)
        except SimulatorError as exc:
            status = 404 if req.method == "DELETE" else 400
            return _error(status, "not_found" if status == 404 else "bad_request", str(exc))
        except (TypeError, ValueError) as exc:
            return _error(400, "bad_request", f"bad arguments: {exc}")
        return _error(404, "not_found", f"no admin action {req.method} {action!r}")


def _send(handler: _RequestHandler, response: _Response) -> None:
    send_json(handler, response)


class _RequestHandler(SimulatorRequestHandler):
    server_version = "Mass"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m hamal_workers.simulators.mass")
    parser.add_argument("--directory", type=Path, required=True, help="certificate and keys")
    parser.add_argument("--port", type=int, default=0, help="default: a free one")
    parser.add_argument(
        "--state-file",
        type=Path,
        help="write {endpoint, ca_file, public_key_path, auth_key, exporter_id, admin_url}",
    )
    parser.add_argument("--auth-key", default="mass-key")
    parser.add_argument("--exporter-id", default="exporter-1", help="of tasks that name none")
    parser.add_argument("--base-path", default="/hypermotion/v1")
    parser.add_argument("--heartbeat-interval", type=int, default=30, help="seconds, at least 5")
    args = parser.parse_args(argv)
    stop = threading.Event()
    for signum in (signal.SIGTERM, signal.SIGINT):
        signal.signal(signum, lambda *_: stop.set())
    sim = MassSimulator(args.directory, auth_key=args.auth_key, base_path=args.base_path,
                        heartbeat_interval_s=args.heartbeat_interval, port=args.port)  # fmt: skip
    sim.exporter_id = args.exporter_id
    with sim:
        state = {
            "endpoint": sim.endpoint,
            "ca_file": str(sim.ca_file),
            "public_key_path": str(sim.public_key_path),
            "auth_key": sim.auth_key,
            "exporter_id": sim.exporter_id,
            "admin_url": f"{sim.base_url}/_sim",
        }
        if args.state_file is not None:
            partial = args.state_file.with_name(args.state_file.name + ".tmp")
            partial.write_text(json.dumps(state))
            partial.replace(args.state_file)  # a reader never sees half of it
        print(json.dumps(state), flush=True)
        while not stop.wait(0.5):
            pass
    return 0


if __name__ == "__main__":
    sys.exit(main())
