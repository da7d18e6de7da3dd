"""state.py against a real redis-server: leases, settling, finished-run expiry."""

from __future__ import annotations

import pytest
import redis

from hamal_workers.state import (
    FINISHED_RUN_TTL_S,
    Lease,
    LeaseKeeper,
    LeaseLost,
    State,
    key,
)


@pytest.fixture
def st(redis_port: int) -> State:
    client = redis.Redis(port=redis_port)
    client.flushall()
    return State(client)


def test_a_lease_has_one_holder_and_only_it_renews_or_releases(st: State) -> None:
    a = st.disk_lease("r1", "d0", ttl_s=5)
    b = st.disk_lease("r1", "d0", ttl_s=5)
    assert a.acquire()
    assert not b.acquire()
    assert not b.renew()
    b.release()  # not the holder: nothing happens
    assert a.held_by_anyone() and a.renew()
    a.release()
    assert not a.held_by_anyone()
    assert b.acquire()


def test_lease_expires_by_itself(st: State) -> None:
    lease = Lease(st.r, key("lease", "test"), ttl_s=1)
    assert lease.acquire()
    assert 0 < st.r.pttl(lease.key) <= 1000


def test_keeper_notices_a_lost_lease(st: State) -> None:
    lease = Lease(st.r, key("lease", "kept"), ttl_s=1.2)
    assert lease.acquire()
    with LeaseKeeper(lease) as keeper:
        keeper.check()
        st.r.set(lease.key, "someone-else")  # another holder after an expiry
        assert keeper.lost.wait(3), "the keeper did not notice"
        with pytest.raises(LeaseLost):
            keeper.check()


def test_only_the_last_settled_disk_finalizes_and_only_once(st: State) -> None:
    st.create_run("r", {"vm_id": "v"})
    st.plan_disks("r", {"a": {}, "b": {}})
    assert st.settle_disk("r", "a", {"state": "done"}) is False
    assert st.settle_disk("r", "b", {"state": "done"}) is True
    assert st.settle_disk("r", "b", {"state": "done"}) is False  # a duplicate delivery


def test_finished_runs_expire_and_free_the_vm(st: State) -> None:
    st.record_vm("v", "vm", "local")
    assert st.claim_vm_run("v", "r")
    assert not st.claim_vm_run("v", "r2")
    st.create_run("r", {"vm_id": "v"})
    st.plan_disks("r", {"a": {}})
    st.finish_run("r", "v", "committed", {"run_id": "r", "status": "committed"})
    assert st.active_runs() == []
    assert "active_run" not in st.vm("v")
    for name in (key("run", "r"), key("run", "r", "disk", "a")):
        assert 0 < st.r.ttl(name) <= FINISHED_RUN_TTL_S
    assert st.history("v")[0]["status"] == "committed"
