"""The Mass simulator, spoken to over real HTTPS with requests, checked against
docs/mass-api.yaml.

Each test has its own simulator in tmp_path. Signatures are verified here with the public key
file the simulator wrote (as the proxy loads it), documents and envelopes validated with
jsonschema against the YAML's own schemas, and the YAML is checked to name exactly the
operations, required fields, enums and patterns the simulator serves and checks.
"""

from __future__ import annotations

import base64
import json
import re
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import jsonschema
import pytest
import requests
import yaml
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey

from hamal_workers.simulators import mass
from hamal_workers.simulators.mass import MassSimulator, SimulatorError

pytestmark = pytest.mark.timeout(60)

SPEC_PATH = Path(__file__).resolve().parents[2] / "docs" / "mass-api.yaml"
KEY = object()  # the simulator's auth key


@pytest.fixture(scope="module")
def spec() -> dict[str, Any]:
    return yaml.safe_load(SPEC_PATH.read_text())


def schema(spec: dict[str, Any], name: str) -> dict[str, Any]:
    return spec["components"]["schemas"][name]


class Api:
    """A requests session on the simulator that trusts its certificate (and only that: the
    environment's CA bundle would override a session's verify)."""

    def __init__(self, sim: MassSimulator, exporter: str = "exporter-1") -> None:
        self.sim = sim
        self.exporter = exporter
        self.http = requests.Session()
        self.http.trust_env = False
        self.http.verify = str(sim.ca_file)

    def call(
        self, method: str, path: str, *, key: Any = KEY, timeout: float = 10, **kwargs: Any
    ) -> requests.Response:
        headers = dict(kwargs.pop("headers", {}))
        if key is not None:
            headers["X-Auth-Key"] = self.sim.auth_key if key is KEY else key
        return self.http.request(
            method, f"{self.sim.endpoint}{path}", headers=headers, timeout=timeout, **kwargs
        )

    def admin(self, method: str, action: str, **kwargs: Any) -> requests.Response:
        return self.http.request(method, f"{self.sim.base_url}/_sim/{action}", timeout=10, **kwargs)

    def register(self, exporter: str | None = None, **kwargs: Any) -> requests.Response:
        return self.call(
            "POST",
            f"/exporters/{exporter or self.exporter}/register",
            json=registration(),
            **kwargs,
        )

    def heartbeat(self, exporter: str | None = None, **kwargs: Any) -> requests.Response:
        exporter = exporter or self.exporter
        return self.call(
            "POST", f"/exporters/{exporter}/heartbeat", json=heartbeat(exporter), **kwargs
        )

    def tasks(self, exporter: str | None = None, **kwargs: Any) -> requests.Response:
        return self.call("GET", f"/exporters/{exporter or self.exporter}/tasks", **kwargs)

    def report(self, task_id: str, report_id: str, state: str = "accepted", **extra: Any):
        body = {"report_id": report_id, "task_id": task_id, "state": state, "at": time.time()}
        body.update(extra)
        return self.call("POST", f"/exporters/{self.exporter}/tasks/{task_id}/status", json=body)


def registration() -> dict[str, Any]:
    return {
        "version": "0.1.0",
        "hostname": "proxy-a",
        "host_addresses": ["10.0.0.5"],
        "platforms": ["vmware", "local"],
    }


def heartbeat(exporter: str) -> dict[str, Any]:
    return {
        "version": "0.1.0",
        "exporter_id": exporter,
        "sent_at": time.time(),
        "host_addresses": ["10.0.0.5"],
        "workers_online": {"period": 1, "local": 2},
        "syncs_running": 0,
        "tasks_known": 1,
    }


def task(task_id: str, **fields: Any) -> dict[str, Any]:
    return {
        "task_id": task_id,
        "platform": "vmware",
        "source": {"host": "vc.example", "user": "u", "password": "p", "ca_cert": "PEM"},
        "vm": {"id": f"uuid-{task_id}", "name": f"vm {task_id} é"},
        "schedule": {"interval_s": 300},
        "ip_mapping": [{"source_ip": "10.0.0.1", "target_ip": "10.1.0.1"}],
        **fields,
    }


