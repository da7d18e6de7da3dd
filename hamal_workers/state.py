"""Every Redis key Hamal uses, in one place, with one naming scheme: `hamal:<kind>:<ids>`.

hamal:lease:vm:<vm_id>                    fencing token of the task snapshotting/planning the VM
hamal:lease:disk:<run_id>:<disk>          fencing token of the task writing the disk (renewed)
hamal:lease:finalize:<run_id>             fencing token of the task finalizing the run
hamal:lease:scan                          fencing token of the scan running now
hamal:lease:gc                            fencing token of the garbage collection running now
hamal:lease:mass                          fencing token of the exchange with Mass running now
hamal:fence                               counter: every lease token starts with its next value
hamal:vm:<vm_id>                          hash: name, platform, active_run, last_point,
                                          last_success, failures, base_snapshot ...
hamal:requests                            sorted set: VMs waiting for a vm.sync, by newest point
hamal:vms                                 set of every vm_id seen
hamal:run:<run_id>                        hash: vm_id, vm_name, platform, status, snapshot, ...
hamal:run:<run_id>:pending                set of disks not settled yet; the last SREM finalizes
hamal:run:<run_id>:disk:<disk>            hash: state, attempts, received_by, progress, result
hamal:runs:active                         set of run ids not finished
hamal:ckpt:<run_id>:<disk>                hash: the plan (mode, base point and token, size, chunk
                                          size, chunks to read), the done counter, and gc_ack:
                                          the collector's round its entries cover (reuse_fence.py)
hamal:ckpt:<run_id>:<disk>:entries        list of packed (u32 chunk index, 32-byte name) records
hamal:chain:<vm_id>:<disk>                list of committed {point_id, snapshot_id, token, created}
hamal:history:<vm_id>                     list of finished run summaries, newest first (capped)
hamal:snapshots                           hash: snapshot key -> record of every snapshot the
                                          proxy created and has not deleted yet (for the sweep)
hamal:worker:<hostname>                   a live worker's queues (expires unless renewed)
hamal:scan:count / hamal:scan:times       how many scans ran and when (newest first, capped)
hamal:gc:round                            the collector's newest published round (a copy: the
                                          store's gc record is the authority)
hamal:gc:last / hamal:gc:history          the last garbage collection's report / recent ones
hamal:gc:due                              set when points were deleted: collect at the next scan
hamal:gc:sent                             a pass was sent and may wait in the queue (expires)
hamal:rate:<name>                         sorted set: the calls of the last window to a rate-
                                          limited service, by time (e.g. a FusionCompute VRM)
hamal:slots:<name>                        sorted set: holders of a limited resource (sockets
                                          to one host), by when their hold expires unless renewed
hamal:held:<platform>:<snapshot id>       hash: what a platform opened for a snapshot and must
                                          release (a backup resource's URI -> {disk, made}),
                                          so that the attempt after a killed one releases it
hamal:mass:tasks                          hash: task id -> the verified Mass task without its
                                          source (mass.TaskView JSON)
hamal:mass:sources                        hash: task id -> its source (credentials), sealed
                                          with the proxy's own key (mass.SourceKey)
hamal:mass:retired                        hash: task id -> a task Mass no longer lists, kept
                                          (with its source) until its VM's base is deleted
hamal:mass:versions                       hash: task id -> highest version accepted (kept after
                                          a removal: an older document is a replay)
hamal:mass:outbox / hamal:mass:reports    sorted set of status reports waiting for Mass, by
                                          time; hash: report id -> report JSON
hamal:mass:progress                       hash: task id -> its waiting progress report's id
                                          (one at most: a newer progress replaces it)
hamal:mass:progress-sent:<task id>        set while the task's last progress report is younger
                                          than [period] task_update_wait_time
hamal:mass:refused                        hash: refused document's digest -> when reported
hamal:mass:link                           hash: how Mass answers: unreachable_since,
                                          next_attempt, failures, registered, last_contact
hamal:events                              pub/sub: scan, vm-sync, run-started, disk-started,
                                          disk (settled), run, retention, gc

Data never goes through Redis: only identities, plans, chunk names and counters.

Fencing: a lease's token grows on every acquire and is unique, and every state write
of a task that holds a lease is applied by one Lua script that first checks the lease
still holds that token -- so a worker paused past its lease (or one that survived a
flush of Redis) cannot write a thing, not even half of a batch.
"""

from __future__ import annotations

import json
import secrets
import struct
import threading
import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any

import redis

PREFIX = "hamal"
HISTORY_LENGTH = 200
# Finished runs stay readable for a week (hamal status, debugging); history keeps summaries.
FINISHED_RUN_TTL_S = 7 * 24 * 3600
SCAN_TIMES_LENGTH = 1000
GC_HISTORY_LENGTH = 50
DEFAULT_SOCKET_TIMEOUT_S = 5.0

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

_ENTRY = struct.Struct(">I32s")
_ZERO_NAME = bytes(32)


def key(*parts: str) -> str:
    return ":".join((PREFIX, *parts))


def connect(url: str, socket_timeout: float = DEFAULT_SOCKET_TIMEOUT_S) -> redis.Redis:
    # Socket timeouts bound every call: a hung Redis must not hang a lease renewal forever.
    return redis.Redis.from_url(
        url,
        socket_timeout=socket_timeout,
        socket_connect_timeout=min(5.0, socket_timeout),
        health_check_interval=30,
    )


def _text(value: bytes | str | None) -> str | None:
    if value is None:
        return None
    return value.decode() if isinstance(value, bytes) else value


def _hash_text(raw: dict[Any, Any]) -> dict[str, str]:
    return {_text(k) or "": _text(v) or "" for k, v in raw.items()}


def _number(text: str | None) -> float:
    try:
        return float(text or 0)
    except ValueError:
        return 0.0


# --------------------------------------------------------------------------- batches

