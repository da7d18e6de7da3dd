"""The OpenStack simulator, spoken to by openstacksdk over real HTTP, over a real Ceph cluster.

One cluster for the module (it takes ~10 s to come up); a simulator per test. What openstacksdk
sees is checked through its own calls (conn.compute, conn.block_storage), the wire shapes
through raw requests, and what Ceph holds through the rbd binding. Skipped, with the reason,
only when the Ceph tools are not installed (scripts/setup-ceph.sh installs them).
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import keystoneauth1.exceptions
import openstack
import openstack.connection
import openstack.exceptions
import pytest
import requests

from hamal_workers.simulators.openstack import Call, Nic, OpenStackSimulator, SimulatorError
from hamal_workers.testbeds import ceph
from hamal_workers.testbeds.certs import make_certificate

MiB = 1 << 20
PASSWORD = "s3cret"


@pytest.fixture(scope="module")
def cluster(ceph: ceph.CephCluster) -> ceph.CephCluster:
    """The session's Ceph (tests/integration/conftest.py)."""
    return ceph


@pytest.fixture(scope="module")
def rados_cluster(cluster: ceph.CephCluster) -> Iterator[Any]:
    import rados

    client = rados.Rados(
        conffile=str(cluster.conf), rados_id="admin", conf={"keyring": str(cluster.keyring)}
    )
    client.connect(timeout=10)
    yield client
    client.shutdown()


class Pool:
    """The rbd binding on one pool, to check what the simulator did to Ceph."""

    def __init__(self, rados_cluster: Any, name: str) -> None:
        self.ioctx = rados_cluster.open_ioctx(name)

    def images(self) -> list[str]:
        import rbd

        return list(rbd.RBD().list(self.ioctx))

    def image(self, name: str, snapshot: str | None = None) -> Any:
        import rbd

        return rbd.Image(self.ioctx, name, snapshot=snapshot, read_only=True)

    def create(self, name: str, size: int, snapshot: str | None = None) -> None:
        import rbd

        rbd.RBD().create(self.ioctx, name, size, old_format=False, features=1)  # layering
        if snapshot:
            with rbd.Image(self.ioctx, name) as image:
                image.create_snap(snapshot)


@pytest.fixture(scope="module")
def volumes_pool(rados_cluster: Any) -> Iterator[Pool]:
    pool = Pool(rados_cluster, "volumes")
    yield pool
    pool.ioctx.close()


@pytest.fixture(scope="module")
def vms_pool(rados_cluster: Any) -> Iterator[Pool]:
    pool = Pool(rados_cluster, "vms")
    yield pool
    pool.ioctx.close()


@pytest.fixture
def sim(cluster: ceph.CephCluster) -> Iterator[OpenStackSimulator]:
    with OpenStackSimulator(str(cluster.conf), str(cluster.keyring), password=PASSWORD) as s:
        yield s


def connect(sim: OpenStackSimulator, **overrides: Any) -> openstack.connection.Connection:
    kwargs: dict[str, Any] = {**sim.connect_kwargs(), "verify": False, "api_timeout": 10}
    kwargs.update(overrides)
    return openstack.connect(**kwargs)


@pytest.fixture
def conn(sim: OpenStackSimulator) -> Iterator[openstack.connection.Connection]:
    c = connect(sim)
    yield c
    c.close()


@pytest.fixture
def http() -> Iterator[requests.Session]:
    """Raw HTTP to the simulator, with no proxy or CA settings taken from the environment."""
    session = requests.Session()
    session.trust_env = False
    yield session
    session.close()


def token_of(http: requests.Session, sim: OpenStackSimulator) -> str:
    body = {
        "auth": {
            "identity": {
                "methods": ["password"],
                "password": {
                    "user": {"name": "demo", "domain": {"name": "Default"}, "password": PASSWORD}
                },
            },
            "scope": {"project": {"name": "demo", "domain": {"name": "Default"}}},
        }
    }
    answer = http.post(f"{sim.auth_url}/auth/tokens", json=body, timeout=10)
    assert answer.status_code == 201, answer.text
    return answer.headers["X-Subject-Token"]


# -- Keystone ------------------------------------------------------------------------------------