def assert_error(response: requests.Response, status: int, code: str | None = None) -> None:
    assert response.status_code == status, response.text
    body = response.json()
    assert set(body) == {"code", "message"} and body["message"], body
    if code is not None:
        assert body["code"] == code, body


def public_key(sim: MassSimulator) -> Ed25519PublicKey:
    key = serialization.load_pem_public_key(sim.public_key_path.read_bytes())
    assert isinstance(key, Ed25519PublicKey)
    return key


def verified(sim: MassSimulator, envelope: dict[str, Any]) -> dict[str, Any]:
    """The document of a signed envelope, its signature checked as the proxy checks it."""
    document = base64.b64decode(envelope["document"], validate=True)
    public_key(sim).verify(base64.b64decode(envelope["signature"], validate=True), document)
    return json.loads(document.decode("utf-8"))


@pytest.fixture
def sim(tmp_path: Path) -> Iterator[MassSimulator]:
    with MassSimulator(tmp_path / "mass") as simulator:
        yield simulator


@pytest.fixture
def api(sim: MassSimulator) -> Api:
    return Api(sim)


# -- the contract itself -------------------------------------------------------------------------


def test_the_yaml_names_exactly_what_the_simulator_serves(spec: dict[str, Any]) -> None:
    operations = {
        (method.upper(), path)
        for path, item in spec["paths"].items()
        for method in item
        if method in ("get", "post", "put", "patch", "delete")
    }
    assert operations == set(mass.ROUTES)
    assert urlsplit(spec["servers"][0]["url"]).path == "/hypermotion/v1"
    scheme = spec["components"]["securitySchemes"]["authKey"]
    assert (scheme["in"], scheme["name"]) == ("header", mass.AUTH_HEADER)
    for name, fields in mass.REQUIRED.items():
        yaml_schema = schema(spec, name)
        assert set(yaml_schema["required"]) == set(fields), name
        for field, kind in fields.items():
            assert yaml_schema["properties"][field]["type"] == kind, (name, field)
    exporter = spec["components"]["parameters"]["exporter_id"]["schema"]["pattern"]
    assert exporter == f"^{mass.EXPORTER_ID.pattern}$"
    assert schema(spec, "Task")["properties"]["task_id"]["pattern"] == f"^{mass.TASK_ID.pattern}$"
    assert tuple(schema(spec, "Task")["properties"]["platform"]["enum"]) == mass.PLATFORMS
    assert tuple(schema(spec, "StatusReport")["properties"]["state"]["enum"]) == mass.STATES
    interval = schema(spec, "Task")["properties"]["schedule"]["properties"]["interval_s"]
    assert interval["minimum"] == mass.MIN_SCHEDULE_INTERVAL_S
    register = spec["paths"]["/exporters/{exporter_id}/register"]["post"]["responses"]["200"]
    answer = register["content"]["application/json"]["schema"]
    assert answer["properties"]["heartbeat_interval_s"]["minimum"] == mass.MIN_HEARTBEAT_INTERVAL_S


def test_a_conversation_answers_only_what_the_yaml_lists(
    spec: dict[str, Any], sim: MassSimulator, api: Api
) -> None:
    sim.put_task(task("t1"))
    api.heartbeat()  # 404: not registered
    api.tasks(key="wrong")  # 401
    api.register()
    api.heartbeat()
    api.tasks()
    api.report("t1", "r1")
    api.report("t1", "r1")  # 409
    api.report("nope", "r2")  # 404
    templates = {
        re.sub(r"\{[^}]+\}", "[^/]+", path): path for path in spec["paths"]
    }  # path regex -> template
    answered = set()
    for call in sim.calls:
        relative = call.path.removeprefix("/hypermotion/v1")
        template = next(t for rx, t in templates.items() if re.fullmatch(rx, relative))
        responses = spec["paths"][template][call.method.lower()]["responses"]
        assert str(call.status) in responses, (call, sorted(responses))
        answered.add((template, call.status))
    assert len(answered) == 8, answered


# -- authentication and registration -------------------------------------------------------------


