"""state.py against a real redis-server: fenced leases, settling, checkpoints, run expiry."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time

import pytest
import redis

from hamal_workers.state import (
    FINISHED_RUN_TTL_S,
    HISTORY_LENGTH,
    SCAN_TIMES_LENGTH,
    Lease,
    LeaseKeeper,
    LeaseLost,
    State,
    Writes,
    key,
)


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


def test_a_lease_lives_its_ttl_and_never_less_than_a_second(st: State) -> None:
    long = st.scan_lease(ttl_s=5)
    assert long.acquire() and long.acquired_at > 0
    assert 4000 < st.r.pttl(long.key) <= 5000
    short = st.finalize_lease("r", ttl_s=0.2)
    assert short.acquire()
    assert 800 < st.r.pttl(short.key) <= 1000
    assert st.leases_held([long.key, short.key, key("lease", "vm", "none")]) == [
        True,
        True,
        False,
    ]
    unheld = st.vm_lease("v", 5)
    unheld.release()  # never acquired: no token, nothing to release
    assert unheld.token == "" and not unheld.held_by_anyone()


def test_a_batch_applies_in_order_and_reports_each_result(st: State) -> None:
    assert st.apply(Writes()) == []
    writes = Writes()
    assert writes.hset("hamal:t:h", {"a": "1", "b": b"\x00\xff"}) == 0
    assert writes.hset_if_exists("hamal:t:h", {"c": "3"}) == 1
    assert writes.hset_if_exists("hamal:t:none", {"c": "3"}) == 2
    assert writes.hdel_if_equal("hamal:t:h", "a", "2") == 3
    assert writes.hdel_if_equal("hamal:t:h", "b", "\x00\xff") == 4
    assert writes.add("HINCRBY", "hamal:t:h", "n", 5) == 5
    assert st.apply(writes) == [2, 1, 0, 0, 0, 5]
    assert st.r.hgetall("hamal:t:h") == {b"a": b"1", b"b": b"\x00\xff", b"c": b"3", b"n": b"5"}
    assert not st.r.exists("hamal:t:none")
    writes = Writes()
    writes.hdel_if_equal("hamal:t:h", "a", "1")
    assert st.apply(writes) == [1] and st.r.hget("hamal:t:h", "a") is None


def test_a_fenced_batch_is_all_or_nothing(st: State) -> None:
    lease = st.disk_lease("r", "d", ttl_s=5)
    assert lease.acquire()
    writes = Writes()
    writes.hset("hamal:t:h", {"a": "1"})
    writes.add("SADD", "hamal:t:s", "x")
    st.r.set(lease.key, "another-token")
    with pytest.raises(LeaseLost, match="lease hamal:lease:disk:r:d is no longer ours"):
        st.apply(writes, lease)
    assert not st.r.exists("hamal:t:h") and not st.r.exists("hamal:t:s")
    # A command Redis refuses is an error of its own, not a lost lease.
    bad = Writes()
    bad.add("NOSUCHCOMMAND", "x")
    with pytest.raises(redis.ResponseError):
        st.apply(bad)


def test_starting_a_disk_counts_its_attempts_under_its_lease(st: State) -> None:
    start(st, "v", "r", ["a"])
    lease = st.disk_lease("r", "a", ttl_s=5)
    assert lease.acquire()
    st.set_disk_fields("r", "a", lease, error="before")
    assert st.start_disk("r", "a", "w1", lease) == 1
    assert st.start_disk("r", "a", "w2", lease) == 2
    disk = st.disk("r", "a")
    assert (disk.state, disk.fields["worker"], disk.fields["error"]) == ("running", "w2", "")
    assert disk.number("attempts") == 2 and disk.number("missing") == 0
    assert time.time() - disk.number("started_at") < 60
    assert [d.state for d in st.disks([("r", "a"), ("r", "zz")])] == ["running", ""]
    assert [(d.run_id, d.disk) for d in st.disks([("r", "a"), ("r", "zz")])] == [
        ("r", "a"),
        ("r", "zz"),
    ]


def test_a_received_mark_needs_the_disk_to_exist(st: State) -> None:
    start(st, "v", "r", ["a"])
    st.disk_received("r", "a", "w1")
    st.disk_received("r", "gone", "w1")
    assert st.disk("r", "a").fields["received_by"] == "w1"
    assert not st.r.exists(key("run", "r", "disk", "gone"))


def test_a_queued_disk_is_settled_once_and_a_running_one_never(st: State) -> None:
    start(st, "v", "r", ["a", "b", "c"])
    st.set_disk_fields("r", "c", state="running")
    assert st.settle_disk_if_queued("r", "a", {"state": "failed", "error": "x"}) is False
    assert st.disk("r", "a").fields["error"] == "x"
    assert st.settle_disk_if_queued("r", "a", {"state": "failed"}) is False  # not queued now
    assert st.settle_disk_if_queued("r", "c", {"state": "failed"}) is False  # it runs
    assert st.disk("r", "c").state == "running"
    assert st.pending_disks("r") == ["b", "c"]
    st.settle_disk("r", "c", {"state": "done"})
    assert st.settle_disk_if_queued("r", "b", {"state": "failed"}) is True  # the last one
    assert st.pending_disks("r") == []


def test_requeued_disks_are_pending_again_under_the_finalize_lease(st: State) -> None:
    start(st, "v", "r", ["a", "b"])
    st.disk_received("r", "a", "w1")
    for d in ("a", "b"):
        st.settle_disk("r", d, {"state": "done"})
    st.set_run_fields("r", status="finalizing")
    lease = st.finalize_lease("r", ttl_s=5)
    assert lease.acquire()
    st.requeue_disks("r", ["a"], lease, "staged manifest lost")
    a = st.disk("r", "a")
    assert (a.state, a.fields["error"]) == ("queued", "staged manifest lost")
    assert "received_by" not in a.fields and "received_at" not in a.fields
    assert st.disk("r", "b").state == "done"
    assert st.pending_disks("r") == ["a"] and st.pending_of(["r", "x"]) == [["a"], []]
    assert st.run("r")["status"] == "syncing" and st.run("r")["restaged"] == "1"
    st.r.set(lease.key, "another-token")
    with pytest.raises(LeaseLost):
        st.requeue_disks("r", ["b"], lease, "again")
    assert st.disk("r", "b").state == "done" and st.run("r")["restaged"] == "1"


def test_a_redispatched_disk_is_queued_and_counted(st: State) -> None:
    start(st, "v", "r", ["a"])
    st.disk_received("r", "a", "w1")
    st.set_disk_fields("r", "a", state="running")
    st.redispatched("r", "a")
    st.redispatched("r", "a")
    a = st.disk("r", "a")
    assert a.state == "queued" and "received_by" not in a.fields
    assert "received_at" not in a.fields
    assert st.run("r")["redispatches"] == "2"


def test_a_run_records_its_disks_and_runs_are_read_in_one_go(st: State) -> None:
    start(st, "v", "r", ["b", "a"])
    st.set_run_fields("r", snapshot="s1")
    assert st.run_disks("r") == ["a", "b"] and st.run_disks("none") == []
    assert [d.state for d in st.disks([("r", "a"), ("r", "b")])] == ["queued", "queued"]
    assert st.disk("r", "a").fields["attempts"] == "0"
    assert [r.get("snapshot") for r in st.runs(["r", "none"])] == ["s1", None]
    assert st.run("r")["status"] == "starting"


def test_a_failed_run_counts_failures_and_a_success_clears_them(st: State) -> None:
    for n in range(2):
        start(st, "v", f"f{n}", ["a"]).release()
        st.finish_run(f"f{n}", "v", "failed", {"status": "failed", "error": "e" * 600})
    vm = st.vm("v")
    assert vm["failures"] == "2" and vm["last_error"] == "e" * 500
    st.set_vm_fields("v", target_full_free="1")
    start(st, "v", "ok", ["a"]).release()
    st.finish_run("ok", "v", "committed", {"status": "committed"}, vm_fields={"last_point": "p"})
    vm = st.vm("v")
    assert vm["failures"] == "0" and vm["last_point"] == "p"
    assert "last_error" not in vm and "target_full_free" not in vm and "active_run" not in vm
    assert [h["status"] for h in st.history("v")] == ["committed", "failed", "failed"]
    assert len(st.history("v", count=2)) == 2
    assert 0 < st.r.ttl(key("run", "ok", "pending")) <= FINISHED_RUN_TTL_S


def test_history_and_chains_keep_the_newest_two_hundred(st: State) -> None:
    for n in range(HISTORY_LENGTH + 1):
        writes = Writes()
        writes.add("LPUSH", key("history", "v"), json.dumps({"n": n}))
        st.push_chain(writes, "v", "d", {"n": n})
        st.apply(writes)
    start(st, "v", "r", ["a"]).release()
    st.finish_run("r", "v", "committed", {"n": "last"})
    history = st.history("v", count=1000)
    assert len(history) == HISTORY_LENGTH and history[0] == {"n": "last"}
    assert history[-1] == {"n": 2}
    chain = st.chain("v", "d")
    assert len(chain) == HISTORY_LENGTH
    assert chain[0] == {"n": 1} and chain[-1] == {"n": HISTORY_LENGTH}


def test_free_claim_frees_only_that_runs_claim(st: State) -> None:
    st.set_vm_fields("v", active_run="r2")
    assert st.free_claim("v", "r1") is False and st.vm("v")["active_run"] == "r2"
    assert st.free_claim("v", "r2") is True and "active_run" not in st.vm("v")


def test_checkpoints_are_dropped_together(st: State) -> None:
    for d in ("a", "b", "c"):
        st.start_checkpoint("r", d, {"plan": "[]"})
        st.save_checkpoint("r", d, {"done": "1"}, {0: None})
    assert st.checkpoint("r", "a") == ({"plan": "[]", "done": "1"}, {0: None})
    st.save_checkpoint("r", "a", {"done": "1"}, {})  # nothing new: no empty record
    assert st.r.llen(key("ckpt", "r", "a", "entries")) == 1
    st.drop_checkpoints("r", ["a", "b"])
    st.drop_checkpoints("r", [])
    assert st.checkpoint("r", "a") == ({}, {}) and st.checkpoint("r", "b") == ({}, {})
    assert st.checkpoint("r", "c")[1] == {0: None}


def test_sync_requests_are_one_per_vm_oldest_point_first(st: State) -> None:
    assert st.request_syncs([]) == 0 and st.take_request() is None
    assert st.request_syncs([("b", 20.0), ("a", 10.0), ("c", 30.0)]) == 3
    assert st.request_syncs([("a", 25.0), ("d", 1.0)]) == 1  # a waits already, as it was
    assert st.requests_waiting() == 4 and st.requested("a") and not st.requested("x")
    assert [st.take_request() for _ in range(5)] == ["d", "a", "b", "c", None]
    many = [(f"vm{n:05d}", float(n)) for n in range(5003)]
    assert st.request_syncs(many) == 5003 and st.requests_waiting() == 5003


def test_vms_are_recorded_in_one_go(st: State) -> None:
    st.record_vms([("v2", "web", "local"), ("v1", "db", "ceph")])
    st.record_vms([])
    assert st.vm_ids() == ["v1", "v2"]
    assert st.vms(["v1", "v2", "v3"]) == [
        {"name": "db", "platform": "ceph"},
        {"name": "web", "platform": "local"},
        {},
    ]


def test_snapshots_the_proxy_made_are_listed_until_deleted(st: State) -> None:
    st.snapshot_created("s1", {"vm": "v", "n": 1})
    st.snapshot_created("s2", {"vm": "w"})
    st.snapshot_deleted("s1")
    assert st.live_snapshots() == {"s2": {"vm": "w"}}


def test_live_workers_are_named_without_the_key_prefix(st: State) -> None:
    assert st.live_workers() == {}
    st.r.set(key("vm-count"), "not a worker")  # other keys are never taken for workers
    st.worker_alive("host-a", ["period", "control"], 4, ttl_s=30)
    st.worker_alive("host-b", ["disk"], 2, ttl_s=30)
    assert 29_000 < st.r.pttl(key("worker", "host-a")) <= 30_000
    st.worker_gone("host-b")
    assert st.live_workers() == {"host-a": {"queues": ["control", "period"], "concurrency": 4}}


def test_scans_are_counted_and_their_times_capped(st: State) -> None:
    assert [st.record_scan() for _ in range(SCAN_TIMES_LENGTH + 1)][-2:] == [
        SCAN_TIMES_LENGTH,
        SCAN_TIMES_LENGTH + 1,
    ]
    assert st.r.llen(key("scan", "times")) == SCAN_TIMES_LENGTH


def test_events_are_published_as_sorted_json(st: State) -> None:
    lease = start(st, "v", "r", ["a"])
    disk_lease = st.disk_lease("r", "a", ttl_s=5)
    assert disk_lease.acquire()
    pubsub = st.r.pubsub(ignore_subscribe_messages=True)
    pubsub.subscribe(key("events"))
    try:
        st.publish({"b": 1, "a": 2})
        writes = Writes()
        writes.publish({"z": 0, "event": "x"})
        st.apply(writes)
        st.start_disk("r", "a", "w1", disk_lease)
        st.settle_disk("r", "a", {"state": "done"}, disk_lease)
        st.finish_run("r", "v", "committed", {"status": "committed"}, lease)
        got = []
        deadline = time.monotonic() + 5
        while len(got) < 5 and time.monotonic() < deadline:
            msg = pubsub.get_message(timeout=1.0)
            if msg is not None:
                got.append(msg["data"])
    finally:
        pubsub.close()
    assert got[:2] == [b'{"a": 2, "b": 1}', b'{"event": "x", "z": 0}']
    assert [json.loads(m) for m in got[2:]] == [
        {"event": "disk-started", "run_id": "r", "disk": "a", "attempt": 1},
        {"event": "disk", "run_id": "r", "disk": "a", "state": "done"},
        {"event": "run", "run_id": "r", "vm_id": "v", "status": "committed"},
    ]


def test_a_finished_run_records_its_end(st: State) -> None:
    lease = start(st, "v", "r", ["a"])
    st.finish_run("r", "v", "committed", {"status": "committed"}, lease)
    run = st.run("r")
    assert run["status"] == "committed" and time.time() - float(run["finished"]) < 60
    assert st.active_runs() == []


def test_every_fenced_write_of_a_stale_holder_is_refused_whole(st: State) -> None:
    start(st, "v", "r", ["a"]).release()
    stale = st.disk_lease("r", "a", ttl_s=5)
    assert stale.acquire()
    st.r.set(stale.key, "a-newer-holder")
    before = {name: st.r.dump(name) for name in sorted(st.r.keys("*"))}
    attempts = [
        lambda: st.start_disk("r", "a", "w", stale),
        lambda: st.settle_disk("r", "a", {"state": "done"}, stale),
        lambda: st.set_run_fields("r", stale, status="x"),
        lambda: st.set_disk_fields("r", "a", stale, state="x"),
        lambda: st.start_checkpoint("r", "a", {"plan": "[]"}, stale),
        lambda: st.save_checkpoint("r", "a", {"done": "1"}, {0: None}, stale),
        lambda: st.snapshot_created("s", {"vm": "v"}, stale),
        lambda: st.finish_run("r", "v", "failed", {"status": "failed"}, stale),
        lambda: st.requeue_disks("r", ["a"], stale, "x"),
    ]
    for attempt in attempts:
        with pytest.raises(LeaseLost):
            attempt()
    assert {name: st.r.dump(name) for name in sorted(st.r.keys("*"))} == before


def test_plan_disks_queues_each_disk_now(st: State) -> None:
    start(st, "v", "r", ["a", "b"])
    for d in ("a", "b"):
        fields = st.disk("r", d).fields
        assert fields["state"] == "queued" and fields["attempts"] == "0"
        assert time.time() - float(fields["dispatched_at"]) < 60
    assert st.pending_disks("r") == ["a", "b"]
    writes = Writes()
    st.plan_disks(writes, "r2", [])
    st.apply(writes)
    assert st.run_disks("r2") == [] and st.pending_disks("r2") == []


def test_a_checkpoint_of_many_flushes_is_read_whole(st: State) -> None:
    st.start_checkpoint("r", "d", {"plan": "[]"})
    expected: dict[int, bytes | None] = {}
    for flush in range(5):
        batch = {flush * 10 + i: (bytes([flush + 1]) * 32 if i % 2 else None) for i in range(3)}
        st.save_checkpoint("r", "d", {"done": str(flush)}, batch)
        expected.update(batch)
    fields, entries = st.checkpoint("r", "d")
    assert fields == {"plan": "[]", "done": "4"} and entries == expected
    st.start_checkpoint("r", "d", {"plan": "[[0, 1]]"})
    assert st.checkpoint("r", "d") == ({"plan": "[[0, 1]]"}, {})


def test_lease_keys_follow_the_documented_scheme(st: State) -> None:
    """Other parts (the scan, `hamal status`) find leases by these names."""
    assert st.vm_lease("v", 5).key == "hamal:lease:vm:v"
    assert st.disk_lease("r", "d", 5).key == "hamal:lease:disk:r:d"
    assert st.finalize_lease("r", 5).key == "hamal:lease:finalize:r"
    assert st.scan_lease(5).key == "hamal:lease:scan"
    lease = st.vm_lease("v", 5)
    assert lease.acquire()
    assert st.r.get("hamal:lease:vm:v") == lease.token.encode()
    assert int(st.r.get("hamal:fence")) == int(lease.token.split("-")[0])


def test_a_keeper_trusts_its_lease_only_for_a_ttl_since_the_last_renewal(st: State) -> None:
    """A process paused past its ttl finds the lease lost by the clock, before any renewal."""
    lease = st.disk_lease("r", "d", ttl_s=1)
    assert lease.acquire()
    fresh = LeaseKeeper(lease)
    fresh.check()  # just acquired: held
    lease.acquired_at = time.monotonic() - 1.5  # as if paused since the acquire
    stale = LeaseKeeper(lease)
    with pytest.raises(LeaseLost, match=r"lease hamal:lease:disk:r:d was lost"):
        stale.check()
    assert stale.lost.is_set()
    with pytest.raises(LeaseLost):
        stale.check()  # lost stays lost


def test_a_failed_run_without_an_error_records_when_it_failed(st: State) -> None:
    start(st, "v", "r", ["a"]).release()
    st.finish_run("r", "v", "failed", {"status": "failed"})
    vm = st.vm("v")
    assert vm["last_error"] == "" and time.time() - float(vm["last_failed_at"]) < 60


def test_requeued_and_redispatched_disks_are_dispatched_again_now(st: State) -> None:
    start(st, "v", "r", ["a", "b"])
    for d in ("a", "b"):
        st.set_disk_fields("r", d, dispatched_at="0")
    lease = st.finalize_lease("r", ttl_s=5)
    assert lease.acquire()
    st.requeue_disks("r", ["a"], lease, "lost")
    st.redispatched("r", "b")
    for d in ("a", "b"):
        assert time.time() - float(st.disk("r", d).fields["dispatched_at"]) < 60


def test_a_platform_lists_its_leftovers_at_most_once_per_period(st: State) -> None:
    assert st.leftover_listing_due("ceph", 600)
    assert not st.leftover_listing_due("ceph", 600)
    assert st.leftover_listing_due("local", 600)  # per platform
    assert st.leftover_listing_due("local", 0) and st.leftover_listing_due("local", 0)
    st.r.flushall()  # Redis lost: the platform's own listing is all the sweep has, at once
    assert st.leftover_listing_due("ceph", 600)


def test_the_call_rate_is_shared_and_says_how_long_until_a_place_frees(st: State) -> None:
    one = st.call_rate("vrm-x", limit=3, window_s=30)
    other = State(st.r).call_rate("vrm-x", limit=3, window_s=30)  # another process's view
    assert [one.wait_s(), other.wait_s(), one.wait_s()] == [0, 0, 0]
    wait = other.wait_s()
    assert 25 < wait <= 30, wait
    assert st.call_rate("vrm-y", limit=3, window_s=30).wait_s() == 0  # another service


def test_slots_cap_holders_and_a_dead_holders_slot_comes_back(st: State) -> None:
    slots = st.slots("host-a", limit=2, hold_s=30)
    assert slots.try_take("a") and slots.try_take("b")
    assert not slots.try_take("c")
    assert slots.try_take("a"), "a holder taking again keeps its slot"
    assert slots.holders() == 2
    slots.release("b")
    assert slots.try_take("c") and not slots.try_take("d")
    # A holder killed with its slot: its hold runs out instead of being renewed.
    short = st.slots("host-b", limit=1, hold_s=0.2)
    assert short.try_take("killed")
    assert not short.try_take("next")
    deadline = time.monotonic() + 10
    while not short.try_take("next"):
        assert time.monotonic() < deadline, "the dead holder's slot never came back"
        time.sleep(0.05)
    assert not short.renew("killed"), "a hold that ran out is not renewed"
    assert short.renew("next")