# Applies a batch of commands only while KEYS[1] holds ARGV[1] (the fence); "" = no fence.
# ARGV: fence token, op count, then per op: arg count, command, args... Binary-safe, and
# all-or-nothing (a script runs atomically). Two pseudo-commands keep conditional writes in
# the same batch: HDELIFEQ key field value, and HSETIFEXISTS key field value ...
_APPLY = """
if ARGV[1] ~= '' and redis.call('get', KEYS[1]) ~= ARGV[1] then
  return redis.error_reply('FENCED lease lost')
end
local i = 2
local count = tonumber(ARGV[i]); i = i + 1
local out = {}
for n = 1, count do
  local argc = tonumber(ARGV[i]); i = i + 1
  local args = {}
  for k = 1, argc do args[k] = ARGV[i]; i = i + 1 end
  local cmd = string.upper(args[1])
  if cmd == 'HDELIFEQ' then
    if redis.call('hget', args[2], args[3]) == args[4] then
      out[n] = redis.call('hdel', args[2], args[3])
    else
      out[n] = 0
    end
  elseif cmd == 'HSETIFEXISTS' then
    if redis.call('exists', args[2]) == 1 then
      out[n] = redis.call('hset', unpack(args, 2))
    else
      out[n] = 0
    end
  else
    out[n] = redis.call(unpack(args))
  end
end
return out
"""

Arg = str | bytes | int | float


class Writes:
    """Redis writes applied together, all or nothing, optionally fenced by a lease."""

    def __init__(self) -> None:
        self.ops: list[tuple[Arg, ...]] = []

    def add(self, *args: Arg) -> int:
        """Append one command; its result is at this index in what `State.apply` returns."""
        self.ops.append(args)
        return len(self.ops) - 1

    def hset(self, name: str, mapping: dict[str, Arg]) -> int:
        flat: list[Arg] = []
        for field, value in mapping.items():
            flat += [field, value]
        return self.add("HSET", name, *flat)

    def hset_if_exists(self, name: str, mapping: dict[str, Arg]) -> int:
        flat: list[Arg] = []
        for field, value in mapping.items():
            flat += [field, value]
        return self.add("HSETIFEXISTS", name, *flat)

    def hdel_if_equal(self, name: str, field: str, value: str) -> int:
        return self.add("HDELIFEQ", name, field, value)

    def publish(self, event: dict[str, Any]) -> int:
        return self.add("PUBLISH", key("events"), json.dumps(event, sort_keys=True))


class LeaseLost(Exception):
    """The task no longer holds its lease: someone else may be writing, so it must stop."""


# --------------------------------------------------------------------------- leases

_ACQUIRE = """
if redis.call('exists', KEYS[1]) == 1 then return false end
local token = redis.call('incr', KEYS[2]) .. '-' .. ARGV[2]
redis.call('set', KEYS[1], token, 'PX', ARGV[1])
return token
"""
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
    Its token is a fencing token: it grows on every acquire (and carries random bits,
    so a flush of Redis that resets the counter cannot hand out an old one again).
    """

    def __init__(self, client: redis.Redis, lease_key: str, ttl_s: float) -> None:
        self.client = client
        self.key = lease_key
        self.ttl_ms = max(1000, int(ttl_s * 1000))
        self.token = ""
        self.acquired_at = 0.0

    def acquire(self) -> bool:
        started = time.monotonic()
        token = self.client.eval(
            _ACQUIRE, 2, self.key, key("fence"), self.ttl_ms, secrets.token_hex(6)
        )
        if not token:
            return False
        self.token = _text(token) or ""
        self.acquired_at = started
        return True

    def renew(self) -> bool:
        return bool(self.client.eval(_RENEW, 1, self.key, self.token, self.ttl_ms))

    def release(self) -> None:
        if self.token:
            self.client.eval(_RELEASE, 1, self.key, self.token)

    def held_by_anyone(self) -> bool:
        return bool(self.client.exists(self.key))


class LeaseKeeper:
    """Renews a lease every third of its ttl in a thread; `check()` raises once it is lost.

    `check()` also trusts nothing it has not seen lately: past the lease's ttl since the
    last renewal that succeeded, the lease counts as lost even if the renewing thread is
    stuck in a Redis call or the whole process was paused.
    """

    def __init__(self, lease: Lease) -> None:
        self.lease = lease
        self.lost = threading.Event()
        self._stop = threading.Event()
        self._renewed = lease.acquired_at or time.monotonic()
        self._thread = threading.Thread(target=self._run, name=f"lease {lease.key}", daemon=True)

    def __enter__(self) -> LeaseKeeper:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()

    def check(self) -> None:
        if not self.lost.is_set() and time.monotonic() - self._renewed >= self.lease.ttl_ms / 1000:
            self.lost.set()
        if self.lost.is_set():
            raise LeaseLost(f"lease {self.lease.key} was lost; stopping without writing more")

    def _run(self) -> None:
        interval = self.lease.ttl_ms / 3000
        while not self._stop.wait(interval):
            try:
                attempt = time.monotonic()
                if not self.lease.renew():
                    self.lost.set()
                    return
                self._renewed = attempt
            except redis.RedisError:
                # Redis unreachable: the lease may expire under us; check() says when.
                if time.monotonic() - self._renewed >= self.lease.ttl_ms / 1000:
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
        return _number(self.fields.get(name))


@dataclass(frozen=True)
class CheckpointEntries:
    """Chunk index -> chunk name (None for a zero chunk) of what a disk sync stored."""

    entries: dict[int, bytes | None]


@dataclass(frozen=True)
class RunningCheckpoint:
    run_id: str
    disk: str
    fields: dict[str, str]
    entries: bytes  # packed (u32 chunk index, 32-byte name) records

    @property
    def gc_ack(self) -> int:
        value = self.fields.get("gc_ack", "")
        return int(value) if value.isdigit() else 0


# The fleet's calls to one service in the last window: take a place, or say how long until one
# frees. Redis' own clock, so that proxies whose clocks differ share one window.
_RATE_TAKE = """
local now = redis.call('time')
local now_ms = tonumber(now[1]) * 1000 + math.floor(tonumber(now[2]) / 1000)
local window = tonumber(ARGV[2])
redis.call('zremrangebyscore', KEYS[1], '-inf', now_ms - window)
if redis.call('zcard', KEYS[1]) < tonumber(ARGV[1]) then
  redis.call('zadd', KEYS[1], now_ms, ARGV[3])
  redis.call('pexpire', KEYS[1], window)
  return 0
