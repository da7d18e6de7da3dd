"""state.py against a real redis-server: fenced leases, settling, checkpoints, run expiry."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time

import pytest
import redis

from hamal_workers.state import (
    FINISHED_RUN_TTL_S,
    Lease,
    LeaseKeeper,
    LeaseLost,
    State,
    Writes,
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


def start(st: State, vm_id: str, run_id: str, disks: list[str]) -> Lease:
    lease = st.vm_lease(vm_id, 5)
    assert lease.acquire()
    writes = Writes()
    st.start_run(writes, vm_id, run_id, {"vm_id": vm_id})
    st.plan_disks(writes, run_id, disks)
    st.apply(writes, lease)
    return lease


def test_only_the_last_settled_disk_finalizes_and_only_once(st: State) -> None:
    start(st, "v", "r", ["a", "b"])
    assert st.settle_disk("r", "a", {"state": "done"}) is False
    assert st.settle_disk("r", "b", {"state": "done"}) is True
    assert st.settle_disk("r", "b", {"state": "done"}) is False  # a duplicate delivery


def test_claim_and_run_are_one_write_and_finishing_frees_the_vm(st: State) -> None:
    st.record_vm("v", "vm", "local")
    lease = start(st, "v", "r", ["a"])
    assert st.vm("v")["active_run"] == "r" and st.active_runs() == ["r"]
    st.finish_run("r", "v", "committed", {"run_id": "r", "status": "committed"}, lease)
    assert st.active_runs() == []
    assert "active_run" not in st.vm("v")
    for name in (key("run", "r"), key("run", "r", "disk", "a")):
        assert 0 < st.r.ttl(name) <= FINISHED_RUN_TTL_S
    assert st.history("v")[0]["status"] == "committed"


def test_a_late_finish_of_an_old_run_does_not_free_a_newer_claim(st: State) -> None:
    start(st, "v", "old", ["a"]).release()
    st.set_vm_fields("v", active_run="new")  # the VM moved on to a newer run
    st.finish_run("old", "v", "failed", {"run_id": "old", "status": "failed", "error": "x"})
    assert st.vm("v")["active_run"] == "new"
    assert st.vm("v")["failures"] == "1"


def test_fencing_tokens_grow_and_a_stale_holder_cannot_write(st: State) -> None:
    first = st.disk_lease("r", "d", ttl_s=1)
    assert first.acquire()
    st.r.delete(first.key)  # its lease expired while it was paused
    second = st.disk_lease("r", "d", ttl_s=5)
    assert second.acquire()
    assert int(second.token.split("-")[0]) > int(first.token.split("-")[0])
    with pytest.raises(LeaseLost):
        st.set_disk_fields("r", "d", first, state="running")
    assert st.disk("r", "d").fields == {}  # nothing of the batch was applied
    st.set_disk_fields("r", "d", second, state="running")
    assert st.disk("r", "d").state == "running"


def test_after_a_flush_an_old_token_is_never_handed_out_again(st: State) -> None:
    old = st.disk_lease("r", "d", ttl_s=5)
    assert old.acquire()
    st.r.flushall()
    new = st.disk_lease("r", "d", ttl_s=5)
    assert new.acquire()
    assert new.token != old.token  # the counter restarted, the random part did not repeat
    with pytest.raises(LeaseLost):
        st.save_checkpoint("r", "d", {"done": "1"}, {0: b"x" * 32}, old)


def test_checkpoint_entries_round_trip(st: State) -> None:
    names = {i: (i.to_bytes(4, "big") * 8 if i % 3 else None) for i in range(1, 2000)}
    st.start_checkpoint("r", "d", {"snapshot_id": "s", "plan": "[]"})
    st.save_checkpoint("r", "d", {"done": "1000"}, dict(list(names.items())[:1000]))
    st.save_checkpoint("r", "d", {"done": "1999"}, dict(list(names.items())[1000:]))
    fields, entries = st.checkpoint("r", "d")
    assert fields["done"] == "1999" and entries == names
    st.start_checkpoint("r", "d", {"snapshot_id": "s2", "plan": "[]"})  # a new plan
    assert st.checkpoint("r", "d")[1] == {}


def test_keeper_counts_a_paused_process_as_having_lost_its_lease(
    st: State, redis_port: int
) -> None:
    """SIGSTOP a process that holds a lease past its ttl: after SIGCONT it must not write."""
    code = f"""
import redis, sys, time
from hamal_workers.state import LeaseKeeper, LeaseLost, State
st = State(redis.Redis(port={redis_port}))
lease = st.disk_lease("r", "paused", ttl_s=1)
assert lease.acquire()
with LeaseKeeper(lease) as keeper:
    print("held", flush=True)
    sys.stdin.readline()  # paused around here
    try:
        keeper.check()
        st.set_disk_fields("r", "paused", lease, state="written-by-stale")
        print("wrote", flush=True)
    except LeaseLost:
        print("lost", flush=True)
"""
    child = subprocess.Popen(
        [sys.executable, "-c", code],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
        env={**os.environ, "PYTHONPATH": os.getcwd()},
    )
    assert child.stdout is not None and child.stdin is not None
    assert child.stdout.readline().strip() == "held"
    os.kill(child.pid, signal.SIGSTOP)
    deadline = time.monotonic() + 10
    while st.r.exists(key("lease", "disk", "r", "paused")) and time.monotonic() < deadline:
        time.sleep(0.1)  # waiting for Redis to expire the lease: no event exists for that
    other = st.disk_lease("r", "paused", ttl_s=30)
    assert other.acquire()
    os.kill(child.pid, signal.SIGCONT)
    child.stdin.write("go\n")
    child.stdin.flush()
    assert child.stdout.readline().strip() == "lost"
    child.wait(10)
    assert st.disk("r", "paused").fields.get("state") != "written-by-stale"
