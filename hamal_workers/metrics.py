"""Prometheus metrics of the whole proxy, read from Redis at each scrape (`hamal metrics`).

Every worker and the beat keep their record in Redis already (VM hashes, run histories,
counters), so one exporter reads it all at scrape time: no per-process registries to add
up, and a restarted worker loses nothing. Per VM:

    hamal_vm_last_point_age_seconds          now - the newest point's snapshot time: the
                                             recovery point objective actually met
    hamal_vm_last_point_timestamp_seconds    that snapshot time
    hamal_vm_last_run_duration_seconds       the last finished run, start to end
    hamal_vm_last_run_read_bytes / _stored_bytes   what it read from the source / stored
    hamal_vm_last_run_failed                 1 when the last finished run failed
    hamal_vm_consecutive_failures            what the scan's backoff counts
    hamal_vm_runs_total{status}              runs ended, per status

and for the proxy: hamal_runs_active, hamal_snapshots_swept_total and
hamal_staged_points_swept_total (leftovers the sweep removed), hamal_queue_length{queue}
(messages waiting, every priority), hamal_live_snapshots, hamal_redis_up.

A VM's labels are its id and name; nothing else of it (never a credential) is exported.
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Callable, Iterator
from typing import Any

import redis
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from hamal_workers.config import queue_names
from hamal_workers.state import State, key

log = logging.getLogger(__name__)

# kombu's Redis transport keeps a queue's messages of priority p > 0 under name + SEP + p.
_PRIORITY_SEP = "\x06\x16"
_PRIORITY_STEPS = (0, 3, 6, 9)
_VM_LABELS = ["vm_id", "vm"]


def queue_keys(queue: str) -> list[str]:
    return [queue if p == 0 else f"{queue}{_PRIORITY_SEP}{p}" for p in _PRIORITY_STEPS]


class HamalCollector(Collector):
    """Reads the fleet's state at each collect(); Redis down is `hamal_redis_up 0`."""

    def __init__(self, state: Callable[[], State], now: Callable[[], float] = time.time) -> None:
        self._state = state
        self._now = now

    def collect(self) -> Iterator[Metric]:
        up = GaugeMetricFamily("hamal_redis_up", "1 when Redis answered this scrape")
        try:
            metrics = self._read(self._state())
        except redis.RedisError as exc:
            log.warning("metrics: Redis did not answer: %s", exc)
            up.add_metric([], 0)
            yield up
            return
        up.add_metric([], 1)
        yield up
        yield from metrics

    def _read(self, state: State) -> list[Metric]:
        vm_ids = state.vm_ids()
        vms = state.vms(vm_ids)
        pipe = state.r.pipeline(transaction=False)
        for vm_id in vm_ids:
            pipe.lindex(key("history", vm_id), 0)
        lasts = pipe.execute()
        now = self._now()
        per_vm = _VmMetrics()
        for vm_id, fields, last in zip(vm_ids, vms, lasts, strict=True):
            summary = json.loads(last) if last else None
            per_vm.add(vm_id, fields, summary, now)
        proxy = self._proxy(state)
        return [*per_vm.families(), *proxy]

    def _proxy(self, state: State) -> list[Metric]:
        counters = state.counters()
        active = GaugeMetricFamily("hamal_runs_active", "Runs in progress")
        active.add_metric([], len(state.active_runs()))
        live = GaugeMetricFamily(
            "hamal_live_snapshots", "Snapshots the proxy created and has not deleted yet"
        )
        live.add_metric([], len(state.live_snapshots()))
        swept = CounterMetricFamily(
            "hamal_snapshots_swept", "Leftover snapshots the sweep deleted on the sources"
        )
        swept.add_metric([], counters.get("snapshots_swept", 0))
        staged = CounterMetricFamily(
            "hamal_staged_points_swept", "Staged points of dead runs the sweep removed"
        )
        staged.add_metric([], counters.get("staged_points_swept", 0))
        queues = GaugeMetricFamily(
            "hamal_queue_length", "Messages waiting in a Celery queue", labels=["queue"]
        )
        pipe = state.r.pipeline(transaction=False)
        names = queue_names()
        for name in names:
            for k in queue_keys(name):
                pipe.llen(k)
        lengths = pipe.execute()
        steps = len(_PRIORITY_STEPS)
        for n, name in enumerate(names):
            queues.add_metric([name], sum(lengths[n * steps : (n + 1) * steps]))
        return [active, live, swept, staged, queues, *self._mass(state)]

    def _mass(self, state: State) -> list[Metric]:
        """Mass mode only: whether Mass answers, and what waits for it."""
        link = state.mass_link()
        if not (link.get("registered") or link.get("unreachable_since")):
            return []
        up = GaugeMetricFamily("hamal_mass_up", "1 when the last exchange with Mass worked")
        up.add_metric([], 0.0 if link.get("unreachable_since") else 1.0)
        waiting = GaugeMetricFamily(
            "hamal_mass_reports_waiting", "Status reports waiting for Mass to answer"
        )
        waiting.add_metric([], state.mass_reports_waiting())
        tasks = GaugeMetricFamily("hamal_mass_tasks", "Verified Mass tasks the proxy protects")
        tasks.add_metric([], state.mass_task_count())
        return [up, waiting, tasks]


