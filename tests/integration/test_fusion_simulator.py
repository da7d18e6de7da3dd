"""The FusionCompute simulator, spoken to over real HTTPS with requests and over real sockets.

Each test has its own simulator in tmp_path. What a client sees is checked on the wire: status
codes and errorCodes, the fields of the answers, a CBT bitmap read with a decoder written
here (not fusion_wire's), snapshot data read over the backup socket byte for byte against
what the simulator froze. Waiting is only ever polling a task's or a resource's status, the
protocol's own way.
"""

from __future__ import annotations

import hashlib
import json
import os
import signal
import socket
import ssl
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import requests

from hamal_workers.platforms import fusion_wire as wire
from hamal_workers.simulators.fusion_compute import FusionComputeSimulator

pytestmark = pytest.mark.timeout(60)

MiB = 1 << 20
BLOCK = 128 * 512  # the default block_sectors
ACCEPT = "application/json;version=8.0;charset=UTF-8"


class Api:
    """A requests session on the simulator that trusts its certificate (and only that: the
    environment's CA bundle would override a session's verify)."""

    def __init__(self, sim: FusionComputeSimulator) -> None:
        self.sim = sim
        self.http = requests.Session()
        self.http.trust_env = False
        self.http.verify = str(sim.ca_file)
        self.token: str | None = None

    def login(
        self, password: str = "secret", *, plain: bool = False, user: str = "hamal", kind="2"
    ) -> requests.Response:
        headers = {"X-Auth-User": user, "X-Auth-UserType": kind, "Accept": ACCEPT}
        if plain:
            headers.update({"X-Auth-Key": password, "X-ENCRIPT-ALGORITHM": "1"})
        else:
            headers["X-Auth-Key"] = hashlib.sha256(password.encode()).hexdigest()
        response = self.http.post(f"{self.sim.base_url}/service/session", headers=headers)
        if response.status_code == 200:
            self.token = response.headers["X-Auth-Token"]
        return response

    def call(self, method: str, path: str, **kwargs: Any) -> requests.Response:
        headers = {"Accept": ACCEPT}
        if self.token:
            headers["X-Auth-Token"] = self.token
        return self.http.request(
            method, f"{self.sim.base_url}{path}", headers=headers, timeout=10, **kwargs
        )

    def ok(self, method: str, path: str, **kwargs: Any) -> Any:
        response = self.call(method, path, **kwargs)
        assert response.status_code == 200, response.text
        return response.json()

    def fails(self, method: str, path: str, status: int, code: str, **kwargs: Any) -> None:
        response = self.call(method, path, **kwargs)
        assert (response.status_code, response.json()["errorCode"]) == (status, code), response.text
        assert response.json()["errorDes"]

    def site(self) -> str:
        return self.ok("GET", "/service/sites")["sites"][0]["uri"]

    def vm(self, uuid: str) -> dict[str, Any]:
        vms = self.ok("GET", f"{self.site()}/vms", params={"uuid": uuid, "detail": 2})["vms"]
        assert len(vms) == 1
        return vms[0]

    def wait(self, uri: str, until: tuple[str, ...] = ("success", "failed")) -> dict[str, Any]:
        deadline = time.monotonic() + 10
        while True:
            body = self.ok("GET", uri)
            if body["status"] in until:
                return body
            assert time.monotonic() < deadline, body
            time.sleep(0.01)

    def snapshot(self, vm_uri: str, name: str, kind: str = "CBTbackup") -> dict[str, Any]:
        made = self.ok("POST", f"{vm_uri}/snapshots", json=snapshot_args(name, kind))
        assert self.wait(made["taskUri"])["status"] == "success"
        return self.ok("GET", made["uri"])

    def getcbt(self, vol: dict[str, Any], **args: Any) -> requests.Response:
        body = {
            "type": "DiffBitmapAndBit1Num",
            "snapUuid": vol["snapUuid"],
            "volCBTCreateTime": vol["volCBTCreateTime"],
            "startBlock": 0,
            "blockNum": 8192,
            **args,
        }
        return self.call("POST", f"{vol['volumeUri']}/getcbt", json=body)

    def resource(
        self, snapshot: dict[str, Any], index: int = 0, mode: str = "lan", **args: Any
    ) -> requests.Response:
        vol = snapshot["volsnapshots"][index]
        body = {
            "delay": 60,
            "taskType": "CBTBackup",
            "ip": "127.0.0.1",
            "snapUrn2": snapshot["urn"],
            "volCBTCreateTime": vol["volCBTCreateTime"],
            "transMode": mode,
            **args,
        }
        return self.call("POST", f"{vol['volumeUri']}/backupresources", json=body)

    def ready_resource(self, snapshot: dict[str, Any], mode: str = "lan") -> dict[str, Any]:
        response = self.resource(snapshot, mode=mode)
        assert response.status_code == 200, response.text
        return self.wait(response.json()["uri"], ("success",))