@pytest.mark.parametrize("key", [None, "wrong", "mass-key-but-longer", ""])
def test_a_missing_or_wrong_auth_key_is_401_on_every_path(
    sim: MassSimulator, api: Api, key: str | None
) -> None:
    sim.put_task(task("t1"))
    assert_error(api.register(key=key), 401, "bad_auth_key")
    assert_error(api.heartbeat(key=key), 401, "bad_auth_key")
    assert_error(api.tasks(key=key), 401, "bad_auth_key")
    report = {"report_id": "r", "task_id": "t1", "state": "accepted", "at": 1.0}
    path = "/exporters/exporter-1/tasks/t1/status"
    assert_error(api.call("POST", path, key=key, json=report), 401, "bad_auth_key")
    assert sim.registrations == [] and sim.reports == [] and not sim.registered("exporter-1")
    assert [c.status for c in sim.calls] == [401] * 4


def test_register_then_heartbeat_and_again_after_mass_forgot(sim: MassSimulator, api: Api) -> None:
    sim.put_task(task("t1"))
    assert_error(api.heartbeat(), 404, "unknown_exporter")
    assert_error(api.report("t1", "r0"), 404, "unknown_exporter")
    answer = api.register()
    assert answer.status_code == 200
    assert answer.json() == {"exporter_id": "exporter-1", "heartbeat_interval_s": 30}
    assert sim.registered("exporter-1") and not sim.registered("exporter-2")
    beat = api.heartbeat()
    assert beat.status_code == 200 and beat.json() == {}
    assert_error(api.heartbeat("exporter-2"), 404, "unknown_exporter")

    sim.forget_exporters()
    assert not sim.registered("exporter-1")
    assert_error(api.heartbeat(), 404, "unknown_exporter")
    assert api.register().status_code == 200
    assert api.heartbeat().status_code == 200

    registrations, heartbeats = sim.registrations, sim.heartbeats
    assert len(registrations) == 2 and len(heartbeats) == 2
    assert registrations[0]["hostname"] == "proxy-a"
    assert registrations[0]["exporter_id"] == "exporter-1"
    assert heartbeats[1]["workers_online"] == {"period": 1, "local": 2}
    assert all(r["received_at"] <= time.time() for r in registrations + heartbeats)


def test_the_heartbeat_interval_is_the_configured_one(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="at least 5"):
        MassSimulator(tmp_path / "low", heartbeat_interval_s=4)
    with MassSimulator(tmp_path / "m", heartbeat_interval_s=7, auth_key="k2") as sim:
        answer = Api(sim, "proxy_2").register()
        assert answer.json() == {"exporter_id": "proxy_2", "heartbeat_interval_s": 7}


def test_malformed_requests_are_400_and_unknown_paths_404(sim: MassSimulator, api: Api) -> None:
    sim.put_task(task("t1"))
    body = registration()
    del body["platforms"]
    assert_error(api.call("POST", "/exporters/e1/register", json=body), 400, "bad_request")
    body = {**registration(), "host_addresses": "10.0.0.5"}
    assert_error(api.call("POST", "/exporters/e1/register", json=body), 400, "bad_request")
    for raw in (b"not json", b"[1, 2]", b""):
        assert_error(api.call("POST", "/exporters/e1/register", data=raw), 400, "bad_request")
    assert_error(api.call("POST", "/exporters/bad.id/register", json=registration()), 400)
    assert_error(api.call("POST", f"/exporters/{'x' * 65}/register", json=registration()), 400)
    assert not sim.registered("e1")

    assert api.register().status_code == 200
    beat = {**heartbeat("exporter-1"), "syncs_running": True}
    assert_error(api.call("POST", "/exporters/exporter-1/heartbeat", json=beat), 400)
    other = heartbeat("exporter-9")  # not the path's exporter
    assert_error(api.call("POST", "/exporters/exporter-1/heartbeat", json=other), 400)
    assert_error(api.report("t1", "r1", state="done"), 400, "bad_request")
    report = {"report_id": "r1", "task_id": "t2", "state": "accepted", "at": 1.0}
    path = "/exporters/exporter-1/tasks/t1/status"  # the body names another task
    assert_error(api.call("POST", path, json=report), 400, "bad_request")
    del report["at"]
    report["task_id"] = "t1"
    assert_error(api.call("POST", path, json=report), 400, "bad_request")
    assert sim.heartbeats == [] and sim.reports == []

    assert_error(api.call("GET", "/exporters/exporter-1/tasks/"), 404, "not_found")
    assert_error(api.call("GET", "/exporters"), 404, "not_found")
    outside = api.http.get(f"{sim.base_url}/v2/exporters/exporter-1/tasks", timeout=10)
    assert_error(outside, 404, "not_found")
    wrong_method = api.call("POST", "/exporters/exporter-1/tasks")
    assert_error(wrong_method, 405, "method_not_allowed")
    assert wrong_method.headers["Allow"] == "GET"


