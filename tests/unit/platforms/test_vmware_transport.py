"""VMware pieces that need no vCenter: datastore paths, URLs, nbdkit's command line, and
what a disk source refuses before it reads anything."""

from __future__ import annotations

import pytest

from hamal_workers.config import VmwareSection
from hamal_workers.platforms.base import PlatformError, Snapshot
from hamal_workers.platforms.vmware import VmwareDiskSource, VmwarePlatform, change_epoch
from hamal_workers.platforms.vmware_transport import (
    DatastorePath,
    folder_url,
    nbdkit_plugin_args,
)

INFO = {
    "key": 2000, "file": "[nfs ds 1] web 01/web 01-000002.vmdk", "size": 1 << 30,
    "token": "52 aa bb/7", "vm": "vm-42", "snapshot": "snapshot-43", "datacenter": "DC 1",
}  # fmt: skip


def section(**keys: object) -> VmwareSection:
    base: dict[str, object] = {"host": "vc.example", "user": "backup@vsphere.local",
                               "password": "s3cret-Pa55"}  # fmt: skip
    return VmwareSection(**{**base, **keys})  # type: ignore[arg-type]


def test_datastore_paths_and_folder_urls() -> None:
    where = DatastorePath.parse(INFO["file"])
    assert (where.datastore, where.path) == ("nfs ds 1", "web 01/web 01-000002.vmdk")
    assert where.flat == "web 01/web 01-000002-flat.vmdk"
    url = folder_url("vc.example", 443, INFO["file"], "DC 1")
    assert url == (
        "https://vc.example:443/folder/web%2001/web%2001-000002-flat.vmdk"
        "?dcPath=DC+1&dsName=nfs+ds+1"
    )
    with pytest.raises(PlatformError, match="not a datastore path"):
        DatastorePath.parse("/vmfs/volumes/x.vmdk")


def test_vddk_gets_the_password_from_a_file_never_the_command_line(tmp_path) -> None:
    s = section(transport="nbd", vddk_libdir="/opt/vddk", vddk_thumbprint="AA:BB")
    args = nbdkit_plugin_args(s, INFO, tmp_path / "password")
    assert args[0] == "vddk"
    assert f"password=+{tmp_path / 'password'}" in args
    assert "vm=moref=vm-42" in args and "snapshot=snapshot-43" in args
    assert f"file={INFO['file']}" in args and "thumbprint=AA:BB" in args
    assert not any("s3cret" in a for a in args)


def test_the_file_plugin_serves_the_flat_extent_under_the_mount() -> None:
    s = section(transport="nbd", nbd_plugin="file", datastore_mounts="nfs ds 1=/mnt/ds1")
    assert nbdkit_plugin_args(s, INFO, None) == [
        "file", "file=/mnt/ds1/web 01/web 01-000002-flat.vmdk"
    ]  # fmt: skip


def test_https_refuses_a_disk_that_is_a_delta_of_an_older_snapshot() -> None:
    snap = Snapshot("hamal-x", "uuid", "vmware", 0.0, {"2000": {**INFO, "delta": True}})
    plat = VmwarePlatform(section())  # no session is opened before a call needs one
    with pytest.raises(PlatformError, match="set \\[vmware\\] transport = nbd"):
        VmwareDiskSource(plat, snap, "2000")
    nbd = VmwarePlatform(section(transport="nbd", nbd_plugin="file", datastore_mounts="a=/a"))
    VmwareDiskSource(nbd, snap, "2000").close()


def test_change_ids_of_one_tracking_epoch() -> None:
    assert change_epoch("52 aa bb cc/12") == change_epoch("52 aa bb cc/3") == "52 aa bb cc"
    assert change_epoch("52 aa bb cc/12") != change_epoch("52 dd ee ff/12")
    assert change_epoch("*") == ""