def test_password_auth_gives_a_token_and_a_catalog_of_nova_and_cinder(
    sim: OpenStackSimulator, conn: openstack.connection.Connection, http: requests.Session
) -> None:
    token = conn.authorize()
    assert token.startswith("gAAAAAB")
    access = conn.session.auth.get_access(conn.session)
    assert access.project_name == "demo" and access.project_id == sim.project_id
    assert sorted(access.role_names) == ["admin", "member", "reader"]
    by_type = {s["type"]: s for s in access.service_catalog.catalog}
    assert {"compute", "volumev3", "block-storage", "identity"} <= set(by_type)
    assert by_type["compute"]["name"] == "nova"
    for kind, url in (
        ("compute", f"{sim.base_url}/compute/v2.1"),
        ("volumev3", f"{sim.base_url}/volume/v3/{sim.project_id}"),
        ("block-storage", f"{sim.base_url}/volume/v3/{sim.project_id}"),
    ):
        endpoints = by_type[kind]["endpoints"]
        assert sorted(e["interface"] for e in endpoints) == ["admin", "internal", "public"]
        assert {(e["url"], e["region_id"]) for e in endpoints} == {(url, "RegionOne")}

    # Validation, as keystonemiddleware does it.
    checked = http.get(
        f"{sim.auth_url}/auth/tokens",
        timeout=10,
        headers={"X-Auth-Token": token, "X-Subject-Token": token},
    )
    assert checked.status_code == 200
    assert checked.json()["token"]["project"]["id"] == sim.project_id
    unknown = http.get(
        f"{sim.auth_url}/auth/tokens",
        timeout=10,
        headers={"X-Auth-Token": token, "X-Subject-Token": "gAAAAABnope"},
    )
    assert unknown.status_code == 404
    assert unknown.json()["error"]["title"] == "Not Found"


def test_version_discovery_documents(sim: OpenStackSimulator, http: requests.Session) -> None:
    root = http.get(f"{sim.base_url}/identity", timeout=10)
    assert root.status_code == 300
    (v3,) = root.json()["versions"]["values"]
    assert v3["id"] == "v3.14" and v3["status"] == "stable"
    assert v3["links"] == [{"rel": "self", "href": f"{sim.base_url}/identity/v3/"}]
    assert http.get(sim.auth_url, timeout=10).json()["version"]["id"] == "v3.14"

    nova = {v["id"]: v for v in http.get(f"{sim.base_url}/compute/", timeout=10).json()["versions"]}
    assert nova["v2.1"]["status"] == "CURRENT"
    assert (nova["v2.1"]["min_version"], nova["v2.1"]["version"]) == ("2.1", "2.100")
    one = http.get(f"{sim.base_url}/compute/v2.1/", timeout=10).json()["version"]
    assert one["links"][0] == {"rel": "self", "href": f"{sim.base_url}/compute/v2.1/"}

    cinder = http.get(f"{sim.base_url}/volume/", timeout=10)
    assert cinder.status_code == 300
    (v3,) = cinder.json()["versions"]
    assert (v3["id"], v3["min_version"], v3["version"]) == ("v3.0", "3.0", "3.71")
    assert http.get(f"{sim.base_url}/volume/v3/", timeout=10).status_code == 200


def test_a_wrong_password_is_refused_with_401(
    sim: OpenStackSimulator, http: requests.Session
) -> None:
    wrong = connect(sim, password="not-the-password")
    # A service call raises keystoneauth's Unauthorized, as against a real Keystone...
    with pytest.raises(keystoneauth1.exceptions.http.Unauthorized) as raised:
        list(wrong.compute.servers())
    assert raised.value.http_status == 401
    assert "requires authentication" in str(raised.value)
    # ...and Connection.authorize() wraps it in openstacksdk's SDKException.
    with pytest.raises(openstack.exceptions.SDKException, match="HTTP 401"):
        wrong.authorize()
    answer = http.post(
        f"{sim.auth_url}/auth/tokens",
        timeout=10,
        json={
            "auth": {
                "identity": {
                    "methods": ["password"],
                    "password": {
                        "user": {"name": "demo", "domain": {"name": "Default"}, "password": "x"}
                    },
                }
            }
        },
    )
    assert answer.status_code == 401
    assert answer.json() == {
        "error": {
            "code": 401,
            "title": "Unauthorized",
            "message": "The request you have made requires authentication.",
        }
    }

    # The password changes: the old one is refused, the new one accepted.
    assert list(connect(sim).compute.servers()) == []
    sim.set_password("rotated")
    with pytest.raises(keystoneauth1.exceptions.http.Unauthorized):
        list(connect(sim, password=PASSWORD).compute.servers())
    assert list(connect(sim, password="rotated").compute.servers()) == []


