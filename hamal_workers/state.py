"""Every Redis key Hamal uses, in one place, with one naming scheme: `hamal:<kind>:<ids>`.

hamal:lease:vm:<vm_id>                    token of the task snapshotting/planning the VM (PX ttl)
hamal:lease:disk:<run_id>:<disk>          token of the task writing the disk (PX ttl, renewed)
hamal:lease:finalize:<run_id>             token of the task finalizing the run
hamal:vm:<vm_id>                          hash: name, platform, active_run, last_point, ...
hamal:vms                                 set of every vm_id seen
hamal:run:<run_id>                        hash: vm_id, vm_name, platform, status, point_id, ...
hamal:run:<run_id>:pending                set of disks not settled yet; the last SREM finalizes
hamal:run:<run_id>:disk:<disk>            hash: state, attempts, progress and result of one disk
hamal:runs:active                         set of run ids not finished
hamal:ckpt:<run_id>:<disk>                hash: plan, total, done counters of a disk sync
hamal:ckpt:<run_id>:<disk>:entries        hash: chunk index -> digest ("" = zero chunk)
hamal:chain:<vm_id>:<disk>                list of committed {point_id, snapshot_id, created}
hamal:history:<vm_id>                     list of finished run summaries, newest first (capped)
hamal:snapshots                           hash: snapshot key -> record of every snapshot the
                                          proxy created and has not deleted yet (for the sweep)
hamal:scan:count / hamal:scan:times       how many scans ran and when (newest first, capped)
hamal:events                              pub/sub: scan, run-started, disk-started, run events

Data never goes through Redis: only identities, plans, digests and counters.
"""

from __future__ import annotations

import json
import secrets
import threading
import time
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

import redis

PREFIX = "hamal"
HISTORY_LENGTH = 200
# Finished runs stay readable for a week (hamal status, debugging); history keeps summaries.
FINISHED_RUN_TTL_S = 7 * 24 * 3600
SCAN_TIMES_LENGTH = 1000

# Run status values, in the order a run goes through them.
STARTING, SYNCING, FINALIZING, COMMITTED, FAILED = (
    "starting",
    "syncing",
    "finalizing",
    "committed",
    "failed",
)
# Disk state values.
QUEUED, RUNNING, DONE = "queued", "running", "done"


def key(*parts: str) -> str:
    return ":".join((PREFIX, *parts))


def connect(url: str) -> redis.Redis:
    # Socket timeouts bound every call: a hung Redis must not hang a lease renewal forever.
    return redis.Redis.from_url(
        url, socket_timeout=10, socket_connect_timeout=5, health_check_interval=30
    )


def _text(value: bytes | str | None) -> str | None:
    if value is None:
        return None
    return value.decode() if isinstance(value, bytes) else value


def _hash_text(raw: dict[Any, Any]) -> dict[str, str]:
    return {_text(k) or "": _text(v) or "" for k, v in raw.items()}


# --------------------------------------------------------------------------- leases

_RENEW = """
if redis.call('get', KEYS[1]) == ARGV[1] then
  return redis.call('pexpire', KEYS[1], ARGV[2])
end
return 0
"""
_RELEASE = """
if redis.call('get', KEYS[1]) == ARGV[1] then
  return redis.call('del', KEYS[1])
end
return 0
"""


class Lease:
    """A Redis key that one holder owns until it expires; renewing proves it is still alive.

    Unlike a lock, a lease ends by itself when its holder dies, which is how the scan
    notices a disk whose worker was killed: no lease, disk not done -> dispatch again.
    """

    def __init__(self, client: redis.Redis, lease_key: str, ttl_s: float) -> None:
        self.client = client
        self.key = lease_key
        self.ttl_ms = max(1000, int(ttl_s * 1000))
        self.token = secrets.token_hex(12)

    def acquire(self) -> bool:
        return bool(self.client.set(self.key, self.token, nx=True, px=self.ttl_ms))

    def renew(self) -> bool:
        return bool(self.client.eval(_RENEW, 1, self.key, self.token, self.ttl_ms))

    def release(self) -> None:
        self.client.eval(_RELEASE, 1, self.key, self.token)

    def held_by_anyone(self) -> bool:
        return bool(self.client.exists(self.key))


class LeaseLost(Exception):
    """The task no longer holds its lease: someone else may be writing, so it must stop."""


class LeaseKeeper:
    """Renews a lease every third of its ttl in a thread; `check()` raises once it is lost."""

    def __init__(self, lease: Lease) -> None:
        self.lease = lease
        self.lost = threading.Event()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name=f"lease {lease.key}", daemon=True)

    def __enter__(self) -> LeaseKeeper:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()

    def check(self) -> None:
        if self.lost.is_set():
            raise LeaseLost(f"lease {self.lease.key} was lost; stopping without writing more")

    def _run(self) -> None:
        interval = self.lease.ttl_ms / 3000
        deadline = time.monotonic() + self.lease.ttl_ms / 1000
        while not self._stop.wait(interval):
            try:
                if not self.lease.renew():
                    self.lost.set()
                    return
                deadline = time.monotonic() + self.lease.ttl_ms / 1000
            except redis.RedisError:
                # Redis unreachable: the lease may expire under us; past its ttl assume lost.
                if time.monotonic() >= deadline:
                    self.lost.set()
                    return


