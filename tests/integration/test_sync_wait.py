"""`hamal sync --wait`'s waiting against a real Redis: events published as the fleet does."""

from __future__ import annotations

import json
from collections.abc import Iterator
from dataclasses import dataclass

import pytest
import redis

from hamal_workers.cli.sync_wait import TIMED_OUT, Outcome, SyncWait
from hamal_workers.state import COMMITTED, FAILED, FINALIZING, State, Writes, key

VM = "vm-0001"


@dataclass
class SentTask:
    """What SyncWait reads of the vm.sync task it follows: Celery's AsyncResult state."""

    state: str = "PENDING"
    result: object = None


@pytest.fixture
def client(redis_port: int) -> Iterator[redis.Redis]:
    client = redis.Redis(port=redis_port)
    client.flushall()
    yield client
    client.close()


def publish(client: redis.Redis, **event: str) -> None:
    client.publish(key("events"), json.dumps(event))


def finish(state: State, run_id: str, status: str, **fields: str) -> None:
    writes = Writes()
    state.start_run(writes, VM, run_id, {"vm_id": VM, "point_id": run_id})
    state.apply(writes)
    state.set_run_fields(run_id, status=status, **fields)


def test_the_next_run_of_the_vm_is_followed_to_its_commit(client: redis.Redis) -> None:
    state = State(client)
    waiting = SyncWait(client, VM)
    publish(client, event="run-started", run_id="r-other", vm_id="vm-0002")
    publish(client, event="run-started", run_id="r1", vm_id=VM)
    finish(state, "r-other", COMMITTED)
    publish(client, event="run", run_id="r-other", vm_id="vm-0002", status=COMMITTED)
    finish(state, "r1", COMMITTED)
    publish(client, event="run", run_id="r1", vm_id=VM, status=COMMITTED)
    assert waiting.wait(10, SentTask()) == Outcome(COMMITTED, "r1", "r1")


def test_a_run_already_going_is_the_one_waited_for(client: redis.Redis) -> None:
    state = State(client)
    state.set_vm_fields(VM, active_run="r-going")
    waiting = SyncWait(client, VM)
    publish(client, event="vm-sync", vm_id=VM, status="running", run_id="r-going")
    finish(state, "r-going", FAILED, error="disk0.raw: read error")
    publish(client, event="run", run_id="r-going", vm_id=VM, status=FAILED)
    assert waiting.wait(10, SentTask()) == Outcome(FAILED, "r-going", "disk0.raw: read error")


def test_a_vm_sync_that_fails_before_a_run_exists_ends_the_wait(client: redis.Redis) -> None:
    waiting = SyncWait(client, VM)
    publish(client, event="vm-sync", vm_id=VM, status="busy", run_id="", error="")
    publish(client, event="vm-sync", vm_id=VM, status=FAILED, run_id="", error="no VM vm-0001")
    assert waiting.wait(10, SentTask()) == Outcome(FAILED, "", "no VM vm-0001")


def test_a_missed_event_is_caught_by_reading_the_run(client: redis.Redis) -> None:
    state = State(client)
    state.set_vm_fields(VM, active_run="r-quiet")
    finish(state, "r-quiet", COMMITTED)  # and no event published
    waiting = SyncWait(client, VM)
    assert waiting.wait(10, SentTask()) == Outcome(COMMITTED, "r-quiet", "r-quiet")


def test_a_failed_task_without_an_event_ends_the_wait(client: redis.Redis) -> None:
    waiting = SyncWait(client, VM)
    task = SentTask("FAILURE", TypeError("cannot open the platform"))
    assert waiting.wait(10, task) == Outcome(FAILED, "", "TypeError: cannot open the platform")


def test_a_run_still_going_times_out(client: redis.Redis) -> None:
    state = State(client)
    waiting = SyncWait(client, VM)
    publish(client, event="run-started", run_id="r-slow", vm_id=VM)
    finish(state, "r-slow", FINALIZING)
    assert waiting.wait(0.5, SentTask("SUCCESS")) == Outcome(TIMED_OUT, "r-slow")