def test_revoked_and_expired_tokens_get_401_and_openstacksdk_authenticates_again(
    cluster: ceph.CephCluster,
) -> None:
    offset = [0.0]

    def clock() -> float:
        return time.time() + offset[0]

    with OpenStackSimulator(
        str(cluster.conf), str(cluster.keyring), password=PASSWORD, token_ttl=600, clock=clock
    ) as sim:
        conn = connect(sim)
        assert list(conn.compute.servers()) == []
        sim.revoke_tokens()
        sim.clear_calls()
        assert list(conn.compute.servers()) == []
        assert [(c.method, c.path, c.status) for c in sim.calls] == [
            ("GET", "/compute/v2.1/servers/detail", 401),
            ("POST", "/identity/v3/auth/tokens", 201),
            ("GET", "/compute/v2.1/servers/detail", 200),
        ]
        # Keystone's clock passes the token's expiry; the client does not know it yet.
        offset[0] = 601.0
        sim.clear_calls()
        assert list(conn.block_storage.volumes()) == []
        statuses = [c.status for c in sim.calls if c.path.endswith("/volumes/detail")]
        assert statuses == [401, 200]


# -- Nova ----------------------------------------------------------------------------------------


def test_a_server_booted_from_a_volume(
    sim: OpenStackSimulator, conn: openstack.connection.Connection
) -> None:
    root = sim.create_volume("root", 64 * MiB)
    data = sim.create_volume("data", 32 * MiB)
    server_id = sim.create_server("db-1", volumes=[root, data])

    (listed,) = list(conn.compute.servers())
    assert (listed.id, listed.name, listed.status) == (server_id, "db-1", "ACTIVE")
    server = conn.compute.get_server(server_id)
    assert server.root_device_name == "/dev/vda"
    assert [v["id"] for v in server.attached_volumes] == [root, data]
    raw = conn.compute.get(f"/servers/{server_id}", microversion="2.89").json()["server"]
    assert raw["image"] == ""
    assert raw["os-extended-volumes:volumes_attached"] == [
        {"id": root, "delete_on_termination": False},
        {"id": data, "delete_on_termination": False},
    ]
    assert raw["OS-EXT-SRV-ATTR:root_device_name"] == "/dev/vda"
    assert raw["flavor"]["original_name"]  # embedded flavor from 2.47 on

    attachments = list(conn.compute.volume_attachments(server))
    assert [(a.volume_id, a.device) for a in attachments] == [
        (root, "/dev/vda"),
        (data, "/dev/vdb"),
    ]
    volumes = {v.id: v for v in conn.block_storage.volumes()}
    for a in attachments:
        (cinder_side,) = volumes[a.volume_id].attachments
        assert cinder_side["attachment_id"] == a.attachment_id
        assert cinder_side["server_id"] == server_id and cinder_side["device"] == a.device
        assert a.bdm_id and a.delete_on_termination is False
    assert volumes[root].is_bootable is True and volumes[data].is_bootable is False
    assert {v.status for v in volumes.values()} == {"in-use"}
    one = conn.compute.get_volume_attachment(server, data)
    assert one.device == "/dev/vdb"


def test_a_server_booted_from_an_image_has_an_ephemeral_rbd_root_disk(
    sim: OpenStackSimulator, conn: openstack.connection.Connection, vms_pool: Pool
) -> None:
    data = sim.create_volume("data", 16 * MiB)
    server_id = sim.create_server("web-1", boot_image_size=96 * MiB, volumes=[data])
    with vms_pool.image(f"{server_id}_disk") as disk:
        assert disk.size() == 96 * MiB
    raw = conn.compute.get(f"/servers/{server_id}", microversion="2.89").json()["server"]
    assert raw["image"]["id"] == sim.glance_image_id
    assert raw["OS-EXT-SRV-ATTR:root_device_name"] == "/dev/vda"
    (attachment,) = conn.compute.volume_attachments(server_id)
    assert (attachment.volume_id, attachment.device) == (data, "/dev/vdb")
    # A volume attached later takes the first free device; a detached one frees its device.
    late = sim.create_volume("late", 16 * MiB)
    sim.attach_volume(server_id, late)
    sim.detach_volume(server_id, data)
    again = sim.create_volume("again", 16 * MiB)
    sim.attach_volume(server_id, again)
    devices = {a.volume_id: a.device for a in conn.compute.volume_attachments(server_id)}
    assert devices == {late: "/dev/vdc", again: "/dev/vdb"}
    assert conn.block_storage.get_volume(data).status == "available"