# -- the task list -------------------------------------------------------------------------------


def test_tasks_are_signed_and_verify_with_the_public_key_file(
    spec: dict[str, Any], sim: MassSimulator, api: Api
) -> None:
    stored = sim.put_task(task("t1"))
    assert stored["version"] == 1 and stored["exporter_id"] == "exporter-1"
    assert stored["issued_at"] <= time.time()
    sim.put_task(task("t2", enabled=False, version=4))
    answer = api.tasks()
    assert answer.status_code == 200
    body = answer.json()
    jsonschema.validate(body, {"type": "object", "required": ["tasks"]})
    envelopes = body["tasks"]
    assert len(envelopes) == 2
    documents = []
    for envelope in envelopes:
        jsonschema.validate(envelope, schema(spec, "SignedTask"))
        document = verified(sim, envelope)
        jsonschema.validate(document, schema(spec, "Task"))
        assert envelope["key_id"] == sim.key_id
        documents.append(document)
    assert documents == sim.tasks()
    assert [(d["task_id"], d["version"], d.get("enabled")) for d in documents] == [
        ("t1", 1, None),
        ("t2", 4, False),
    ]
    assert documents[0]["vm"]["name"] == "vm t1 é"  # UTF-8, as the YAML says

    # A signature covers exactly the document's bytes: one changed byte fails.
    raw = bytearray(base64.b64decode(envelopes[0]["document"]))
    raw[-2] ^= 1
    with pytest.raises(InvalidSignature):
        public_key(sim).verify(base64.b64decode(envelopes[0]["signature"]), bytes(raw))
    # The same version is served byte for byte the same every time.
    assert api.tasks().json()["tasks"] == envelopes


def test_versions_grow_and_old_envelopes_are_the_exact_earlier_ones(
    sim: MassSimulator, api: Api
) -> None:
    sim.put_task(task("t1"))
    first = api.tasks().json()["tasks"]
    assert verified(sim, first[0])["version"] == 1
    changed = sim.put_task(task("t1", schedule={"interval_s": 600}))
    assert changed["version"] == 2
    assert sim.put_task(task("t1", schedule={"interval_s": 900}))["version"] == 3
    listed = api.tasks().json()["tasks"]
    assert len(listed) == 1
    document = verified(sim, listed[0])
    assert (document["version"], document["schedule"]) == (3, {"interval_s": 900})

    assert sim.old_envelope("t1", 1) == first[0]
    assert sim.old_envelope("t1", 3) == listed[0]
    assert verified(sim, sim.old_envelope("t1", 2))["schedule"] == {"interval_s": 600}
    with pytest.raises(SimulatorError):
        sim.old_envelope("t1", 4)
    # An explicit older version is served as current; the next bump goes past every one.
    sim.put_task(task("t1", version=1))
    assert verified(sim, api.tasks().json()["tasks"][0])["version"] == 1
    assert sim.put_task(task("t1"))["version"] == 4


def test_only_the_exporters_own_tasks_are_listed(sim: MassSimulator, api: Api) -> None:
    sim.put_task(task("a1"))
    sim.put_task(task("b1", exporter_id="exporter-2"))
    sim.exporter_id = "exporter-2"
    sim.put_task(task("b2"))
    sim.put_task(task("a2", exporter_id="exporter-1"))

    def listed(exporter: str) -> list[str]:
        return [verified(sim, e)["task_id"] for e in api.tasks(exporter).json()["tasks"]]

    assert listed("exporter-1") == ["a1", "a2"]
    assert listed("exporter-2") == ["b1", "b2"]
    assert listed("exporter-3") == []  # the list needs no registration
    # A task moved to another exporter leaves the first one's list.
    sim.put_task(task("a1", exporter_id="exporter-2"))
    assert listed("exporter-1") == ["a2"]
    assert listed("exporter-2") == ["a1", "b1", "b2"]  # in the order first put


