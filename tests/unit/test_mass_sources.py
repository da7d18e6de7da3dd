"""A Mass task's source laid over hamal.conf: checked as hamal.conf is, the VM filter set."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from hamal_workers.config import defaults
from hamal_workers.mass import MassError
from hamal_workers.mass_sources import source_digest, task_settings


def test_a_source_becomes_the_platform_section_with_the_tasks_vms(tmp_path: Path) -> None:
    import dataclasses

    base = defaults()
    base = dataclasses.replace(
        base, default=dataclasses.replace(base.default, hamal_lib_dir=str(tmp_path))
    )
    source = {"vrm_host": "10.0.0.9", "vrm_port": 7443, "user": "u", "password": "p",
              "insecure": False, "ca_cert": "-----BEGIN CERTIFICATE-----\n..."}  # fmt: skip
    scoped = task_settings(base, "t1", "fusion", source, ["vm-a", "vm-b"])
    section = scoped.fusion_compute
    assert (section.vrm_host, section.vrm_port, section.password) == ("10.0.0.9", 7443, "p")
    assert section.vms == "vm-a,vm-b"
    assert Path(section.ca_file).read_text().startswith("-----BEGIN CERTIFICATE-----")
    assert base.fusion_compute.vrm_host == "", "the proxy's own settings are untouched"
    ceph = task_settings(base, "t2", "ceph", {"auth_url": "https://k/v3", "conf": "/c"}, ["s"])
    assert (ceph.openstack.auth_url, ceph.ceph.conf, ceph.openstack.servers) == (
        "https://k/v3",
        "/c",
        "s",
    )
    assert source_digest("fusion", source) == source_digest("fusion", dict(source))
    assert source_digest("fusion", source) != source_digest("fusion", {**source, "user": "v"})


@pytest.mark.parametrize(
    ("source", "message"),
    [
        ({"hostname": "x"}, "source key 'hostname' is not a key of [vmware]"),
        ({"port": "seventy"}, "source key 'port' of [vmware]: expected a whole number"),
        ({"port": 70000}, "source key 'port' of [vmware]: expected a whole number from 1"),
        ({"transport": "carrier-pigeon"}, "expected one of: https, nbd"),
    ],
)
def test_a_bad_source_is_refused_naming_the_task_and_key_not_the_value(
    source: dict[str, object], message: str
) -> None:
    with pytest.raises(MassError, match=re.escape(message)) as caught:
        task_settings(defaults(), "t9", "vmware", source, ["vm"])
    assert "task t9" in str(caught.value)
    assert "carrier-pigeon" not in str(caught.value) and "seventy" not in str(caught.value)