def test_a_servers_flavor_addresses_and_interfaces_come_from_its_ports(
    sim: OpenStackSimulator, conn: openstack.connection.Connection, http: requests.Session
) -> None:
    server_id = sim.create_server(
        "net-1", boot_image_size=4 * MiB, vcpus=4, ram_mib=8192,
        nics=[
            Nic("private", fixed_ips=("10.0.0.5", "fd00::5"), floating_ips=("203.0.113.7",)),
            Nic("storage", mac="FA:16:3E:00:00:01"),  # a port without an IP
            Nic("private", fixed_ips=("10.0.0.6",)),
        ],
    )  # fmt: skip
    server = conn.compute.get_server(server_id)
    assert (server.flavor.vcpus, server.flavor.ram) == (4, 8192)  # embedded from 2.47 on
    ports = list(conn.compute.server_interfaces(server_id))
    first, second, third = ports
    assert second.mac_addr == "fa:16:3e:00:00:01" and second.fixed_ips == []
    assert first.mac_addr.startswith("fa:16:3e:") and first.mac_addr != third.mac_addr
    assert first.net_id == third.net_id != second.net_id
    assert [ip["ip_address"] for ip in first.fixed_ips] == ["10.0.0.5", "fd00::5"]
    assert first.fixed_ips[0]["subnet_id"] == third.fixed_ips[0]["subnet_id"]
    assert first.fixed_ips[0]["subnet_id"] != first.fixed_ips[1]["subnet_id"]  # v4, v6
    assert {p.port_state for p in ports} == {"ACTIVE"}
    assert conn.compute.get_server_interface(third.port_id, server_id).mac_addr == third.mac_addr
    # Nova's shapes: per network name, its ports' fixed IPs then floating ones, each with its
    # port's MAC; a port without an IP shows its network, and no MAC.
    raw = conn.compute.get(f"/servers/{server_id}", microversion="2.1").json()["server"]
    assert raw["flavor"] == {"id": "2", "links": raw["flavor"]["links"]}  # before 2.47
    assert raw["addresses"] == {
        "private": [
            {"OS-EXT-IPS-MAC:mac_addr": first.mac_addr, "version": 4, "addr": "10.0.0.5",
             "OS-EXT-IPS:type": "fixed"},
            {"OS-EXT-IPS-MAC:mac_addr": first.mac_addr, "version": 6, "addr": "fd00::5",
             "OS-EXT-IPS:type": "fixed"},
            {"OS-EXT-IPS-MAC:mac_addr": third.mac_addr, "version": 4, "addr": "10.0.0.6",
             "OS-EXT-IPS:type": "fixed"},
            {"OS-EXT-IPS-MAC:mac_addr": first.mac_addr, "version": 4, "addr": "203.0.113.7",
             "OS-EXT-IPS:type": "floating"},
        ],
        "storage": [],
    }  # fmt: skip
    token = token_of(http, sim)
    url = f"{sim.compute_url}/servers/{server_id}/os-interface"
    plain = http.get(url, headers={"X-Auth-Token": token}, timeout=10).json()
    assert set(plain["interfaceAttachments"][0]) == {
        "fixed_ips", "mac_addr", "net_id", "port_id", "port_state"
    }  # fmt: skip
    tagged = http.get(
        url, timeout=10, headers={"X-Auth-Token": token, "OpenStack-API-Version": "compute 2.70"}
    ).json()
    assert tagged["interfaceAttachments"][0]["tag"] is None
    missing = http.get(f"{url}/{first.net_id}", headers={"X-Auth-Token": token}, timeout=10)
    assert missing.status_code == 404 and "itemNotFound" in missing.json()
    # A MAC is the cloud's once; a bad address is refused before anything is made.
    with pytest.raises(SimulatorError, match="in use"):
        sim.create_server("dup", boot_image_size=4 * MiB, nics=[Nic("x", mac=second.mac_addr)])
    with pytest.raises(SimulatorError, match="not an IP address"):
        sim.create_server("bad", boot_image_size=4 * MiB, nics=[Nic("x", fixed_ips=("10.0.0",))])
    assert [s["name"] for s in sim.state()["servers"]] == ["net-1"]
    sim.delete_server(server_id)
    sim.create_server("reuse", boot_image_size=4 * MiB, nics=[Nic("x", mac=second.mac_addr)])