def test_a_removed_task_leaves_the_list_and_its_version_goes_on(
    sim: MassSimulator, api: Api
) -> None:
    sim.put_task(task("t1"))
    sim.put_task(task("t2"))
    sim.remove_task("t1")
    assert [t["task_id"] for t in sim.tasks()] == ["t2"]
    assert [verified(sim, e)["task_id"] for e in api.tasks().json()["tasks"]] == ["t2"]
    with pytest.raises(SimulatorError):
        sim.remove_task("t1")
    assert api.register().status_code == 200
    assert api.report("t1", "gone-1", state="removed").status_code == 200
    assert sim.put_task(task("t1"))["version"] == 2  # not a replay of version 1
    assert sim.old_envelope("t1", 1)


def test_put_task_refuses_what_the_yaml_refuses(sim: MassSimulator) -> None:
    for bad in (
        task("bad id"),
        task("t1", platform="hyperv"),
        task("t1", vm={"name": "no id"}),
        task("t1", schedule={"interval_s": 4}),
        task("t1", version=0),
        task("t1", issued_at="now"),
        {k: v for k, v in task("t1").items() if k != "source"},
    ):
        with pytest.raises(SimulatorError):
            sim.put_task(bad)
    assert sim.tasks() == []


def test_extras_are_served_as_given_beside_the_real_tasks(sim: MassSimulator, api: Api) -> None:
    sim.put_task(task("t1"))
    v1 = sim.old_envelope("t1", 1)
    sim.put_task(task("t1"))
    forger = Ed25519PrivateKey.generate()
    unsigned = {"document": sim.envelope(sim.put_task(task("t9")) | {"version": 7})["document"]}
    sim.remove_task("t9")
    wrongly_signed = sim.envelope(task("evil", version=1, exporter_id="exporter-1"), key=forger)
    wrongly_signed["key_id"] = sim.key_id  # it claims to be Mass'
    foreign = sim.envelope(task("x1", version=1, issued_at=1.0, exporter_id="exporter-2"))
    garbage = {"document": "%%%not base64", "signature": "", "extra": [1]}
    for extra in (unsigned, wrongly_signed, v1, foreign, garbage):
        sim.serve_extra(extra)

    listed = api.tasks().json()["tasks"]
    assert verified(sim, listed[0])["version"] == 2
    assert listed[1:] == [unsigned, wrongly_signed, v1, foreign, garbage]
    assert "signature" not in listed[1]
    with pytest.raises(InvalidSignature):
        verified(sim, listed[2])
    assert verified(sim, listed[3])["version"] == 1  # a replay: valid, but older
    assert verified(sim, listed[4])["exporter_id"] == "exporter-2"
    assert api.tasks("exporter-2").json()["tasks"][-5:] == listed[1:]  # extras go to everyone

    # The proxy reports refusing them: the tasks they name are known to Mass.
    assert api.register().status_code == 200
    for n, task_id in enumerate(("evil", "x1", "t9")):
        assert api.report(task_id, f"refused-{n}", state="refused").status_code == 200
    sim.clear_extra()
    assert len(api.tasks().json()["tasks"]) == 1


# -- status reports ------------------------------------------------------------------------------