end
local oldest = redis.call('zrange', KEYS[1], 0, 0, 'withscores')
return math.max(1, tonumber(oldest[2]) + window - now_ms)
"""

# A counting semaphore whose holds expire: a holder killed with its slot frees it when the
# hold runs out. ARGV: limit, hold ms, holder. 1 = taken (or renewed), 0 = all taken.
_SLOT_TAKE = """
local now = redis.call('time')
local now_ms = tonumber(now[1]) * 1000 + math.floor(tonumber(now[2]) / 1000)
redis.call('zremrangebyscore', KEYS[1], '-inf', now_ms)
if redis.call('zscore', KEYS[1], ARGV[3]) or redis.call('zcard', KEYS[1]) < tonumber(ARGV[1]) then
  redis.call('zadd', KEYS[1], now_ms + tonumber(ARGV[2]), ARGV[3])
  redis.call('pexpire', KEYS[1], tonumber(ARGV[2]) * 2)
  return 1
end
return 0
"""
_SLOT_RENEW = """
local now = redis.call('time')
local now_ms = tonumber(now[1]) * 1000 + math.floor(tonumber(now[2]) / 1000)
if not redis.call('zscore', KEYS[1], ARGV[2]) then return 0 end
redis.call('zadd', KEYS[1], now_ms + tonumber(ARGV[1]), ARGV[2])
redis.call('pexpire', KEYS[1], tonumber(ARGV[1]) * 2)
return 1
"""


class CallRate:
    """At most `limit` calls per `window_s` to one service from the whole fleet."""

    def __init__(self, client: redis.Redis, name: str, limit: int, window_s: float = 60.0) -> None:
        self.r = client
        self.name = name
        self.key = key("rate", name)
        self.limit = limit
        self.window_ms = max(1, int(window_s * 1000))
        self._take = client.register_script(_RATE_TAKE)

    def wait_s(self) -> float:
        """0 when this call may go now (and is counted), else how long until a place frees."""
        wait_ms = self._take([self.key], [self.limit, self.window_ms, secrets.token_hex(8)])
        return int(wait_ms) / 1000

    def take(self, sleep: Any = time.sleep) -> float:
        """Block until this call may go; the seconds waited."""
        waited = 0.0
        while (wait := self.wait_s()) > 0:
            # Asked again at least every second: a window another proxy emptied (or Redis
            # lost) frees places earlier than the oldest call says.
            sleep(min(wait, 1.0))
            waited += min(wait, 1.0)
        return waited


class Slots:
    """At most `limit` holders of one resource across the fleet; a hold lasts `hold_s` unless
    renewed, so that a killed holder's slot comes back by itself."""

    def __init__(self, client: redis.Redis, name: str, limit: int, hold_s: float) -> None:
        self.key = key("slots", name)
        self.limit = limit
        self.hold_ms = max(1, int(hold_s * 1000))
        self._take = client.register_script(_SLOT_TAKE)
        self._renew = client.register_script(_SLOT_RENEW)
        self.r = client

    def try_take(self, holder: str) -> bool:
        return bool(self._take([self.key], [self.limit, self.hold_ms, holder]))

    def renew(self, holder: str) -> bool:
        """False when the hold had run out (the slot may be someone else's now)."""
        return bool(self._renew([self.key], [self.hold_ms, holder]))

    def release(self, holder: str) -> None:
        self.r.zrem(self.key, holder)

    def holders(self) -> int:
        return int(self.r.zcount(self.key, f"({int(time.time() * 1000)}", "+inf"))