def test_a_deleted_server_is_404_and_its_ephemeral_disk_goes_unless_it_has_snapshots(
    sim: OpenStackSimulator, conn: openstack.connection.Connection, vms_pool: Pool
) -> None:
    data = sim.create_volume("data", 16 * MiB)
    plain = sim.create_server("plain", boot_image_size=16 * MiB, volumes=[data])
    kept = sim.create_server("snapshotted", boot_image_size=16 * MiB)
    import rbd

    with rbd.Image(vms_pool.ioctx, f"{kept}_disk") as disk:
        disk.create_snap("backup-1")

    assert sim.delete_server(plain) is None
    with pytest.raises(openstack.exceptions.NotFoundException) as raised:
        conn.compute.get_server(plain)
    assert raised.value.status_code == 404
    assert f"Instance {plain} could not be found" in str(raised.value)
    assert f"{plain}_disk" not in vms_pool.images()
    assert conn.block_storage.get_volume(data).status == "available"
    assert conn.block_storage.get_volume(data).attachments == []
    with pytest.raises(openstack.exceptions.NotFoundException):
        list(conn.compute.volume_attachments(plain))

    assert sim.delete_server(kept) == f"{kept}_disk"
    with pytest.raises(openstack.exceptions.NotFoundException):
        conn.compute.get_server(kept)
    assert f"{kept}_disk" in vms_pool.images()
    with pytest.raises(SimulatorError):
        sim.delete_server(kept)


def test_servers_are_filtered_by_name_and_paged(
    sim: OpenStackSimulator, conn: openstack.connection.Connection
) -> None:
    ids = {
        name: sim.create_server(name, boot_image_size=4 * MiB)
        for name in ("web-1", "web-2", "db-1")
    }
    assert {s.name for s in conn.compute.servers(name="^web-")} == {"web-1", "web-2"}
    assert {s.id for s in conn.compute.servers(all_projects=True)} == set(ids.values())
    assert conn.compute.find_server("db-1").id == ids["db-1"]
    # openstacksdk pages with limit and marker.
    assert {s.id for s in conn.compute.servers(limit=1, paginated=True)} == set(ids.values())
    assert {s.id for s in conn.compute.servers(details=False)} == set(ids.values())


# -- Cinder --------------------------------------------------------------------------------------


def test_a_ceph_volume_is_an_rbd_image_of_its_size(
    sim: OpenStackSimulator, conn: openstack.connection.Connection, volumes_pool: Pool
) -> None:
    import rbd

    volume_id = sim.create_volume("data", 48 * MiB)
    with volumes_pool.image(f"volume-{volume_id}") as image:
        assert image.size() == 48 * MiB
        wanted = (
            rbd.RBD_FEATURE_LAYERING
            | rbd.RBD_FEATURE_EXCLUSIVE_LOCK
            | rbd.RBD_FEATURE_OBJECT_MAP
            | rbd.RBD_FEATURE_FAST_DIFF
            | rbd.RBD_FEATURE_DEEP_FLATTEN
        )
        assert image.features() & wanted == wanted
    volume = conn.block_storage.get_volume(volume_id)
    assert (volume.name, volume.size, volume.status) == ("data", 1, "available")
    assert (volume.volume_type, volume.host) == ("ceph", "host@ceph#ceph")
    assert volume.is_bootable is False and volume.attachments == []
    raw = conn.block_storage.get(f"/volumes/{volume_id}", microversion="3.71").json()["volume"]
    assert raw["bootable"] == "false" and raw["os-vol-host-attr:host"] == "host@ceph#ceph"
    assert sim.volume_image(volume_id) == f"volumes/volume-{volume_id}"
    assert [v.id for v in conn.block_storage.volumes(name="data")] == [volume_id]

    sim.delete_volume(volume_id)
    assert f"volume-{volume_id}" not in volumes_pool.images()
    with pytest.raises(openstack.exceptions.NotFoundException, match="could not be found"):
        conn.block_storage.get_volume(volume_id)