class _VmMetrics:
    def __init__(self) -> None:
        def gauge(name: str, doc: str) -> GaugeMetricFamily:
            return GaugeMetricFamily(name, doc, labels=_VM_LABELS)

        self.age = gauge(
            "hamal_vm_last_point_age_seconds",
            "Seconds since the snapshot of the VM's newest restore point (the RPO met)",
        )
        self.stamp = gauge(
            "hamal_vm_last_point_timestamp_seconds", "Unix time of the newest point's snapshot"
        )
        self.duration = gauge(
            "hamal_vm_last_run_duration_seconds", "Start to end of the VM's last finished run"
        )
        self.read = gauge("hamal_vm_last_run_read_bytes", "Bytes the last finished run read")
        self.stored = gauge("hamal_vm_last_run_stored_bytes", "Bytes the last finished run stored")
        self.failed = gauge("hamal_vm_last_run_failed", "1 when the last finished run failed")
        self.failures = gauge(
            "hamal_vm_consecutive_failures", "Failed runs since the last committed one"
        )
        self.runs = CounterMetricFamily(
            "hamal_vm_runs", "Runs of the VM ended, per status", labels=[*_VM_LABELS, "status"]
        )

    def add(
        self, vm_id: str, fields: dict[str, str], summary: dict[str, Any] | None, now: float
    ) -> None:
        labels = [vm_id, fields.get("name", "")]
        created = _number(fields.get("last_point_created"))
        if created:
            self.stamp.add_metric(labels, created)
            self.age.add_metric(labels, max(0.0, now - created))
        self.failures.add_metric(labels, _number(fields.get("failures")))
        for name, value in sorted(fields.items()):
            if name.startswith("runs_"):
                self.runs.add_metric([*labels, name[len("runs_") :]], _number(value))
        if summary is None:
            return
        started, finished = _number(summary.get("started")), _number(summary.get("finished"))
        if started and finished:
            self.duration.add_metric(labels, max(0.0, finished - started))
        disks = summary.get("disks") if isinstance(summary.get("disks"), dict) else {}
        self.read.add_metric(labels, sum(_number(d.get("bytes_read")) for d in disks.values()))
        self.stored.add_metric(labels, sum(_number(d.get("bytes_stored")) for d in disks.values()))
        self.failed.add_metric(labels, 1 if summary.get("status") != "committed" else 0)

    def families(self) -> list[Metric]:
        return [
            self.age, self.stamp, self.duration, self.read, self.stored, self.failed,
            self.failures, self.runs,
        ]  # fmt: skip


def _number(value: object) -> float:
    try:
        return float(value)  # type: ignore[arg-type]
    except (TypeError, ValueError):
        return 0.0