def test_status_reports_are_deduplicated_by_report_id(sim: MassSimulator, api: Api) -> None:
    sim.put_task(task("t1"))
    assert api.register().status_code == 200
    progress = {"disk0": {"done": 10, "total": 100}}
    first = api.report("t1", "r1", state="syncing", run_id="run-1", progress=progress)
    assert first.status_code == 200 and first.json() == {}
    assert api.report("t1", "r2", state="committed", point_id="p1", run_id=None).status_code == 200
    assert_error(api.report("t1", "r1", state="syncing"), 409, "duplicate_report")
    assert_error(api.report("t1", "r1", state="failed"), 409, "duplicate_report")
    assert_error(api.report("never-put", "r3"), 404, "unknown_task")
    assert api.report("t1", "r3").status_code == 200  # a 404 did not take the report_id

    reports = sim.reports
    assert [r["report_id"] for r in reports] == ["r1", "r2", "r3"]
    assert reports[0]["progress"] == progress and reports[0]["exporter_id"] == "exporter-1"
    assert reports[1]["run_id"] is None and reports[1]["point_id"] == "p1"
    assert sim.duplicate_reports == 2
    # report_ids are Mass-wide: another exporter's resend is a duplicate too.
    other = Api(sim, "exporter-2")
    assert other.register().status_code == 200
    assert_error(other.report("t1", "r2"), 409)
    assert sim.duplicate_reports == 3


# -- faults, outages, records --------------------------------------------------------------------


def test_fail_all_answers_errors_then_normally(sim: MassSimulator, api: Api) -> None:
    sim.fail_all(503, count=2)
    assert_error(api.register(), 503, "service_unavailable")
    assert_error(api.tasks(key="wrong"), 503)  # before authentication
    assert api.register().status_code == 200
    assert api.heartbeat().status_code == 200

    sim.fail_all(500)
    for _ in range(3):
        assert_error(api.heartbeat(), 500, "internal_server_error")
    assert api.admin("GET", "state").status_code == 200  # /_sim/ is never failed
    sim.clear_faults()
    assert api.heartbeat().status_code == 200
    assert [c.status for c in sim.calls] == [503, 503, 200, 200, 500, 500, 500, 200]
    assert len(sim.registrations) == 1 and len(sim.heartbeats) == 2
    with pytest.raises(ValueError):
        sim.fail_all(200)


def test_calls_record_every_api_request(sim: MassSimulator, api: Api) -> None:
    before = time.time()
    api.register()
    api.tasks(key=None)
    api.admin("GET", "state")
    after = time.time()
    calls = sim.calls
    assert [(c.method, c.path, c.status) for c in calls] == [
        ("POST", "/hypermotion/v1/exporters/exporter-1/register", 200),
        ("GET", "/hypermotion/v1/exporters/exporter-1/tasks", 401),
    ]
    assert calls[0].body == registration() and calls[1].body is None
    assert before <= calls[0].at <= calls[1].at <= after


def test_stop_then_start_serves_on_the_same_port_with_the_state_kept(
    sim: MassSimulator, api: Api
) -> None:
    sim.put_task(task("t1"))
    endpoint, port = sim.endpoint, sim.port
    assert endpoint == f"https://127.0.0.1:{port}/hypermotion/v1"
    assert api.register().status_code == 200
    before = api.tasks().json()

    sim.stop()
    assert not sim.running and sim.endpoint == endpoint
    with pytest.raises(requests.ConnectionError):
        api.heartbeat(timeout=5)
    sim.stop()  # twice is harmless

    assert sim.start() == endpoint and sim.port == port
    assert api.heartbeat().status_code == 200  # the same session, a new connection
    assert api.tasks().json() == before
    assert sim.start() == endpoint  # already started


def test_certificate_is_checked_and_plain_http_is_possible(tmp_path: Path) -> None:
    with MassSimulator(tmp_path / "tls") as sim:
        http = requests.Session()
        http.trust_env = False  # the system's CAs, not the simulator's
        with pytest.raises(requests.exceptions.SSLError):
            http.get(f"{sim.endpoint}/exporters/e/tasks", timeout=10)
    with MassSimulator(tmp_path / "plain", tls=False, base_path="api/") as sim:
        assert sim.endpoint == f"http://127.0.0.1:{sim.port}/api"
        http = requests.Session()
        http.trust_env = False
        answer = http.get(
            f"{sim.endpoint}/exporters/e/tasks", headers={"X-Auth-Key": "mass-key"}, timeout=10
        )
        assert answer.json() == {"tasks": []}