def test_a_volume_on_another_backend_has_no_image(
    sim: OpenStackSimulator, conn: openstack.connection.Connection, volumes_pool: Pool
) -> None:
    before = set(volumes_pool.images())
    volume_id = sim.create_volume("scratch", 2 << 30, ceph=False)
    assert set(volumes_pool.images()) == before
    assert sim.volume_image(volume_id) is None
    volume = conn.block_storage.get_volume(volume_id)
    assert (volume.size, volume.volume_type, volume.host) == (2, "lvm", "host@lvm#lvm")


def test_a_named_image_and_a_clone_of_a_snapshot(
    sim: OpenStackSimulator, volumes_pool: Pool
) -> None:
    named = sim.create_volume("legacy", 8 * MiB, image_name="legacy-image-01")
    assert sim.volume_image(named) == "volumes/legacy-image-01"
    with volumes_pool.image("legacy-image-01") as image:
        assert image.size() == 8 * MiB

    volumes_pool.create("golden", 32 * MiB, snapshot="base")
    clone = sim.create_volume("from-golden", 64 * MiB, clone_of=("volumes", "golden", "base"))
    with volumes_pool.image(f"volume-{clone}") as image:
        assert image.parent_info()[:3] == ("volumes", "golden", "base")
        assert image.size() == 64 * MiB
    with volumes_pool.image("golden") as parent:
        assert parent.is_protected_snap("base")
    with pytest.raises(SimulatorError, match="cannot be smaller"):
        sim.create_volume("too-small", 16 * MiB, clone_of=("volumes", "golden", "base"))
    with pytest.raises(SimulatorError):
        sim.create_volume("lvm-clone", 64 * MiB, ceph=False, clone_of=("volumes", "golden", "base"))


def test_deleting_a_volume_in_use_or_with_snapshots_is_refused(
    sim: OpenStackSimulator, conn: openstack.connection.Connection, volumes_pool: Pool
) -> None:
    import rbd

    used = sim.create_volume("used", 8 * MiB)
    sim.create_server("s", boot_image_size=8 * MiB, volumes=[used])
    with pytest.raises(SimulatorError, match="in-use"):
        sim.delete_volume(used)
    snapped = sim.create_volume("snapped", 8 * MiB)
    with rbd.Image(volumes_pool.ioctx, f"volume-{snapped}") as image:
        image.create_snap("s1")
    with pytest.raises(SimulatorError, match="busy"):
        sim.delete_volume(snapped)
    assert conn.block_storage.get_volume(snapped).status == "available"


def test_an_attachment_gives_the_connection_info_of_its_backend(
    sim: OpenStackSimulator, conn: openstack.connection.Connection, cluster: ceph.CephCluster
) -> None:
    on_ceph = sim.create_volume("ceph-data", 8 * MiB)
    on_lvm = sim.create_volume("lvm-data", 8 * MiB, ceph=False)
    server_id = sim.create_server("app", boot_image_size=8 * MiB, volumes=[on_ceph, on_lvm])
    by_volume = {a.volume_id: a for a in conn.compute.volume_attachments(server_id)}

    rbd_info = conn.block_storage.get_attachment(by_volume[on_ceph].attachment_id)
    assert rbd_info.volume_id == on_ceph and rbd_info.status == "attached"
    assert rbd_info.connection_info["driver_volume_type"] == "rbd"
    data = rbd_info.connection_info["data"]
    assert data["name"] == f"volumes/volume-{on_ceph}"
    assert (data["hosts"], data["ports"]) == (["127.0.0.1"], [str(cluster.port)])
    assert (data["auth_enabled"], data["auth_username"]) == (True, "admin")
    assert (data["secret_type"], data["cluster_name"], data["volume_id"]) == (
        "ceph",
        "ceph",
        on_ceph,
    )

    iscsi = conn.block_storage.get_attachment(by_volume[on_lvm].attachment_id)
    assert iscsi.connection_info["driver_volume_type"] == "iscsi"
    assert iscsi.connection_info["data"]["volume_id"] == on_lvm

    listed = {a.id for a in conn.block_storage.attachments(instance_id=server_id)}
    assert listed == {by_volume[on_ceph].attachment_id, by_volume[on_lvm].attachment_id}
    detailed = list(conn.block_storage.attachments(details=True, volume_id=on_ceph))
    assert [a.connection_info["data"]["name"] for a in detailed] == [f"volumes/volume-{on_ceph}"]

    sim.detach_volume(server_id, on_ceph)
    with pytest.raises(openstack.exceptions.NotFoundException):
        conn.block_storage.get_attachment(by_volume[on_ceph].attachment_id)


