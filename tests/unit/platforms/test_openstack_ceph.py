"""The pure parts of the Ceph platform: device order, change tokens, disk flags."""

from __future__ import annotations

from hypothesis import given
from hypothesis import strategies as st

from hamal_workers.platforms.openstack_ceph import (
    BaseToken,
    DiskFlags,
    _device_key,
    make_token,
    split_locator,
)


def test_devices_sort_in_boot_order() -> None:
    devices = ["/dev/vdaa", "/dev/vdc", "/dev/vda", "/dev/vdb", "/dev/vdz", "/dev/vdab"]
    ordered = sorted(devices, key=_device_key)
    assert ordered == ["/dev/vda", "/dev/vdb", "/dev/vdc", "/dev/vdz", "/dev/vdaa", "/dev/vdab"]


@given(
    st.from_regex(r"[0-9a-f]{6,16}", fullmatch=True),
    st.integers(min_value=0, max_value=2**63),
    st.from_regex(r"hamal-[0-9A-Za-z.:-]{1,40}", fullmatch=True),
)
def test_tokens_round_trip(image_id: str, snap_id: int, name: str) -> None:
    assert BaseToken.parse(make_token(image_id, snap_id, name)) == BaseToken(
        image_id, snap_id, name
    )


def test_tokens_of_others_are_not_ours() -> None:
    for token in ["", "journal:1:2", "rbd:abc:x:hamal-1", "rbd:abc:1", "vmware-52 1a/3"]:
        assert BaseToken.parse(token) is None


def test_disk_flags_follow_the_size_floor_and_the_skip_switch() -> None:
    assert DiskFlags(min_size_mb=48).applies(48 << 20)
    assert not DiskFlags(min_size_mb=48).applies((48 << 20) - 1)
    assert not DiskFlags(skip=True, min_size_mb=0).applies(1 << 30)


def test_a_locator_names_pool_and_image() -> None:
    assert split_locator("volumes/volume-1") == ("volumes", "volume-1")
    for bad in ["volume-1", "/x", "pool/"]:
        try:
            split_locator(bad)
        except Exception as exc:
            assert "pool/image" in str(exc)
        else:
            raise AssertionError(bad)