# --------------------------------------------------------------------------- records


@dataclass(frozen=True)
class DiskStatus:
    run_id: str
    disk: str
    fields: dict[str, str]

    @property
    def state(self) -> str:
        return self.fields.get("state", "")

    def number(self, name: str) -> float:
        try:
            return float(self.fields.get(name) or 0)
        except ValueError:
            return 0.0


class State:
    """Typed access to Hamal's Redis keys. Every method is one or a few round trips."""

    def __init__(self, client: redis.Redis) -> None:
        self.r = client

    @classmethod
    def from_url(cls, url: str) -> State:
        return cls(connect(url))

    # leases ---------------------------------------------------------------
    def vm_lease(self, vm_id: str, ttl_s: float) -> Lease:
        return Lease(self.r, key("lease", "vm", vm_id), ttl_s)

    def disk_lease(self, run_id: str, disk: str, ttl_s: float) -> Lease:
        return Lease(self.r, key("lease", "disk", run_id, disk), ttl_s)

    def finalize_lease(self, run_id: str, ttl_s: float) -> Lease:
        return Lease(self.r, key("lease", "finalize", run_id), ttl_s)

    # VMs ------------------------------------------------------------------
    def record_vm(self, vm_id: str, name: str, platform: str) -> None:
        pipe = self.r.pipeline()
        pipe.sadd(key("vms"), vm_id)
        pipe.hset(key("vm", vm_id), mapping={"name": name, "platform": platform})
        pipe.execute()

    def vm(self, vm_id: str) -> dict[str, str]:
        return _hash_text(self.r.hgetall(key("vm", vm_id)))

    def vm_ids(self) -> list[str]:
        return sorted(_text(v) or "" for v in self.r.smembers(key("vms")))

    def set_vm_fields(self, vm_id: str, **fields: str) -> None:
        self.r.hset(key("vm", vm_id), mapping=fields)

    def claim_vm_run(self, vm_id: str, run_id: str) -> bool:
        """Make run_id the VM's active run unless one is active already."""
        return bool(self.r.hsetnx(key("vm", vm_id), "active_run", run_id))

    def clear_vm_run(self, vm_id: str, run_id: str) -> None:
        # Only clear our own run: a late duplicate finalize must not free a newer run.
        if self.vm(vm_id).get("active_run") == run_id:
            self.r.hdel(key("vm", vm_id), "active_run")

    # runs -----------------------------------------------------------------
    def create_run(self, run_id: str, fields: dict[str, str]) -> None:
        pipe = self.r.pipeline()
        pipe.hset(key("run", run_id), mapping={**fields, "status": STARTING})
        pipe.sadd(key("runs", "active"), run_id)
        pipe.execute()

    def run(self, run_id: str) -> dict[str, str]:
        return _hash_text(self.r.hgetall(key("run", run_id)))

    def set_run_fields(self, run_id: str, **fields: str) -> None:
        self.r.hset(key("run", run_id), mapping=fields)

    def active_runs(self) -> list[str]:
        return sorted(_text(v) or "" for v in self.r.smembers(key("runs", "active")))

    def plan_disks(self, run_id: str, disks: dict[str, dict[str, str]]) -> None:
        """Record the disks of a run as queued and pending, in one transaction."""
        pipe = self.r.pipeline()
        now = str(time.time())
        for disk, fields in disks.items():
            pipe.hset(
                key("run", run_id, "disk", disk),
                mapping={**fields, "state": QUEUED, "attempts": "0", "dispatched_at": now},
            )
        if disks:
            pipe.sadd(key("run", run_id, "pending"), *disks)
        pipe.hset(key("run", run_id), mapping={"disks": json.dumps(sorted(disks))})
        pipe.execute()

    def run_disks(self, run_id: str) -> list[str]:
        return list(json.loads(self.run(run_id).get("disks") or "[]"))

    def pending_disks(self, run_id: str) -> list[str]:
        return sorted(_text(v) or "" for v in self.r.smembers(key("run", run_id, "pending")))

    def disk(self, run_id: str, disk: str) -> DiskStatus:
        return DiskStatus(
            run_id, disk, _hash_text(self.r.hgetall(key("run", run_id, "disk", disk)))
        )

    def set_disk_fields(self, run_id: str, disk: str, **fields: str) -> None:
        self.r.hset(key("run", run_id, "disk", disk), mapping=fields)

    def start_disk(self, run_id: str, disk: str, worker: str) -> int:
        pipe = self.r.pipeline()
        k = key("run", run_id, "disk", disk)
        pipe.hset(k, mapping={"state": RUNNING, "started_at": str(time.time()), "worker": worker})
        pipe.hincrby(k, "attempts", 1)
        attempt = int(pipe.execute()[1])
        self.publish({"event": "disk-started", "run_id": run_id, "disk": disk, "attempt": attempt})
        return attempt

    def settle_disk(self, run_id: str, disk: str, fields: dict[str, str]) -> bool:
        """Record a disk's outcome; True when this call settled the run's last pending disk."""
        pipe = self.r.pipeline()
        pipe.hset(key("run", run_id, "disk", disk), mapping=fields)
        pipe.srem(key("run", run_id, "pending"), disk)
        pipe.scard(key("run", run_id, "pending"))
        _, removed, remaining = pipe.execute()
        return bool(removed) and int(remaining) == 0

    def redispatched(self, run_id: str, disk: str) -> None:
        self.r.hset(
            key("run", run_id, "disk", disk),
            mapping={"state": QUEUED, "dispatched_at": str(time.time())},
        )
        self.r.hincrby(key("run", run_id), "redispatches", 1)

    def finish_run(self, run_id: str, vm_id: str, status: str, summary: dict[str, Any]) -> None:
        disks = self.run_disks(run_id)
        pipe = self.r.pipeline()
        pipe.hset(key("run", run_id), mapping={"status": status, "finished": str(time.time())})
        pipe.srem(key("runs", "active"), run_id)
        # A run every interval for every VM: finished records must not pile up in Redis.
        for name in [key("run", run_id), key("run", run_id, "pending")] + [
            key("run", run_id, "disk", d) for d in disks
        ]:
            pipe.expire(name, FINISHED_RUN_TTL_S)
        pipe.lpush(key("history", vm_id), json.dumps(summary, sort_keys=True))
        pipe.ltrim(key("history", vm_id), 0, HISTORY_LENGTH - 1)
        pipe.execute()
        self.clear_vm_run(vm_id, run_id)
        self.publish({"event": "run", "run_id": run_id, "vm_id": vm_id, "status": status})

    def history(self, vm_id: str, count: int = 20) -> list[dict[str, Any]]:
        return [json.loads(v) for v in self.r.lrange(key("history", vm_id), 0, count - 1)]

    # checkpoints ----------------------------------------------------------
    def checkpoint(self, run_id: str, disk: str) -> tuple[dict[str, str], dict[int, bytes]]:
        """(fields, entries) of a disk sync's checkpoint; empty when none was flushed."""
        pipe = self.r.pipeline()
        pipe.hgetall(key("ckpt", run_id, disk))
        pipe.hgetall(key("ckpt", run_id, disk, "entries"))
        fields, entries = pipe.execute()
        return _hash_text(fields), {int(k): bytes(v) for k, v in entries.items()}

    def save_checkpoint(
        self, run_id: str, disk: str, fields: dict[str, str], new_entries: dict[int, bytes]
    ) -> None:
        """Add the entries finished since the last flush; one transaction, so never half-saved."""
        pipe = self.r.pipeline(transaction=True)
        pipe.hset(key("ckpt", run_id, disk), mapping=fields)
        if new_entries:
            pipe.hset(
                key("ckpt", run_id, disk, "entries"),
                mapping={str(i): d for i, d in new_entries.items()},
            )
        pipe.execute()

    def drop_checkpoints(self, run_id: str, disks: Iterable[str]) -> None:
        names = [key("ckpt", run_id, d) for d in disks]
        names += [key("ckpt", run_id, d, "entries") for d in disks]
        if names:
            self.r.delete(*names)

    # snapshot chains ------------------------------------------------------
    def push_chain(self, vm_id: str, disk: str, entry: dict[str, Any]) -> None:
        self.r.rpush(key("chain", vm_id, disk), json.dumps(entry, sort_keys=True))

    def chain(self, vm_id: str, disk: str) -> list[dict[str, Any]]:
        return [json.loads(v) for v in self.r.lrange(key("chain", vm_id, disk), 0, -1)]

    # snapshots the proxy created ------------------------------------------
    def snapshot_created(self, snapshot_key: str, record: dict[str, Any]) -> None:
        self.r.hset(key("snapshots"), snapshot_key, json.dumps(record, sort_keys=True))

    def snapshot_deleted(self, snapshot_key: str) -> None:
        self.r.hdel(key("snapshots"), snapshot_key)

    def live_snapshots(self) -> dict[str, dict[str, Any]]:
        raw = self.r.hgetall(key("snapshots"))
        return {_text(k) or "": json.loads(v) for k, v in raw.items()}

    # scans ----------------------------------------------------------------
    def record_scan(self) -> int:
        pipe = self.r.pipeline()
        pipe.incr(key("scan", "count"))
        pipe.lpush(key("scan", "times"), str(time.time()))
        pipe.ltrim(key("scan", "times"), 0, SCAN_TIMES_LENGTH - 1)
        number = int(pipe.execute()[0])
        self.publish({"event": "scan", "scan": number, "time": time.time()})
        return number

    # events ----------------------------------------------------------------
    def publish(self, event: dict[str, Any]) -> None:
        """Tell whoever listens (tests, `redis-cli subscribe hamal:events`); nobody needs to."""
        self.r.publish(key("events"), json.dumps(event, sort_keys=True))