# -- microversions -------------------------------------------------------------------------------


def test_microversions_are_answered_in_headers_and_shape_the_bodies(
    sim: OpenStackSimulator, http: requests.Session
) -> None:
    volume_id = sim.create_volume("v", 8 * MiB)
    server_id = sim.create_server("s", volumes=[volume_id])
    token = token_of(http, sim)
    url = f"{sim.compute_url}/servers/{server_id}/os-volume_attachments"

    def nova(version: str | None) -> requests.Response:
        headers = {"X-Auth-Token": token}
        if version:
            headers["OpenStack-API-Version"] = f"compute {version}"
        return http.get(url, headers=headers, timeout=10)

    plain = nova(None)
    assert plain.headers["OpenStack-API-Version"] == "compute 2.1"
    assert plain.headers["X-OpenStack-Nova-API-Version"] == "2.1"
    assert plain.json()["volumeAttachments"] == [
        {"id": volume_id, "volumeId": volume_id, "serverId": server_id, "device": "/dev/vda"}
    ]
    (v279,) = nova("2.79").json()["volumeAttachments"]
    assert (v279["id"], v279["tag"], v279["delete_on_termination"]) == (volume_id, None, False)
    answer = nova("2.89")
    assert answer.headers["OpenStack-API-Version"] == "compute 2.89"
    (v289,) = answer.json()["volumeAttachments"]
    assert "id" not in v289 and v289["attachment_id"] and v289["bdm_uuid"]
    assert nova("latest").headers["X-OpenStack-Nova-API-Version"] == "2.100"
    refused = nova("2.200")
    assert refused.status_code == 406
    assert "Minimum is 2.1 and maximum is 2.100" in refused.json()["computeFault"]["message"]
    legacy = http.get(
        url, timeout=10, headers={"X-Auth-Token": token, "X-OpenStack-Nova-API-Version": "2.70"}
    )
    assert legacy.headers["OpenStack-API-Version"] == "compute 2.70"

    attachments = f"{sim.volume_url}/attachments"
    old = http.get(attachments, headers={"X-Auth-Token": token}, timeout=10)
    assert old.status_code == 404
    assert old.headers["OpenStack-API-Version"] == "volume 3.0"
    assert "not supported on this method" in old.json()["itemNotFound"]["message"]
    new = http.get(
        attachments,
        timeout=10,
        headers={"X-Auth-Token": token, "OpenStack-API-Version": "volume 3.27"},
    )
    assert new.status_code == 200 and new.headers["OpenStack-API-Version"] == "volume 3.27"
    (one,) = new.json()["attachments"]
    assert set(one) == {"id", "status", "instance", "volume_id"}
    # The project id in Cinder's URL is optional from 3.67 on, as in Nova's.
    bare = http.get(
        f"{sim.base_url}/volume/v3/volumes",
        timeout=10,
        headers={"X-Auth-Token": token, "OpenStack-API-Version": "volume 3.67"},
    )
    assert [v["id"] for v in bare.json()["volumes"]] == [volume_id]


# -- faults --------------------------------------------------------------------------------------


def test_fail_next_answers_an_error_then_the_service_recovers(
    sim: OpenStackSimulator, conn: openstack.connection.Connection
) -> None:
    sim.create_server("s", boot_image_size=4 * MiB)
    assert len(list(conn.compute.servers())) == 1
    sim.fail_next(r"/servers/detail$", 503)
    with pytest.raises(openstack.exceptions.HttpException) as raised:
        list(conn.compute.servers())
    assert raised.value.status_code == 503
    assert "currently unavailable" in str(raised.value)
    assert len(list(conn.compute.servers())) == 1

    sim.fail_next(r"/volumes/detail$", 500, count=2)
    for _ in range(2):
        with pytest.raises(openstack.exceptions.HttpException) as raised:
            list(conn.block_storage.volumes())
        assert raised.value.status_code == 500
    assert list(conn.block_storage.volumes()) == []

    # A client that retries 503 (keystoneauth's status_code_retries) gets through.
    retrying = connect(sim, status_code_retries=2)
    sim.fail_next(r"/servers/detail$", 503)
    sim.clear_calls()
    assert len(list(retrying.compute.servers())) == 1
    statuses = [c.status for c in sim.calls if c.path.endswith("/servers/detail")]
    assert statuses == [503, 200]