class State:
    """Typed access to Hamal's Redis keys. Every method is one or a few round trips."""

    def __init__(self, client: redis.Redis) -> None:
        self.r = client
        self._apply = client.register_script(_APPLY)

    @classmethod
    def from_url(cls, url: str, socket_timeout: float = DEFAULT_SOCKET_TIMEOUT_S) -> State:
        return cls(connect(url, socket_timeout))

    # batches --------------------------------------------------------------
    def apply(self, writes: Writes, fence: Lease | None = None) -> list[Any]:
        """Apply every write of the batch atomically; LeaseLost when `fence` no longer holds."""
        if not writes.ops:
            return []
        args: list[Arg] = [fence.token if fence else "", len(writes.ops)]
        for op in writes.ops:
            args += [len(op), *op]
        try:
            return list(self._apply(keys=[fence.key if fence else key("nofence")], args=args))
        except redis.ResponseError as exc:
            if "FENCED" in str(exc):
                where = fence.key if fence else "?"
                raise LeaseLost(f"lease {where} is no longer ours; nothing was written") from None
            raise

    # leases ---------------------------------------------------------------
    def vm_lease(self, vm_id: str, ttl_s: float) -> Lease:
        return Lease(self.r, key("lease", "vm", vm_id), ttl_s)

    def disk_lease(self, run_id: str, disk: str, ttl_s: float) -> Lease:
        return Lease(self.r, key("lease", "disk", run_id, disk), ttl_s)

    def finalize_lease(self, run_id: str, ttl_s: float) -> Lease:
        return Lease(self.r, key("lease", "finalize", run_id), ttl_s)

    def mass_lease(self, ttl_s: float) -> Lease:
        return Lease(self.r, key("lease", "mass"), ttl_s)

    def scan_lease(self, ttl_s: float) -> Lease:
        return Lease(self.r, key("lease", "scan"), ttl_s)

    def leases_held(self, lease_keys: Sequence[str]) -> list[bool]:
        pipe = self.r.pipeline(transaction=False)
        for name in lease_keys:
            pipe.exists(name)
        return [bool(v) for v in pipe.execute()]

    # VMs ------------------------------------------------------------------
    def record_vms(self, vms: Iterable[tuple[str, str, str]]) -> None:
        """Remember (vm_id, name, platform) of every VM a scan found, in one round trip."""
        pipe = self.r.pipeline(transaction=False)
        ids = []
        for vm_id, name, platform in vms:
            ids.append(vm_id)
            pipe.hset(key("vm", vm_id), mapping={"name": name, "platform": platform})
        if ids:
            pipe.sadd(key("vms"), *ids)
        pipe.execute()

    def record_vm(self, vm_id: str, name: str, platform: str) -> None:
        self.record_vms([(vm_id, name, platform)])

    def vm(self, vm_id: str) -> dict[str, str]:
        return _hash_text(self.r.hgetall(key("vm", vm_id)))

    def vms(self, vm_ids: Sequence[str]) -> list[dict[str, str]]:
        pipe = self.r.pipeline(transaction=False)
        for vm_id in vm_ids:
            pipe.hgetall(key("vm", vm_id))
        return [_hash_text(raw) for raw in pipe.execute()]

    def vm_ids(self) -> list[str]:
        return sorted(_text(v) or "" for v in self.r.smembers(key("vms")))

    def set_vm_fields(self, vm_id: str, **fields: str) -> None:
        self.r.hset(key("vm", vm_id), mapping=fields)

    # sync requests ----------------------------------------------------------
    def request_syncs(self, due: Sequence[tuple[str, float]]) -> int:
        """Queue (vm_id, newest point time) requests; one per VM. Returns how many are new.

        A sorted set, not a message per VM: the scan decides in one round trip, a VM has
        at most one request waiting, and workers take the oldest newest point first.
        """
        if not due:
            return 0
        added = 0
        pipe = self.r.pipeline(transaction=False)
        for start in range(0, len(due), 5000):
            batch = {vm_id: score for vm_id, score in due[start : start + 5000]}
            pipe.zadd(key("requests"), batch, nx=True)
        for count in pipe.execute():
            added += int(count)
        return added

    def take_request(self) -> str | None:
        """The waiting request with the oldest newest point, removed; None when none waits."""
        popped = self.r.zpopmin(key("requests"))
        return _text(popped[0][0]) if popped else None

    def requests_waiting(self) -> int:
        return int(self.r.zcard(key("requests")))

    def requested(self, vm_id: str) -> bool:
        return self.r.zscore(key("requests"), vm_id) is not None

    # runs -----------------------------------------------------------------
    def start_run(self, writes: Writes, vm_id: str, run_id: str, fields: dict[str, str]) -> None:
        """Claim the VM for the run and create the run: one write, so never one without the other.

        The caller holds the VM's lease, which is what makes the claim exclusive.
        """
        writes.hset(key("vm", vm_id), {"active_run": run_id})
        writes.hset(key("run", run_id), {**fields, "status": STARTING})
        writes.add("SADD", key("runs", "active"), run_id)
        self._mass_report(writes, vm_id, "syncing", run_id=run_id)

    def run(self, run_id: str) -> dict[str, str]:
        return _hash_text(self.r.hgetall(key("run", run_id)))

    def runs(self, run_ids: Sequence[str]) -> list[dict[str, str]]:
        pipe = self.r.pipeline(transaction=False)
        for run_id in run_ids:
            pipe.hgetall(key("run", run_id))
        return [_hash_text(raw) for raw in pipe.execute()]

    def set_run_fields(self, run_id: str, fence: Lease | None = None, **fields: str) -> None:
        writes = Writes()
        writes.hset(key("run", run_id), dict(fields))
        self.apply(writes, fence)

    def active_runs(self) -> list[str]:
        return sorted(_text(v) or "" for v in self.r.smembers(key("runs", "active")))

    def plan_disks(self, writes: Writes, run_id: str, disks: Sequence[str]) -> None:
        """Record the disks of a run as queued and pending."""
        now = str(time.time())
        for disk in disks:
            writes.hset(
                key("run", run_id, "disk", disk),
                {"state": QUEUED, "attempts": "0", "dispatched_at": now},
            )
        if disks:
            writes.add("SADD", key("run", run_id, "pending"), *disks)
        writes.hset(key("run", run_id), {"disks": json.dumps(sorted(disks))})

    def run_disks(self, run_id: str) -> list[str]:
        return list(json.loads(self.run(run_id).get("disks") or "[]"))

    def pending_disks(self, run_id: str) -> list[str]:
        return sorted(_text(v) or "" for v in self.r.smembers(key("run", run_id, "pending")))

    def pending_of(self, run_ids: Sequence[str]) -> list[list[str]]:
        pipe = self.r.pipeline(transaction=False)
        for run_id in run_ids:
            pipe.smembers(key("run", run_id, "pending"))
        return [sorted(_text(v) or "" for v in members) for members in pipe.execute()]

    def disk(self, run_id: str, disk: str) -> DiskStatus:
        return DiskStatus(
            run_id, disk, _hash_text(self.r.hgetall(key("run", run_id, "disk", disk)))
        )

    def disks(self, pairs: Sequence[tuple[str, str]]) -> list[DiskStatus]:
        pipe = self.r.pipeline(transaction=False)
        for run_id, disk in pairs:
            pipe.hgetall(key("run", run_id, "disk", disk))
        return [
            DiskStatus(run_id, disk, _hash_text(raw))
            for (run_id, disk), raw in zip(pairs, pipe.execute(), strict=True)
        ]

    def set_disk_fields(
        self, run_id: str, disk: str, fence: Lease | None = None, **fields: str
    ) -> None:
        writes = Writes()
        writes.hset(key("run", run_id, "disk", disk), dict(fields))
        self.apply(writes, fence)

    def disk_received(self, run_id: str, disk: str, worker: str) -> None:
        """A worker took the disk's message from the queue (it may not run it yet)."""
        writes = Writes()
        writes.hset_if_exists(
            key("run", run_id, "disk", disk),
            {"received_by": worker, "received_at": str(time.time())},
        )
        self.apply(writes)

    def start_disk(self, run_id: str, disk: str, worker: str, fence: Lease) -> int:
        writes = Writes()
        name = key("run", run_id, "disk", disk)
        writes.hset(
            name, {"state": RUNNING, "started_at": str(time.time()), "worker": worker, "error": ""}
        )
        at = writes.add("HINCRBY", name, "attempts", 1)
        attempt = int(self.apply(writes, fence)[at])
        self.publish({"event": "disk-started", "run_id": run_id, "disk": disk, "attempt": attempt})
        return attempt

    def settle_disk(
        self, run_id: str, disk: str, fields: dict[str, str], fence: Lease | None = None
    ) -> bool:
        """Record a disk's outcome; True when this call settled the run's last pending disk."""
        writes = Writes()
        writes.hset(key("run", run_id, "disk", disk), dict(fields))
        removed = writes.add("SREM", key("run", run_id, "pending"), disk)
        remaining = writes.add("SCARD", key("run", run_id, "pending"))
        event = {"event": "disk", "run_id": run_id, "disk": disk, "state": fields.get("state")}
        writes.publish(event)
        out = self.apply(writes, fence)
        return bool(out[removed]) and int(out[remaining]) == 0

    def settle_disk_if_queued(self, run_id: str, disk: str, fields: dict[str, str]) -> bool:
        """Settle a disk nobody runs (its retries ran out); True if it was the last pending."""
        name = key("run", run_id, "disk", disk)
        with self.r.pipeline(transaction=True) as pipe:
            try:
                pipe.watch(name)
                if _text(pipe.hget(name, "state")) != QUEUED:
                    return False
                pipe.multi()
                pipe.hset(name, mapping=fields)
                pipe.srem(key("run", run_id, "pending"), disk)
                pipe.scard(key("run", run_id, "pending"))
                _, removed, remaining = pipe.execute()
            except redis.WatchError:
                return False
        return bool(removed) and int(remaining) == 0

    def requeue_disks(self, run_id: str, disks: Sequence[str], fence: Lease, reason: str) -> None:
        """Put settled disks back to sync again (their staged manifest was lost)."""
        writes = Writes()
        now = str(time.time())
        for disk in disks:
            writes.hset(
                key("run", run_id, "disk", disk),
                {"state": QUEUED, "dispatched_at": now, "error": reason},
            )
            writes.add("HDEL", key("run", run_id, "disk", disk), "received_by", "received_at")
        writes.add("SADD", key("run", run_id, "pending"), *disks)
        writes.hset(key("run", run_id), {"status": SYNCING})
        writes.add("HINCRBY", key("run", run_id), "restaged", 1)
        self.apply(writes, fence)

    def redispatched(self, run_id: str, disk: str) -> None:
        pipe = self.r.pipeline(transaction=True)
        name = key("run", run_id, "disk", disk)
        pipe.hset(name, mapping={"state": QUEUED, "dispatched_at": str(time.time())})
        pipe.hdel(name, "received_by", "received_at")
        pipe.hincrby(key("run", run_id), "redispatches", 1)
        pipe.execute()

    def finish_run(
        self,
        run_id: str,
        vm_id: str,
        status: str,
        summary: dict[str, Any],
        fence: Lease | None = None,
        vm_fields: dict[str, str] | None = None,
    ) -> None:
        """End the run, free the VM's claim and record the summary: one atomic write."""
        disks = self.run_disks(run_id)
        writes = Writes()
        run_key = key("run", run_id)
        writes.hset(run_key, {"status": status, "finished": str(time.time())})
        writes.add("SREM", key("runs", "active"), run_id)
        # A run every interval for every VM: finished records must not pile up in Redis.
        for name in [run_key, key("run", run_id, "pending")] + [
            key("run", run_id, "disk", d) for d in disks
        ]:
            writes.add("EXPIRE", name, FINISHED_RUN_TTL_S)
        writes.add("LPUSH", key("history", vm_id), json.dumps(summary, sort_keys=True))
        writes.add("LTRIM", key("history", vm_id), 0, HISTORY_LENGTH - 1)
        # Only our own claim: a late duplicate finalize must not free a newer run.
        vm_key = key("vm", vm_id)
        writes.hdel_if_equal(vm_key, "active_run", run_id)
        # Runs ended per status, for `hamal metrics` (counters: they only grow).
        writes.add("HINCRBY", vm_key, f"runs_{status}", 1)
        if status == FAILED:
            # The scan backs off a VM by its consecutive failures (see tasks/scan.py).
            writes.add("HINCRBY", vm_key, "failures", 1)
            error = str(summary.get("error", ""))[:500]
            writes.hset(vm_key, {"last_failed_at": str(time.time()), "last_error": error})
        else:
            writes.hset(vm_key, {"failures": "0"})
            writes.add("HDEL", vm_key, "last_error", "target_full_free")
        if vm_fields:
            writes.hset(vm_key, vm_fields)
        disk_stats = [d for d in (summary.get("disks") or {}).values() if isinstance(d, dict)]
        self._mass_report(
            writes, vm_id, "committed" if status == COMMITTED else "failed", run_id=run_id,
            point_id=run_id if status == COMMITTED else None,
            error=str(summary.get("error") or "")[:500] if status == FAILED else None,
            bytes_read=sum(int(float(d.get("bytes_read") or 0)) for d in disk_stats),
            bytes_stored=sum(int(float(d.get("bytes_stored") or 0)) for d in disk_stats),
        )  # fmt: skip
        event = {"event": "run", "run_id": run_id, "vm_id": vm_id, "status": status}
        if "retention" in summary:
            event["retention"] = summary["retention"]
        writes.publish(event)
        self.apply(writes, fence)

    def free_claim(self, vm_id: str, run_id: str) -> bool:
        """Free a claim whose run is gone or finished; True when it was freed."""
        writes = Writes()
        at = writes.hdel_if_equal(key("vm", vm_id), "active_run", run_id)
        return bool(self.apply(writes)[at])

    def history(self, vm_id: str, count: int = 20) -> list[dict[str, Any]]:
        return [json.loads(v) for v in self.r.lrange(key("history", vm_id), 0, count - 1)]

    # checkpoints ----------------------------------------------------------
    def checkpoint(self, run_id: str, disk: str) -> tuple[dict[str, str], dict[int, bytes | None]]:
        """(fields, entries) of a disk sync's checkpoint; empty when none was flushed."""
        pipe = self.r.pipeline(transaction=False)
        pipe.hgetall(key("ckpt", run_id, disk))
        pipe.lrange(key("ckpt", run_id, disk, "entries"), 0, -1)
        fields, blobs = pipe.execute()
        entries: dict[int, bytes | None] = {}
        for blob in blobs:
            for index, name in _ENTRY.iter_unpack(blob):
                entries[index] = None if name == _ZERO_NAME else name
        return _hash_text(fields), entries

    def start_checkpoint(
        self, run_id: str, disk: str, fields: dict[str, str], fence: Lease | None = None
    ) -> None:
        writes = Writes()
        writes.add("DEL", key("ckpt", run_id, disk), key("ckpt", run_id, disk, "entries"))
        writes.hset(key("ckpt", run_id, disk), dict(fields))
        self.apply(writes, fence)

    def save_checkpoint(
        self,
        run_id: str,
        disk: str,
        fields: dict[str, str],
        new_entries: dict[int, bytes | None],
        fence: Lease | None = None,
    ) -> None:
        """Add the entries finished since the last flush; one write, so never half-saved."""
        writes = Writes()
        writes.hset(key("ckpt", run_id, disk), dict(fields))
        if new_entries:
            blob = b"".join(
                _ENTRY.pack(index, name or _ZERO_NAME) for index, name in new_entries.items()
            )
            writes.add("RPUSH", key("ckpt", run_id, disk, "entries"), blob)
        self.apply(writes, fence)

    def drop_checkpoint(self, writes: Writes, run_id: str, disks: Iterable[str]) -> None:
        names: list[Arg] = []
        for d in disks:
            names += [key("ckpt", run_id, d), key("ckpt", run_id, d, "entries")]
        if names:
            writes.add("DEL", *names)

    def drop_checkpoints(self, run_id: str, disks: Iterable[str]) -> None:
        writes = Writes()
        self.drop_checkpoint(writes, run_id, disks)
        self.apply(writes)

    def running_checkpoints(self) -> list[RunningCheckpoint]:
        """The checkpoint of every disk of every active run, each read in one transaction.

        For garbage collection: a disk's gc_ack and its entries are written together, so
        reading them together gives entries that cover the round the ack says.
        """
        runs = self.active_runs()
        pipe = self.r.pipeline(transaction=False)
        for run_id in runs:
            pipe.hget(key("run", run_id), "disks")
        pairs = [
            (run_id, disk)
            for run_id, disks in zip(runs, pipe.execute(), strict=True)
            for disk in json.loads(_text(disks) or "[]")
        ]
        found = []
        for start in range(0, len(pairs), 100):
            batch = pairs[start : start + 100]
            pipe = self.r.pipeline(transaction=True)
            for run_id, disk in batch:
                pipe.hgetall(key("ckpt", run_id, disk))
                pipe.lrange(key("ckpt", run_id, disk, "entries"), 0, -1)
            replies = pipe.execute()
            for i, (run_id, disk) in enumerate(batch):
                fields, blobs = _hash_text(replies[2 * i]), replies[2 * i + 1]
                if fields:
                    found.append(RunningCheckpoint(run_id, disk, fields, b"".join(blobs)))
        return found

    def running_bases(self, vm_id: str | None = None) -> dict[str, dict[str, str]]:
        """vm_id -> {point_id: run_id} of every point a running disk sync diffs from.

        With vm_id, only that VM's run (a VM has at most one): what finalize needs after
        every commit, without reading every active run of the fleet.
        """
        if vm_id is None:
            runs = self.active_runs()
        else:
            runs = [run for run in [self.vm(vm_id).get("active_run", "")] if run]
        records = self.runs(runs)
        pairs = [
            (run_id, record.get("vm_id", ""), disk)
            for run_id, record in zip(runs, records, strict=True)
            for disk in json.loads(record.get("disks") or "[]")
        ]
        pipe = self.r.pipeline(transaction=False)
        for run_id, _, disk in pairs:
            pipe.hget(key("ckpt", run_id, disk), "base_point")
        bases: dict[str, dict[str, str]] = {}
        for (run_id, vm_id, _), base in zip(pairs, pipe.execute(), strict=True):
            if base:
                bases.setdefault(vm_id, {})[_text(base) or ""] = run_id
        return bases

    # garbage collection ---------------------------------------------------
    def gc_lease(self, ttl_s: float) -> Lease:
        return Lease(self.r, key("lease", "gc"), ttl_s)

    def gc_round(self) -> int:
        """The collector's newest published round as Redis last heard it (0 when unknown)."""
        value = _text(self.r.get(key("gc", "round")))
        return int(value) if value and value.isdigit() else 0

    def set_gc_round(self, gc_round: int) -> None:
        self.r.set(key("gc", "round"), str(gc_round))

    def gc_due(self) -> None:
        self.r.set(key("gc", "due"), str(time.time()))

    def take_gc_due(self) -> bool:
        return bool(self.r.delete(key("gc", "due")))

    def claim_gc_send(self, ttl_s: float) -> bool:
        """True for one caller per ttl: a pass waiting in the queue is not sent twice."""
        return bool(self.r.set(key("gc", "sent"), str(time.time()), nx=True, px=int(ttl_s * 1000)))

    def gc_taken(self) -> None:
        """The pass sent is running: the next scan may send the one after it."""
        self.r.delete(key("gc", "sent"))

    def gc_is_due(self) -> bool:
        return bool(self.r.exists(key("gc", "due")))

    def record_gc(self, report: dict[str, Any]) -> None:
        text = json.dumps(report, sort_keys=True)
        pipe = self.r.pipeline()
        pipe.set(key("gc", "last"), text)
        pipe.lpush(key("gc", "history"), text)
        pipe.ltrim(key("gc", "history"), 0, GC_HISTORY_LENGTH - 1)
        pipe.execute()

    def gc_history(self) -> list[dict[str, Any]]:
        """Reports of the recent garbage collection passes, newest first."""
        return [json.loads(v) for v in self.r.lrange(key("gc", "history"), 0, -1)]

    def last_gc(self) -> dict[str, Any]:
        text = _text(self.r.get(key("gc", "last")))
        return dict(json.loads(text)) if text else {}

    # snapshot chains ------------------------------------------------------
    def push_chain(self, writes: Writes, vm_id: str, disk: str, entry: dict[str, Any]) -> None:
        writes.add("RPUSH", key("chain", vm_id, disk), json.dumps(entry, sort_keys=True))
        writes.add("LTRIM", key("chain", vm_id, disk), -HISTORY_LENGTH, -1)

    def chain(self, vm_id: str, disk: str) -> list[dict[str, Any]]:
        return [json.loads(v) for v in self.r.lrange(key("chain", vm_id, disk), 0, -1)]

    # snapshots the proxy created ------------------------------------------
    def snapshot_created(
        self, snapshot_key: str, record: dict[str, Any], fence: Lease | None = None
    ) -> None:
        writes = Writes()
        writes.add("HSET", key("snapshots"), snapshot_key, json.dumps(record, sort_keys=True))
        self.apply(writes, fence)

    def snapshot_deleted(self, snapshot_key: str) -> None:
        self.r.hdel(key("snapshots"), snapshot_key)

    # counters of the whole proxy, for `hamal metrics` ------------------------------
    def count(self, name: str, amount: int = 1) -> None:
        self.r.hincrby(key("counters"), name, amount)

    def counters(self) -> dict[str, int]:
        return {k: int(v) for k, v in _hash_text(self.r.hgetall(key("counters"))).items()}

    def leftover_listing_due(self, platform: str, every_s: float) -> bool:
        """True at most once per `every_s` for a platform (and at once after Redis was lost,
        when the platform's own listing is all the sweep has)."""
        if every_s <= 0:
            return True
        return bool(
            self.r.set(key("leftovers-listed", platform), "1", nx=True, ex=max(1, int(every_s)))
        )

    def live_snapshots(self) -> dict[str, dict[str, Any]]:
        raw = self.r.hgetall(key("snapshots"))
        return {_text(k) or "": json.loads(v) for k, v in raw.items()}

    # workers ----------------------------------------------------------------
    def worker_alive(
        self, hostname: str, queues: Sequence[str], concurrency: int, ttl_s: float
    ) -> None:
        record = json.dumps({"queues": sorted(queues), "concurrency": concurrency})
        self.r.set(key("worker", hostname), record, px=int(ttl_s * 1000))

    def worker_gone(self, hostname: str) -> None:
        self.r.delete(key("worker", hostname))

    def live_workers(self) -> dict[str, dict[str, Any]]:
        """hostname -> {queues, concurrency} of every worker whose presence has not expired."""
        names = list(self.r.scan_iter(match=key("worker", "*"), count=1000))
        if not names:
            return {}
        values = self.r.mget(names)
        prefix = len(key("worker", ""))
        return {
            (_text(n) or "")[prefix:]: json.loads(v)
            for n, v in zip(names, values, strict=True)
            if v
        }

    # scans ----------------------------------------------------------------
    def record_scan(self) -> int:
        pipe = self.r.pipeline()
        pipe.incr(key("scan", "count"))
        pipe.lpush(key("scan", "times"), str(time.time()))
        pipe.ltrim(key("scan", "times"), 0, SCAN_TIMES_LENGTH - 1)
        return int(pipe.execute()[0])

    # limits shared by the fleet ------------------------------------------------------
    def call_rate(self, name: str, limit: int, window_s: float = 60.0) -> CallRate:
        return CallRate(self.r, name, limit, window_s)

    def slots(self, name: str, limit: int, hold_s: float) -> Slots:
        return Slots(self.r, name, limit, hold_s)

    def hold(self, platform: str, snapshot_id: str, name: str, record: dict[str, Any]) -> None:
        self.r.hset(key("held", platform, snapshot_id), name, json.dumps(record, sort_keys=True))

    def held(self, platform: str, snapshot_id: str) -> dict[str, dict[str, Any]]:
        raw = self.r.hgetall(key("held", platform, snapshot_id))
        return {_text(k) or "": json.loads(v) for k, v in raw.items()}

    def unhold(self, platform: str, snapshot_id: str, name: str) -> None:
        self.r.hdel(key("held", platform, snapshot_id), name)

    # Mass ------------------------------------------------------------------
    def mass_versions(self) -> dict[str, int]:
        return {k: int(v) for k, v in _hash_text(self.r.hgetall(key("mass", "versions"))).items()}

    def mass_tasks(self) -> dict[str, dict[str, Any]]:
        raw = _hash_text(self.r.hgetall(key("mass", "tasks")))
        return {task_id: json.loads(view) for task_id, view in raw.items()}

    def mass_task(self, task_id: str, *, retired: bool = False) -> dict[str, Any] | None:
        """One verified task (or, with `retired`, one Mass dropped whose VM still holds a base)."""
        found = self.r.hget(key("mass", "tasks"), task_id)
        if found is None and retired:
            found = self.r.hget(key("mass", "retired"), task_id)
        return json.loads(found) if found else None

    def mass_task_count(self) -> int:
        return int(self.r.hlen(key("mass", "tasks")))

    def set_mass_owners(self, owners: dict[str, str]) -> None:
        """Which Mass task each VM belongs to (`mass_task` in its record), in one round trip."""
        if not owners:
            return
        pipe = self.r.pipeline(transaction=False)
        for vm_id, task_id in owners.items():
            pipe.hset(key("vm", vm_id), "mass_task", task_id)
        pipe.execute()

    def retired_mass_tasks(self) -> dict[str, dict[str, Any]]:
        raw = _hash_text(self.r.hgetall(key("mass", "retired")))
        return {task_id: json.loads(view) for task_id, view in raw.items()}

    def forget_retired_mass_task(self, task_id: str) -> None:
        writes = Writes()
        writes.add("HDEL", key("mass", "retired"), task_id)
        writes.add("HDEL", key("mass", "sources"), task_id)
        self.apply(writes)

    def mass_source(self, task_id: str) -> bytes | None:
        found = self.r.hget(key("mass", "sources"), task_id)
        return bytes(found) if found is not None else None

    def set_mass_tasks(
        self, accepted: dict[str, tuple[dict[str, Any], bytes]], removed: Sequence[str]
    ) -> None:
        """The verified list: views and sealed sources of `accepted`, `removed` dropped;
        one atomic write, so a reader sees the old list or the new one."""
        writes = Writes()
        for task_id, (view, sealed) in accepted.items():
            writes.add("HSET", key("mass", "tasks"), task_id, json.dumps(view, sort_keys=True))
            writes.add("HSET", key("mass", "sources"), task_id, sealed)
            writes.add("HSET", key("mass", "versions"), task_id, int(view["version"]))
        current = self.r.hmget(key("mass", "tasks"), list(removed)) if removed else []
        for task_id, view in zip(removed, current, strict=True):
            # Retired, source kept: its VM's base snapshot is still to be deleted with it.
            writes.add("HDEL", key("mass", "tasks"), task_id)
            if view:
                writes.add("HSET", key("mass", "retired"), task_id, view)
        for task_id in accepted:
            writes.add("HDEL", key("mass", "retired"), task_id)
        if writes.ops:
            self.apply(writes)

    def _mass_report(self, writes: Writes, vm_id: str, state: str, **fields: Any) -> None:
        """In the same batch as the change it reports: a status report for the VM's Mass
        task, if it has one (docs/mass-api.yaml, StatusReport)."""
        task_id = _text(self.r.hget(key("vm", vm_id), "mass_task"))
        if not task_id:
            return
        view = self.r.hget(key("mass", "tasks"), task_id)
        report: dict[str, Any] = {
            "report_id": secrets.token_hex(16), "task_id": task_id, "state": state,
            "at": time.time(), **{k: v for k, v in fields.items() if v is not None},
        }  # fmt: skip
        if view:
            report["task_version"] = int(json.loads(view)["version"])
        report_id = report["report_id"]
        writes.add("HSET", key("mass", "reports"), report_id, json.dumps(report, sort_keys=True))
        writes.add("ZADD", key("mass", "outbox"), float(report["at"]), report_id)

    def mass_vm_report(self, vm_id: str, state: str, **fields: Any) -> None:
        """A status report for the VM's Mass task (a sync refused before any run existed)."""
        writes = Writes()
        self._mass_report(writes, vm_id, state, **fields)
        if writes.ops:
            self.apply(writes)

    def mass_progress(self, vm_id: str, run_id: str, every_s: float) -> bool:
        """A progress report of the VM's Mass task -- every disk of the run, bytes done of
        bytes to read -- at most once every `every_s` per task; True when one was queued."""
        task_id = _text(self.r.hget(key("vm", vm_id), "mass_task"))
        if not task_id:
            return False
        gate = key("mass", "progress-sent", task_id)
        if not self.r.set(gate, "1", nx=True, px=max(1, int(every_s * 1000))):
            return False
        progress = {}
        for disk in self.run_disks(run_id):
            fields = self.disk(run_id, disk).fields
            progress[disk] = {
                "done": int(float(fields.get("done_bytes") or 0)),
                "total": int(float(fields.get("total_bytes") or 0)),
            }
        report = {
            "report_id": secrets.token_hex(16), "task_id": task_id, "state": "syncing",
            "run_id": run_id, "progress": progress, "at": time.time(),
        }  # fmt: skip
        self.queue_mass_report(report, progress=True)
        return True

    def queue_mass_report(self, report: dict[str, Any], *, progress: bool = False) -> None:
        """Keep a status report until Mass has it; a progress report replaces the task's
        previous one still waiting (only the newest progress is worth sending)."""
        report_id, task_id = str(report["report_id"]), str(report["task_id"])
        writes = Writes()
        if progress:
            previous = _text(self.r.hget(key("mass", "progress"), task_id))
            if previous:
                writes.add("ZREM", key("mass", "outbox"), previous)
                writes.add("HDEL", key("mass", "reports"), previous)
            writes.add("HSET", key("mass", "progress"), task_id, report_id)
        writes.add("HSET", key("mass", "reports"), report_id, json.dumps(report, sort_keys=True))
        writes.add("ZADD", key("mass", "outbox"), float(report["at"]), report_id)
        self.apply(writes)

    def waiting_mass_reports(self, count: int) -> list[dict[str, Any]]:
        """Reports not delivered yet, newest first."""
        ids = [_text(i) or "" for i in self.r.zrevrange(key("mass", "outbox"), 0, count - 1)]
        if not ids:
            return []
        values = self.r.hmget(key("mass", "reports"), ids)
        return [json.loads(v) for v in values if v]

    def mass_reports_waiting(self) -> int:
        return int(self.r.zcard(key("mass", "outbox")))

    def mass_report_delivered(self, report: dict[str, Any]) -> None:
        report_id, task_id = str(report["report_id"]), str(report["task_id"])
        writes = Writes()
        writes.add("ZREM", key("mass", "outbox"), report_id)
        writes.add("HDEL", key("mass", "reports"), report_id)
        writes.hdel_if_equal(key("mass", "progress"), task_id, report_id)
        self.apply(writes)

    def mass_refusal_new(self, digest: str) -> bool:
        """True the first time a refused document is seen (it is reported once)."""
        return bool(self.r.hsetnx(key("mass", "refused"), digest, str(time.time())))

    def mass_link(self) -> dict[str, str]:
        return _hash_text(self.r.hgetall(key("mass", "link")))

    def set_mass_link(self, **fields: str) -> None:
        self.r.hset(key("mass", "link"), mapping=fields)

    def clear_mass_link(self, *names: str) -> None:
        self.r.hdel(key("mass", "link"), *names)

    def last_scan_time(self) -> float | None:
        newest = self.r.lindex(key("scan", "times"), 0)
        return float(newest) if newest else None

    # events ----------------------------------------------------------------
    def publish(self, event: dict[str, Any]) -> None:
        """Tell whoever listens (tests, `redis-cli subscribe hamal:events`); nobody needs to."""
        self.r.publish(key("events"), json.dumps(event, sort_keys=True))