def snapshot_args(name: str, kind: str) -> dict[str, Any]:
    return {"name": name, "description": "", "needMemoryShot": False, "isConsistent": False,
            "type": kind}  # fmt: skip


def marked_blocks(answer: dict[str, Any], start: int) -> set[int]:
    """The blocks a getcbt bitmap marks: hex digits left to right, high bit first."""
    bits = "".join(f"{int(digit, 16):04b}" for digit in answer["bitMap"])
    assert len(bits) == -(-answer["bitNum"] // 8) * 8
    assert "1" not in bits[answer["bitNum"] :]
    blocks = {start + i for i, bit in enumerate(bits) if bit == "1"}
    assert len(blocks) == answer["bit1Num"]
    return blocks


class Wire:
    """A backup socket client: fusion_wire's frames, one request at a time."""

    def __init__(self, port: int, cadata: str | None = None) -> None:
        sock = socket.create_connection(("127.0.0.1", port), timeout=10)
        if cadata is not None:
            context = ssl.create_default_context(cadata=cadata)
            sock = context.wrap_socket(sock, server_hostname="127.0.0.1")
        self.sock = sock
        self.sequence = 0

    def request(self, operation: int, body: bytes) -> bytes:
        self.sequence += 1
        self.sock.sendall(wire.frame(operation, self.sequence, body))
        header = wire.recv_header(self.sock)
        assert (header.operation, header.sequence) == (operation, self.sequence)
        return bytes(wire.recv_body(self.sock, header))

    def open(self, resource: dict[str, Any], token: str | None = None, flags: int = 0) -> Any:
        body = wire.OPEN_REQUEST.pack(
            resource["targetFile"].encode(), (token or resource["token"]).encode(), flags
        )
        return wire.OPEN_REPLY.unpack(self.request(wire.OP_OPEN, body))

    def read(self, handle: int, offset: int, length: int) -> tuple[int, bytes]:
        reply = self.request(wire.OP_READ, wire.READ_REQUEST.pack(handle, offset, length))
        result, size = wire.READ_REPLY.unpack(reply[: wire.READ_REPLY.size])
        data = reply[wire.READ_REPLY.size :]
        assert len(data) == size
        return result, data

    def close_handle(self, handle: int) -> int:
        return wire.CLOSE_REPLY.unpack(
            self.request(wire.OP_CLOSE, wire.CLOSE_REQUEST.pack(handle))
        )[0]

    def close(self) -> None:
        self.sock.close()


def connect(resource: dict[str, Any]) -> Wire:
    return Wire(resource["hostPort"], resource["caCert"] or None)


@pytest.fixture
def sim(tmp_path: Path) -> Iterator[FusionComputeSimulator]:
    with FusionComputeSimulator(tmp_path / "fc") as simulator:
        yield simulator


@pytest.fixture
def api(sim: FusionComputeSimulator) -> Api:
    api = Api(sim)
    assert api.login().status_code == 200
    return api


# -- session -------------------------------------------------------------------------------------


def test_login_with_both_key_forms_and_bad_credentials(sim: FusionComputeSimulator) -> None:
    api = Api(sim)
    versions = api.ok("GET", "/service/versions")["versions"]
    assert {"version": "8.0", "loginUri": "/service/session"} in versions
    response = api.login()
    assert response.status_code == 200
    assert response.json()["validity"] == 600_000 and response.json()["userName"] == "hamal"
    assert api.login(plain=True).status_code == 200
    for bad in (api.login("wrong"), api.login("wrong", plain=True), api.login(kind="0"),
                api.login(user="other")):  # fmt: skip
        assert (bad.status_code, bad.json()["errorCode"]) == (400, wire.BAD_CREDENTIALS)
    assert sim.logins == 2
    login = [c for c in sim.calls if c.path == "/service/session"][0]
    assert (login.status, login.token, login.version) == (200, False, "8.0")
    assert sim.calls[-1].code == wire.BAD_CREDENTIALS


def test_tokens_expire_and_logout_revokes(tmp_path: Path) -> None:
    with FusionComputeSimulator(tmp_path, session_ttl=0.0) as sim:
        api = Api(sim)
        assert api.login().status_code == 200
        api.fails("GET", "/service/sites", 401, wire.NOT_LOGGED_IN)  # absolute: 0 s after login
    with FusionComputeSimulator(tmp_path / "again") as sim:
        api = Api(sim)
        api.fails("GET", "/service/sites", 401, wire.NOT_LOGGED_IN)  # no token at all
        api.login()
        api.ok("GET", "/service/sites")
        sim.expire_sessions()
        api.fails("GET", "/service/sites", 401, wire.NOT_LOGGED_IN)
        api.login()
        assert api.ok("DELETE", "/service/session") == {}
        api.fails("GET", "/service/sites", 401, wire.NOT_LOGGED_IN)
        assert (sim.logins, sim.logouts) == (2, 1)
        assert sim.calls[-1].token and sim.calls[-1].code == wire.NOT_LOGGED_IN


# -- inventory -----------------------------------------------------------------------------------


def test_vms_are_paged_and_filtered(sim: FusionComputeSimulator, api: Api) -> None:
    uuids = [sim.add_vm(f"vm{i:02d}", [MiB]) for i in range(25)]
    site = api.site()
    first = api.ok("GET", f"{site}/vms")
    assert first["total"] == 25 and [v["uuid"] for v in first["vms"]] == uuids[:20]
    assert "vmConfig" not in first["vms"][0]
    rest = api.ok("GET", f"{site}/vms", params={"limit": 20, "offset": 20})
    assert [v["uuid"] for v in rest["vms"]] == uuids[20:]
    assert len(api.ok("GET", f"{site}/vms", params={"limit": 100})["vms"]) == 25
    api.fails("GET", f"{site}/vms", 400, "10000001", params={"limit": 101})
    api.fails("GET", f"{site}/vms", 400, "10000001", params={"offset": -1})
    assert api.ok("GET", f"{site}/vms", params={"uuid": uuids[7]})["vms"][0]["name"] == "vm07"
    named = api.ok("GET", f"{site}/vms", params={"name": "vm1"})["vms"]
    assert [v["name"] for v in named] == [f"vm1{i}" for i in range(10)]  # fuzzy, as a VRM
    api.fails("GET", "/service/sites/NOSUCH/vms", 404, wire.NO_SUCH_OBJECT)


def test_vm_detail_volumes_and_tasks(sim: FusionComputeSimulator, api: Api) -> None:
    nic = {"name": "eth0", "mac": "28:6e:d4:00:00:01", "ip": "10.0.0.5", "portGroupName": "pg1"}
    uuid = sim.add_vm(
        "db", [3 * (1 << 30) + 512, MiB, 2 * MiB], shared={1}, independent={2}, cpus=4,
        memory_mb=8192, os_type="Windows", os_version="Windows Server 2019", firmware="UEFI",
        nics=[nic],
    )  # fmt: skip
    listed = api.vm(uuid)
    vm = api.ok("GET", listed["uri"])
    assert vm == listed
    site_id = vm["urn"].split(":")[2]
    assert vm["urn"] == f"urn:sites:{site_id}:vms:{vm['uri'].rsplit('/', 1)[1]}"
    assert vm["uri"].rsplit("/", 1)[1].startswith("i-")
    assert (vm["name"], vm["status"], vm["isTemplate"]) == ("db", "running", False)
    assert vm["hostUrn"] == sim.state()["vms"][0]["host"] and vm["clusterUrn"]
    config = vm["vmConfig"]
    assert config["cpu"] == {"quantity": 4} and config["memory"] == {"quantityMB": 8192}
    assert config["properties"]["bootFirmware"] == "UEFI"
    assert vm["osOptions"] == {"osType": "Windows", "osVersion": "Windows Server 2019"}
    assert {k: config["nics"][0][k] for k in nic} == nic
    disks = config["disks"]
    assert [d["sequenceNum"] for d in disks] == [1, 2, 3]
    assert [d["quantityGB"] for d in disks] == [4, 1, 1]
    assert [d["type"] for d in disks] == ["normal", "share", "normal"]
    assert [d["indepDisk"] for d in disks] == [False, False, True]
    assert [d["systemVolume"] for d in disks] == [True, False, False]
    assert all(d["pciType"] == "VIRTIO" and d["isThin"] and d["persistentDisk"] for d in disks)
    assert "size" not in disks[0]
    volume = api.ok("GET", wire.urn_to_uri(disks[0]["volumeUrn"]))
    assert volume["size"] == 3 * (1 << 30) + 512 and volume["quantityGB"] == 4
    assert (volume["uuid"], volume["status"]) == (disks[0]["volumeUuid"], "USE")
    api.fails("GET", f"{api.site()}/vms/i-99999999", 404, wire.NO_SUCH_OBJECT)

    # Only the normal, persistent disk is in a snapshot.
    snapshot = api.snapshot(vm["uri"], "s1")
    assert [v["volumeUrn"] for v in snapshot["volsnapshots"]] == [disks[0]["volumeUrn"]]


def test_tasks_run_then_succeed(tmp_path: Path) -> None:
    with FusionComputeSimulator(tmp_path, task_seconds=1.0) as sim:
        api = Api(sim)
        api.login()
        vm = api.vm(sim.add_vm("web", [MiB]))
        made = api.ok("POST", f"{vm['uri']}/snapshots", json=snapshot_args("s1", "CBTbackup"))
        task = api.ok("GET", made["taskUri"])
        assert task["status"] == "running" and 0 <= task["progress"] < 100
        assert task["entityUrn"] == vm["urn"] and task["finishTime"] is None
        assert api.ok("GET", made["uri"])["status"] == "creating"
        assert api.wait(made["taskUri"])["status"] == "success"
        assert api.ok("GET", made["uri"])["status"] == "ready"
        done = api.ok("GET", made["taskUri"])
        assert done["progress"] == 100 and done["finishTime"]
        resource = api.resource(api.ok("GET", made["uri"])).json()
        pending = api.ok("GET", resource["uri"])
        assert pending["status"] == "creating" and not pending["token"]
        assert api.wait(resource["uri"], ("success",))["token"]


# -- snapshots -----------------------------------------------------------------------------------


def test_snapshots_chain_freeze_and_delete(sim: FusionComputeSimulator, api: Api) -> None:
    uuid = sim.add_vm("web", [2 * MiB])
    vm = api.vm(uuid)
    sim.write(uuid, 0, 1000, b"before")
    s1 = api.snapshot(vm["uri"], "s1")
    sim.write(uuid, 0, 1000, b"after!")
    s2 = api.snapshot(vm["uri"], "s2", "normal")
    s3 = api.snapshot(vm["uri"], "s3", "backup")
    assert sim.snapshot_names(uuid) == ["s1", "s2", "s3"]
    assert sim.snapshot_content(uuid, "s1", 0)[1000:1006] == b"before"
    assert sim.snapshot_content(uuid, "s2", 0)[1000:1006] == b"after!"
    assert (s1["type"], s2["type"], s3["type"]) == ("CBTbackup", "normal", "backup")
    assert s1["volsnapshots"][0]["ChgID"] and s1["volsnapshots"][0]["volCBTCreateTime"]
    assert s2["volsnapshots"][0]["ChgID"] == "" and s3["volsnapshots"][0]["ChgID"] == ""

    tree = api.ok("GET", f"{vm['uri']}/snapshots")
    assert tree["currentSnapshot"]["urn"] == s3["urn"]
    (root,) = tree["rootSnapshots"]
    assert root["name"] == "s1" and root["childSnapshots"][0]["name"] == "s2"
    assert root["childSnapshots"][0]["childSnapshots"][0]["name"] == "s3"

    # Deleting the middle one hangs s3 from s1; deleting the current one moves current back.
    deleted = api.ok("DELETE", s2["uri"])
    assert api.ok("GET", s2["uri"])["status"] == "deleting"
    assert api.wait(deleted["taskUri"])["status"] == "success"
    api.fails("GET", s2["uri"], 404, wire.SNAPSHOT_MISSING)
    api.fails("DELETE", s2["uri"], 404, wire.SNAPSHOT_MISSING)
    tree = api.ok("GET", f"{vm['uri']}/snapshots")
    assert tree["rootSnapshots"][0]["childSnapshots"][0]["name"] == "s3"
    api.wait(api.ok("DELETE", s3["uri"])["taskUri"])
    assert api.ok("GET", f"{vm['uri']}/snapshots")["currentSnapshot"]["urn"] == s1["urn"]
    assert sim.snapshot_names(uuid) == ["s1"]


def test_one_snapshot_task_at_a_time_and_hung_creation(
    sim: FusionComputeSimulator, api: Api
) -> None:
    vm = api.vm(sim.add_vm("web", [MiB]))
    sim.hang_next_task("create_snapshot")
    hung = api.ok("POST", f"{vm['uri']}/snapshots", json=snapshot_args("s1", "CBTbackup"))
    assert api.ok("GET", hung["taskUri"])["status"] == "running"
    api.fails("POST", f"{vm['uri']}/snapshots", 409, wire.SNAPSHOT_TASK_RUNNING,
              json=snapshot_args("s2", "CBTbackup"))  # fmt: skip
    resource = api.resource(api.ok("GET", hung["uri"]))
    assert resource.json()["errorCode"] == wire.SNAPSHOT_NOT_READY
    # Its deletion is allowed: the creation is cancelled, the snapshot goes.
    deleted = api.ok("DELETE", hung["uri"])
    assert api.ok("GET", hung["taskUri"])["status"] == "failed"
    assert api.wait(deleted["taskUri"])["status"] == "success"
    api.fails("GET", hung["uri"], 404, wire.SNAPSHOT_MISSING)
    assert api.snapshot(vm["uri"], "s2")["status"] == "ready"


def test_snapshot_task_failures(sim: FusionComputeSimulator, api: Api) -> None:
    vm = api.vm(sim.add_vm("web", [MiB]))
    sim.fail_next_task("create_snapshot", reason="disk busy")
    made = api.ok("POST", f"{vm['uri']}/snapshots", json=snapshot_args("s1", "CBTbackup"))
    task = api.wait(made["taskUri"])
    assert (task["status"], task["reasonDes"]) == ("failed", "disk busy")
    api.fails("GET", made["uri"], 404, wire.SNAPSHOT_MISSING)
    assert api.ok("GET", f"{vm['uri']}/snapshots")["currentSnapshot"] is None

    s2 = api.snapshot(vm["uri"], "s2")
    sim.fail_next_task("delete_snapshot")
    assert api.wait(api.ok("DELETE", s2["uri"])["taskUri"])["status"] == "failed"
    assert api.ok("GET", s2["uri"])["status"] == "ready"
    sim.hang_next_task("delete_snapshot")
    api.ok("DELETE", s2["uri"])
    api.fails("POST", f"{vm['uri']}/snapshots", 409, wire.SNAPSHOT_TASK_RUNNING,
              json=snapshot_args("s3", "normal"))  # fmt: skip


def test_snapshot_limit(tmp_path: Path) -> None:
    with FusionComputeSimulator(tmp_path, snapshot_limit=2) as sim:
        api = Api(sim)
        api.login()
        vm = api.vm(sim.add_vm("web", [MiB]))
        api.snapshot(vm["uri"], "a", "backup")
        b = api.snapshot(vm["uri"], "b", "CBTbackup")
        api.snapshot(vm["uri"], "plain", "normal")  # normal snapshots do not count
        api.fails("POST", f"{vm['uri']}/snapshots", 400, wire.SNAPSHOT_LIMIT,
                  json=snapshot_args("c", "CBTbackup"))  # fmt: skip
        api.wait(api.ok("DELETE", b["uri"])["taskUri"])
        api.snapshot(vm["uri"], "c", "CBTbackup")


def test_a_large_sparse_disk_snapshots_fast(sim: FusionComputeSimulator, api: Api) -> None:
    uuid = sim.add_vm("big", [2 << 30])
    sim.write(uuid, 0, (2 << 30) - 5, b"tail!")
    started = time.monotonic()
    snapshot = api.snapshot(api.vm(uuid)["uri"], "s1")
    assert time.monotonic() - started < 5
    answer = api.getcbt(snapshot["volsnapshots"][0], startBlock=32760).json()
    assert marked_blocks(answer, 32760) == {32767} and answer["bitNum"] == 8


# -- CBT -----------------------------------------------------------------------------------------


def test_getcbt_first_incremental_and_broken_chains(sim: FusionComputeSimulator, api: Api) -> None:
    size = 100 * BLOCK + 512  # 101 blocks, the last one short
    uuid = sim.add_vm("web", [size])
    vm = api.vm(uuid)
    sim.write(uuid, 0, 0, b"a" * 4096)
    sim.write(uuid, 0, 9 * BLOCK + 100, b"b" * 10)
    sim.write(uuid, 0, 21 * BLOCK - 5, b"c" * 10)  # across blocks 20 and 21
    sim.write(uuid, 0, 100 * BLOCK, b"d" * 512)
    cbt = api.ok("GET", f"{vm['uri']}/action/CBTbackup")
    assert cbt["CBTflag"] is False
    s1 = api.snapshot(vm["uri"], "s1")
    v1 = s1["volsnapshots"][0]
    assert api.ok("GET", f"{vm['uri']}/action/CBTbackup") == {
        "CBTflag": True, "CBTCeateTime": v1["volCBTCreateTime"]}  # fmt: skip

    first = api.getcbt(v1).json()
    assert (first["sectorOfBlock"], first["bitNum"]) == (128, 101)
    assert marked_blocks(first, 0) == {0, 9, 20, 21, 100}
    part = api.getcbt(v1, startBlock=8, blockNum=16).json()
    assert part["bitNum"] == 16 and marked_blocks(part, 8) == {9, 20, 21}

    sim.write(uuid, 0, 5 * BLOCK, b"e")
    sim.write(uuid, 0, 9 * BLOCK, b"f")
    s2 = api.snapshot(vm["uri"], "s2")
    v2 = s2["volsnapshots"][0]
    assert v2["volCBTCreateTime"] == v1["volCBTCreateTime"] and v2["ChgID"] != v1["ChgID"]
    api.snapshot(vm["uri"], "between", "normal")  # not a CBT snapshot: changes nothing
    sim.write(uuid, 0, 50 * BLOCK + 7, b"g")
    s3 = api.snapshot(vm["uri"], "s3")
    v3 = s3["volsnapshots"][0]
    assert marked_blocks(api.getcbt(v2, chgID=v1["ChgID"]).json(), 0) == {5, 9}
    assert marked_blocks(api.getcbt(v3, chgID=v2["ChgID"]).json(), 0) == {50}
    assert marked_blocks(api.getcbt(v3, chgID=v1["ChgID"]).json(), 0) == {5, 9, 50}
    assert marked_blocks(api.getcbt(v3, chgID=v1["ChgID"], startBlock=48).json(), 48) == {50}

    def refused(vol: dict[str, Any], status: int, code: str, **args: Any) -> None:
        answer = api.getcbt(vol, **args)
        assert (answer.status_code, answer.json()["errorCode"]) == (status, code)

    refused(v3, 400, "10000001", startBlock=4)
    refused(v3, 400, "10000001", startBlock=104)
    refused(v3, 400, wire.NOT_ON_ONE_CHAIN, volCBTCreateTime="1970-01-01T00:00:00Z")
    refused(v1, 400, wire.NOT_ON_ONE_CHAIN, chgID=v3["ChgID"])  # the base is the newer one
    refused(v3, 400, wire.NOT_ON_ONE_CHAIN, chgID="no such")
    refused(v3, 404, wire.SNAPSHOT_MISSING, snapUuid="no-such-snapshot")

    # A deleted base is no longer on the chain.
    api.wait(api.ok("DELETE", s2["uri"])["taskUri"])
    refused(v3, 400, wire.NOT_ON_ONE_CHAIN, chgID=v2["ChgID"])
    assert marked_blocks(api.getcbt(v3, chgID=v1["ChgID"]).json(), 0) == {5, 9, 50}

    # Disabling CBT voids every ChgID; the next CBT snapshot has a new epoch.
    assert api.ok("DELETE", f"{vm['uri']}/action/CBTbackup") == {}
    assert api.ok("GET", f"{vm['uri']}/action/CBTbackup")["CBTflag"] is False
    refused(v3, 400, wire.NOT_ON_ONE_CHAIN, chgID=v1["ChgID"])
    v4 = api.snapshot(vm["uri"], "s4")["volsnapshots"][0]
    assert v4["volCBTCreateTime"] != v3["volCBTCreateTime"]
    refused(v4, 400, wire.NOT_ON_ONE_CHAIN, chgID=v3["ChgID"])
    assert marked_blocks(api.getcbt(v4).json(), 0) == {0, 5, 9, 20, 21, 50, 100}
    sim.write(uuid, 0, 70 * BLOCK, b"h")
    v5 = api.snapshot(vm["uri"], "s5")["volsnapshots"][0]
    assert marked_blocks(api.getcbt(v5, chgID=v4["ChgID"]).json(), 0) == {70}
    sim.reset_cbt(uuid)  # the Python way does the same
    v6 = api.snapshot(vm["uri"], "s6")["volsnapshots"][0]
    refused(v6, 400, wire.NOT_ON_ONE_CHAIN, chgID=v5["ChgID"])


# -- backup resources ----------------------------------------------------------------------------


def test_backup_resource_lifecycle(sim: FusionComputeSimulator, api: Api) -> None:
    uuid = sim.add_vm("web", [MiB])
    snapshot = api.snapshot(api.vm(uuid)["uri"], "s1")
    for bad in ({"delay": 59}, {"delay": 7201}, {"transMode": "nfs"}, {"taskType": "Full"}):
        answer = api.resource(snapshot, **bad)
        assert (answer.status_code, answer.json()["errorCode"]) == (400, "10000001"), bad
    assert api.resource(snapshot, snapUrn2="urn:none").json()["errorCode"] == "10300109"

    lan = api.ready_resource(snapshot)
    assert lan["hostIP"] == "127.0.0.1" and lan["caCert"] == "" and lan["delay"] == 60
    host = sim.state()["vms"][0]["host"]
    plain, tls = sim.state()["hosts"][host]["ports"]
    assert lan["hostPort"] == plain and len(lan["token"]) <= 127 and lan["targetFile"]
    ssl_resource = api.ready_resource(snapshot, "lanssl")
    assert ssl_resource["hostPort"] == tls
    assert ssl_resource["caCert"] == sim.ca_file.read_text()

    # Keep-alive moves the expiry; a short one lets it expire (and the resource is gone).
    (before,) = [r for r in sim.backup_resources() if r["urn"] == lan["urn"]]
    assert api.ok("PUT", lan["uri"], json={"delay": 600}) == {}
    (after,) = [r for r in sim.backup_resources() if r["urn"] == lan["urn"]]
    assert after["expires"] > before["expires"] + 500
    api.fails("PUT", lan["uri"], 400, "10000001", json={"delay": "soon"})
    connection = connect(lan)
    assert connection.open(lan)[0] == wire.OK
    api.ok("PUT", lan["uri"], json={"delay": 0.2})
    deadline = time.monotonic() + 10
    while api.call("GET", lan["uri"]).status_code == 200:
        assert time.monotonic() < deadline
        time.sleep(0.02)
    api.fails("GET", lan["uri"], 404, wire.NO_SUCH_OBJECT)
    with pytest.raises(OSError):  # its socket was closed when it expired
        connection.read(1, 0, 512)
    connection.close()

    assert api.ok("DELETE", ssl_resource["uri"]) == {}
    api.fails("GET", ssl_resource["uri"], 404, wire.NO_SUCH_OBJECT)
    api.fails("DELETE", ssl_resource["uri"], 404, wire.NO_SUCH_OBJECT)
    statuses = {r["urn"]: r["status"] for r in sim.backup_resources(live_only=False)}
    assert statuses == {lan["urn"]: "expired", ssl_resource["urn"]: "released"}

    # At most 8 live in the whole system.
    made = [api.resource(snapshot).json()["uri"] for _ in range(8)]
    answer = api.resource(snapshot)
    assert (answer.status_code, answer.json()["errorCode"]) == (400, wire.BACKUP_TASKS_FULL)
    api.ok("DELETE", made[0])
    assert api.resource(snapshot).status_code == 200
    assert len(sim.backup_resources()) == 8 and len(sim.backup_resources(False)) == 11


# -- backup sockets ------------------------------------------------------------------------------


@pytest.mark.parametrize("mode", ["lan", "lanssl"])
def test_socket_reads_the_frozen_snapshot(sim: FusionComputeSimulator, api: Api, mode: str) -> None:
    size = 5 * MiB + 1000
    uuid = sim.add_vm("web", [size, MiB])
    payload = os.urandom(300_000)
    sim.write(uuid, 0, 12345, payload)
    sim.write(uuid, 0, size - 7000, payload[:7000])
    sim.write(uuid, 1, 0, b"second disk")
    snapshot = api.snapshot(api.vm(uuid)["uri"], "s1")
    sim.write(uuid, 0, 12345, b"later")  # not in the snapshot
    resource = api.ready_resource(snapshot, mode)
    frozen = sim.snapshot_content(uuid, "s1", 0)
    assert frozen[12345 : 12345 + len(payload)] == payload

    connection = connect(resource)
    result, handle = connection.open(resource)
    assert result == wire.OK and handle
    data = bytearray()
    while len(data) < size:
        result, chunk = connection.read(handle, len(data), wire.ASSUMED_MAX_READ)
        assert result == wire.OK and chunk
        data += chunk
    assert bytes(data) == frozen
    assert connection.read(handle, size - 10, 4096) == (wire.OK, frozen[-10:])  # short at the end
    assert connection.read(handle, size, 512)[0] == 9
    assert connection.read(handle, 0, 0)[0] == 7
    assert connection.read(handle, 0, wire.ASSUMED_MAX_READ + 1)[0] == 7
    assert connection.read(handle + 1000, 0, 512)[0] == 5
    assert connection.request(99, b"")[:2] == b"\x00\x01"  # unknown operation
    assert connection.close_handle(handle) == wire.OK
    assert connection.read(handle, 0, 512)[0] == 5
    assert connection.close_handle(handle) == 5
    connection.close()
    assert sim.bytes_served == size + 10
    assert sim.blocks_read(uuid, 0) == set(range(-(-size // BLOCK)))


def test_socket_open_refusals(sim: FusionComputeSimulator, api: Api) -> None:
    uuid = sim.add_vm("web", [MiB])
    snapshot = api.snapshot(api.vm(uuid)["uri"], "s1")
    resource = api.ready_resource(snapshot)
    connection = connect(resource)
    assert connection.open(resource, token="x" * 64)[0] == wire.BAD_TOKEN
    assert connection.open({**resource, "targetFile": "/no/such"})[0] == wire.NO_FILE
    assert connection.open(resource, flags=1)[0] == 4
    api.ok("DELETE", resource["uri"])
    assert connection.open(resource)[0] == wire.BAD_TOKEN
    # A frame that is not the protocol ends the connection.
    connection.sock.sendall(b"\x12\x34" + bytes(wire.HEADER.size - 2))
    assert connection.sock.recv(1) == b""
    connection.close()


def test_drop_socket_after(sim: FusionComputeSimulator, api: Api) -> None:
    uuid = sim.add_vm("web", [MiB])
    sim.write(uuid, 0, 0, os.urandom(MiB))
    resource = api.ready_resource(api.snapshot(api.vm(uuid)["uri"], "s1"))
    sim.drop_socket_after(100_000)
    dropped = connect(resource)
    _, handle = dropped.open(resource)
    assert dropped.read(handle, 0, 65536)[0] == wire.OK
    with pytest.raises(wire.WireError):
        dropped.read(handle, 65536, 65536)
    dropped.close()
    assert sim.bytes_served == 100_000
    whole = connect(resource)  # the rule was for one connection
    _, handle = whole.open(resource)
    assert whole.read(handle, 0, MiB) == (wire.OK, sim.snapshot_content(uuid, "s1", 0))
    whole.close()


def test_expired_backup_resources_close_their_sockets(
    sim: FusionComputeSimulator, api: Api
) -> None:
    uuid = sim.add_vm("web", [MiB])
    resource = api.ready_resource(api.snapshot(api.vm(uuid)["uri"], "s1"), "lanssl")
    connection = connect(resource)
    _, handle = connection.open(resource)
    assert connection.read(handle, 0, 4096)[0] == wire.OK
    sim.expire_backup_resources()
    with pytest.raises(OSError):
        connection.read(handle, 0, 4096)
    connection.close()
    again = connect(resource)
    assert again.open(resource)[0] == wire.BAD_TOKEN
    again.close()
    api.fails("GET", resource["uri"], 404, wire.NO_SUCH_OBJECT)
    assert sim.backup_resources() == []
    assert sim.backup_resources(live_only=False)[0]["status"] == "expired"


def test_connections_per_host_are_limited(sim: FusionComputeSimulator, api: Api) -> None:
    uuid = sim.add_vm("web", [MiB])
    snapshot = api.snapshot(api.vm(uuid)["uri"], "s1")
    lan, lanssl = api.ready_resource(snapshot), api.ready_resource(snapshot, "lanssl")
    host = sim.state()["vms"][0]["host"]
    pairs = [(resource, connect(resource)) for resource in [lan, lanssl] * 4]
    for resource, connection in pairs:  # each one is served: it counts
        assert connection.open(resource)[0] == wire.OK
    ninth = connect(lan)
    assert ninth.sock.recv(1) == b""  # accepted, then closed at once
    ninth.close()
    assert sim.refused_connections == 1
    assert sim.max_open_connections(host) == 8 and sim.max_open_connections() == 8
    assert sim.open_connections(host) == 8
    for _, connection in pairs:
        connection.close()
    other = sim.add_vm("db", [MiB], host=sim.add_host("cna02"))
    resource = api.ready_resource(api.snapshot(api.vm(other)["uri"], "s1"))
    assert resource["hostPort"] != lan["hostPort"]
    connection = connect(resource)
    assert connection.open(resource)[0] == wire.OK
    assert connection.open(lan)[0] == wire.NO_FILE  # that snapshot is on the other host
    connection.close()


# -- faults and the admin surface ----------------------------------------------------------------


def test_fail_next(sim: FusionComputeSimulator, api: Api) -> None:
    sim.add_vm("web", [MiB])
    site = api.site()
    sim.fail_next("GET", r"/vms$", "10000006", 503)
    api.fails("GET", f"{site}/vms", 503, "10000006")
    api.ok("GET", f"{site}/vms")
    sim.fail_next(None, r"^/service/session$", "10000005", count=2)
    assert api.login().status_code == 500 and api.login().status_code == 500
    assert api.login().status_code == 200
    sim.fail_next("POST", "/snapshots", "10000007", 500)
    sim.clear_faults()
    api.ok("GET", f"{site}/vms")
    failed = [(c.method, c.status, c.code) for c in sim.calls if c.code]
    assert failed == [
        ("GET", 503, "10000006"),
        ("POST", 500, "10000005"),
        ("POST", 500, "10000005"),
    ]


def test_admin_endpoints(sim: FusionComputeSimulator, api: Api) -> None:
    base = f"{sim.base_url}/_sim"
    http = api.http
    made = http.post(f"{base}/vms", json={"name": "demo", "disk_sizes": [MiB, 2 * MiB]})
    uuid = made.json()["uuid"]
    assert api.vm(uuid)["name"] == "demo"
    written = http.post(f"{base}/write", json={"vm": "demo", "index": 1, "offset": 10,
                                               "data_hex": b"hello".hex()})  # fmt: skip
    assert written.status_code == 200
    assert sim.content(uuid, 1)[10:15] == b"hello" and len(sim.content(uuid, 1)) == 2 * MiB
    bad = http.post(f"{base}/write", json={"vm": "demo", "index": 5, "offset": 0, "data_hex": ""})
    assert bad.status_code == 400 and bad.json()["errorCode"] == "10000001"
    api.snapshot(api.vm(uuid)["uri"], "s1")
    state = http.get(f"{base}/state").json()
    (vm,) = state["vms"]
    assert vm["uuid"] == uuid and [s["name"] for s in vm["snapshots"]] == ["s1"]
    assert state["backup_resources"] == [] and state["refused_connections"] == 0
    assert not any(c.path.startswith("/_sim") for c in sim.calls)


def test_main_serves_until_sigterm(tmp_path: Path) -> None:
    state_file = tmp_path / "state.json"
    process = subprocess.Popen(
        [sys.executable, "-m", "hamal_workers.simulators.fusion_compute",
         "--directory", str(tmp_path / "fc"), "--state-file", str(state_file)],
        stdout=subprocess.PIPE, text=True,
    )  # fmt: skip
    try:
        assert process.stdout is not None
        printed = json.loads(process.stdout.readline())
        state = json.loads(state_file.read_text())
        assert state == printed and state["user"] == "hamal" and state["password"] == "secret"
        http = requests.Session()
        http.trust_env = False
        http.verify = state["ca_file"]
        assert http.get(f"{state['url']}/service/versions").status_code == 200
        made = http.post(f"{state['url']}/_sim/vms", json={"name": "x", "disk_sizes": [MiB]})
        assert made.json()["uuid"]
        assert http.get(f"{state['url']}/_sim/state").json()["vms"][0]["name"] == "x"
        process.send_signal(signal.SIGTERM)
        assert process.wait(20) == 0
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()