def test_the_signing_key_survives_a_new_simulator_on_the_same_directory(tmp_path: Path) -> None:
    first = MassSimulator(tmp_path / "m")
    envelope = first.envelope(task("t1", version=1, exporter_id="e", issued_at=1.0))
    second = MassSimulator(tmp_path / "m")
    assert second.key_id == first.key_id
    assert verified(second, envelope)["task_id"] == "t1"


# -- /_sim/ and the process ----------------------------------------------------------------------


def test_admin_endpoints(sim: MassSimulator, api: Api) -> None:
    made = api.admin("POST", "tasks", json=task("t1"))
    assert made.status_code == 200 and made.json()["version"] == 1
    assert api.admin("POST", "tasks", json=task("t1")).json()["version"] == 2
    assert_error(api.admin("POST", "tasks", json=task("t2", platform="x")), 400, "bad_request")
    assert_error(api.admin("POST", "tasks", data=b"[]"), 400, "bad_request")
    assert api.admin("POST", "tasks", json=task("t2")).status_code == 200
    assert verified(sim, api.tasks().json()["tasks"][0])["version"] == 2
    assert api.register().status_code == 200
    assert api.report("t1", "r1").status_code == 200
    api.report("t1", "r1")

    state = api.admin("GET", "state").json()
    assert set(state) >= {"tasks", "registrations", "heartbeats", "reports", "duplicate_reports"}
    assert [t["task_id"] for t in state["tasks"]] == ["t1", "t2"]
    assert state["registrations"][0]["hostname"] == "proxy-a"
    assert [r["report_id"] for r in state["reports"]] == ["r1"]
    assert state["duplicate_reports"] == 1 and state["heartbeats"] == []

    assert api.admin("DELETE", "tasks/t1").status_code == 200
    assert_error(api.admin("DELETE", "tasks/t1"), 404, "not_found")
    assert [t["task_id"] for t in sim.tasks()] == ["t2"]
    assert_error(api.admin("GET", "nothing"), 404)

    assert api.admin("POST", "fail", json={"status": 502, "count": 1}).status_code == 200
    assert_error(api.tasks(), 502, "bad_gateway")
    assert api.admin("POST", "forget_exporters").status_code == 200
    assert_error(api.heartbeat(), 404, "unknown_exporter")
    assert api.admin("POST", "fail", json={}).status_code == 200
    assert_error(api.tasks(), 503)
    assert api.admin("POST", "clear_faults").status_code == 200
    assert api.tasks().status_code == 200
    assert all("/_sim" not in c.path for c in sim.calls)


def test_main_serves_until_sigterm(tmp_path: Path) -> None:
    state_file = tmp_path / "state.json"
    process = subprocess.Popen(
        [sys.executable, "-m", "hamal_workers.simulators.mass", "--directory",
         str(tmp_path / "mass"), "--state-file", str(state_file), "--exporter-id", "px-1"],
        stdout=subprocess.PIPE, text=True,
    )  # fmt: skip
    try:
        assert process.stdout is not None
        printed = json.loads(process.stdout.readline())  # once it listens
        state = json.loads(state_file.read_text())
        assert state == printed
        assert set(state) >= {"endpoint", "ca_file", "public_key_path", "auth_key", "exporter_id"}
        assert state["exporter_id"] == "px-1" and state["auth_key"] == "mass-key"
        http = requests.Session()
        http.trust_env = False
        http.verify = state["ca_file"]
        admin = state["admin_url"]
        assert http.post(f"{admin}/tasks", json=task("t1"), timeout=10).json()["version"] == 1
        headers = {"X-Auth-Key": state["auth_key"]}
        listed = http.get(f"{state['endpoint']}/exporters/px-1/tasks", headers=headers, timeout=10)
        (envelope,) = listed.json()["tasks"]
        key = serialization.load_pem_public_key(Path(state["public_key_path"]).read_bytes())
        assert isinstance(key, Ed25519PublicKey)
        document = base64.b64decode(envelope["document"])
        key.verify(base64.b64decode(envelope["signature"]), document)
        assert json.loads(document)["exporter_id"] == "px-1"
        assert http.get(f"{admin}/state", timeout=10).json()["tasks"][0]["task_id"] == "t1"
        process.send_signal(signal.SIGTERM)
        assert process.wait(20) == 0
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()