def test_a_delay_longer_than_the_clients_timeout_makes_it_time_out(
    sim: OpenStackSimulator,
) -> None:
    impatient = connect(sim, api_timeout=0.5)
    assert list(impatient.compute.servers()) == []  # authenticated, endpoints discovered
    sim.delay(r"/servers/detail$", 30)
    with pytest.raises(keystoneauth1.exceptions.ConnectTimeout, match="timed out"):
        list(impatient.compute.servers())
    sim.clear_faults()
    assert list(impatient.compute.servers()) == []
    sim.delay(r"/volumes/detail$", 0.2, count=1)
    assert list(connect(sim, api_timeout=10).block_storage.volumes()) == []


def test_the_calls_are_recorded_with_their_microversions(
    sim: OpenStackSimulator, conn: openstack.connection.Connection
) -> None:
    server_id = sim.create_server("s", boot_image_size=4 * MiB)
    sim.delete_server(server_id)
    with pytest.raises(openstack.exceptions.NotFoundException):
        conn.compute.get_server(server_id)
    calls = sim.calls
    assert calls[0] == Call("GET", "/identity/v3", 200)
    assert Call("POST", "/identity/v3/auth/tokens", 201) in calls
    assert calls[-1] == Call("GET", f"/compute/v2.1/servers/{server_id}", 404, "2.100")


def test_the_admin_interface_over_http(sim: OpenStackSimulator, http: requests.Session) -> None:
    volume_id = sim.create_volume("v", 4 * MiB)
    answer = http.post(
        f"{sim.base_url}/_sim/fail_next", timeout=10, json={"path": "/volumes/", "status": 500}
    )
    assert answer.status_code == 204
    token = token_of(http, sim)
    failed = http.get(
        f"{sim.volume_url}/volumes/{volume_id}", headers={"X-Auth-Token": token}, timeout=10
    )
    assert failed.status_code == 500 and "computeFault" in failed.json()
    calls = http.get(f"{sim.base_url}/_sim/calls", timeout=10).json()["calls"]
    assert calls[-1] == {
        "method": "GET",
        "path": f"/volume/v3/{sim.project_id}/volumes/{volume_id}",
        "status": 500,
        "microversion": None,
    }
    state = http.get(f"{sim.base_url}/_sim/state", timeout=10).json()
    assert [v["image"] for v in state["volumes"]] == [f"volumes/volume-{volume_id}"]
    assert http.post(f"{sim.base_url}/_sim/fail_next", json={}, timeout=10).status_code == 400


# -- TLS -----------------------------------------------------------------------------------------


def _self_signed(directory: Path) -> tuple[Path, Path]:
    return make_certificate(directory, "openstack")


def test_tls_with_a_self_signed_certificate(cluster: ceph.CephCluster, tmp_path: Path) -> None:
    cert, key = _self_signed(tmp_path)
    with OpenStackSimulator(
        str(cluster.conf), str(cluster.keyring), password=PASSWORD, tls=(str(cert), str(key))
    ) as sim:
        assert sim.auth_url.startswith("https://127.0.0.1:")
        volume_id = sim.create_volume("v", 4 * MiB)
        trusted = connect(sim, verify=True, cacert=str(cert))
        assert [v.id for v in trusted.block_storage.volumes()] == [volume_id]
        assert [v.id for v in connect(sim, verify=False).block_storage.volumes()] == [volume_id]
        # The system's CAs (REQUESTS_CA_BUNDLE here) do not know this certificate: keystoneauth
        # fails its first request, the identity version discovery.
        untrusted = connect(sim, verify=True)
        with pytest.raises(keystoneauth1.exceptions.DiscoveryFailure, match="CERTIFICATE_VERIFY"):
            list(untrusted.block_storage.volumes())
