"""The info file: concurrent writers, dead entries, exit, the lib dir."""

from __future__ import annotations

import json
import multiprocessing
import os
import socket
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest

import hamal_workers
from hamal_workers import info

AUTH_KEY = "0f1e2d3c-test-4bad-beef-000000000001"
REDIS_PASSWORD = "r3dis-Pa55word"
HOST = socket.gethostname()
WRITERS = 8


def make_settings(lib_dir: Path, info_path: Path | None = None) -> SimpleNamespace:
    return SimpleNamespace(
        default=SimpleNamespace(
            hamal_lib_dir=str(lib_dir),
            hamal_info_path=str(info_path or lib_dir / "hamal_info"),
            log_dir=str(lib_dir.parent / "log"),
        ),
        mass=SimpleNamespace(
            hyper_exporter_id="0123456789abcdef0123456789abcdef", auth_key=AUTH_KEY
        ),
        redis=SimpleNamespace(url=f"redis://hamal:{REDIS_PASSWORD}@redis:6379/0"),
    )


@pytest.fixture
def settings(tmp_path: Path) -> SimpleNamespace:
    return make_settings(tmp_path / "var" / "lib" / "hamal")


def read_info(settings: SimpleNamespace) -> dict:
    return json.loads(Path(settings.default.hamal_info_path).read_text())


def dead_pid() -> int:
    child = subprocess.Popen([sys.executable, "-c", "pass"])
    child.wait()  # reaped: the pid no longer exists
    return child.pid


# --- lib dir ---------------------------------------------------------------------------


def test_ensure_lib_dir_creates_the_lib_dir_and_the_info_files_dir(tmp_path: Path) -> None:
    settings = make_settings(tmp_path / "lib" / "hamal", tmp_path / "run" / "hamal" / "info")
    assert info.ensure_lib_dir(settings) == tmp_path / "lib" / "hamal"
    assert (tmp_path / "lib" / "hamal").is_dir()
    assert (tmp_path / "run" / "hamal").is_dir()


@pytest.mark.parametrize("key", ["hamal_lib_dir", "hamal_info_path"])
def test_an_uncreatable_dir_is_an_error_naming_the_key(tmp_path: Path, key: str) -> None:
    blocker = tmp_path / "not-a-dir"
    blocker.write_text("")
    good = tmp_path / "lib"
    settings = (
        make_settings(blocker / "lib")
        if key == "hamal_lib_dir"
        else make_settings(good, blocker / "sub" / "hamal_info")
    )
    with pytest.raises(info.InfoError, match=rf"\[DEFAULT\] {key} = {blocker}/") as caught:
        info.ensure_lib_dir(settings)
    assert "cannot create" in str(caught.value)


# --- register, refresh, unregister -----------------------------------------------------


def test_register_writes_what_this_process_is(settings: SimpleNamespace) -> None:
    process = info.ProcessInfo()
    process.register(settings, "worker", ["period", "local"])
    try:
        document = read_info(settings)
        entry = document["processes"][f"{HOST}:{os.getpid()}"]
        assert entry["role"] == "worker"
        assert entry["queues"] == ["period", "local"]
        assert entry["pid"] == os.getpid()
        assert {"started", "updated"} <= entry.keys()
        assert document["version"] == hamal_workers.__version__
        assert document["exporter_id"] == "0123456789abcdef0123456789abcdef"
        assert document["host"] == HOST
        assert "127.0.0.1" in document["addresses"] or "::1" in document["addresses"]
        text = Path(settings.default.hamal_info_path).read_text()
        assert AUTH_KEY not in text and REDIS_PASSWORD not in text
    finally:
        process.unregister()


def test_refresh_updates_the_time_and_keeps_the_start(
    settings: SimpleNamespace, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(info, "_now", lambda: "2025-01-01T00:00:00+00:00")
    process = info.ProcessInfo()
    process.register(settings, "beat", [])
    monkeypatch.setattr(info, "_now", lambda: "2025-01-01T00:05:00+00:00")
    process.refresh()

    document = read_info(settings)
    entry = document["processes"][process.key]
    assert (entry["started"], entry["updated"]) == (
        "2025-01-01T00:00:00+00:00",
        "2025-01-01T00:05:00+00:00",
    )
    assert document["updated"] == "2025-01-01T00:05:00+00:00"
    process.unregister()


def test_unregister_removes_only_this_entry_and_refresh_does_not_bring_it_back(
    settings: SimpleNamespace,
) -> None:
    lib = Path(settings.default.hamal_lib_dir)
    lib.mkdir(parents=True)
    other_host = {"role": "worker", "queues": [], "pid": 1, "started": "x", "updated": "x"}
    Path(settings.default.hamal_info_path).write_text(
        json.dumps({"processes": {"other-host:1": other_host}})
    )
    process = info.ProcessInfo()
    process.register(settings, "cli", [])
    process.unregister()
    process.unregister()
    process.refresh()

    assert read_info(settings)["processes"] == {"other-host:1": other_host}


def test_entries_of_dead_processes_of_this_host_are_dropped(settings: SimpleNamespace) -> None:
    gone = dead_pid()
    entry = {"role": "worker", "queues": ["vmware"], "started": "x", "updated": "x"}
    Path(settings.default.hamal_lib_dir).mkdir(parents=True)
    Path(settings.default.hamal_info_path).write_text(
        json.dumps(
            {
                "processes": {
                    f"{HOST}:{gone}": entry | {"pid": gone},
                    f"{HOST}:garbage": "not an entry",
                    f"elsewhere:{gone}": entry | {"pid": gone},
                }
            }
        )
    )
    process = info.ProcessInfo()
    process.register(settings, "cli", [])

    assert set(read_info(settings)["processes"]) == {process.key, f"elsewhere:{gone}"}
    process.unregister()


def test_a_corrupt_info_file_is_rewritten(settings: SimpleNamespace) -> None:
    Path(settings.default.hamal_lib_dir).mkdir(parents=True)
    Path(settings.default.hamal_info_path).write_text('{"processes": {"half')
    process = info.ProcessInfo()
    process.register(settings, "cli", [])

    assert list(read_info(settings)["processes"]) == [process.key]
    process.unregister()


def test_the_entry_is_removed_when_the_process_exits(settings: SimpleNamespace) -> None:
    script = (
        "import sys, json, types\n"
        "from hamal_workers import info\n"
        "ns = types.SimpleNamespace\n"
        f"s = ns(default=ns(hamal_lib_dir={settings.default.hamal_lib_dir!r},"
        f" hamal_info_path={settings.default.hamal_info_path!r}),"
        " mass=ns(hyper_exporter_id='e'))\n"
        "p = info.ProcessInfo()\n"
        "p.register(s, 'cli', [])\n"
        "print(p.key)\n"
        "print(json.dumps(sorted(json.load(open(s.default.hamal_info_path))['processes'])))\n"
    )
    done = subprocess.run(
        [sys.executable, "-c", script],
        capture_output=True,
        text=True,
        check=True,
        cwd=Path(hamal_workers.__file__).parent.parent,
    )
    key, registered = done.stdout.splitlines()

    assert json.loads(registered) == [key]
    assert read_info(settings)["processes"] == {}


# --- many writers ----------------------------------------------------------------------


def register_at_once(
    settings: SimpleNamespace, writer: int, start: Any, ready: Any, may_exit: Any
) -> None:
    # A fixed address list keeps each write short, so the writers really overlap.
    info.host_addresses = lambda: ["192.0.2.1"]
    process = info.ProcessInfo()
    start.wait(timeout=60)
    process.register(settings, f"role-{writer}", [f"queue-{writer}"])
    ready.put(os.getpid())
    may_exit.wait(timeout=60)


def test_concurrent_writers_leave_valid_json_with_every_live_process(
    settings: SimpleNamespace,
) -> None:
    info.ensure_lib_dir(settings)
    # fork: children leave by os._exit, without atexit, as a killed worker would.
    context = multiprocessing.get_context("fork")
    start, ready, may_exit = context.Barrier(WRITERS), context.Queue(), context.Event()
    writers = [
        context.Process(target=register_at_once, args=(settings, w, start, ready, may_exit))
        for w in range(WRITERS)
    ]
    for process in writers:
        process.start()
    try:
        pids = {ready.get(timeout=60) for _ in writers}
        processes = read_info(settings)["processes"]
    finally:
        may_exit.set()
        for process in writers:
            process.join(timeout=60)

    assert set(processes) == {f"{HOST}:{pid}" for pid in pids}
    assert sorted((e["role"], e["queues"]) for e in processes.values()) == sorted(
        (f"role-{w}", [f"queue-{w}"]) for w in range(WRITERS)
    )
    assert [p.exitcode for p in writers] == [0] * WRITERS
    lib = Path(settings.default.hamal_lib_dir)
    assert sorted(p.name for p in lib.iterdir()) == ["hamal_info", "hamal_info.lock"]

    survivor = info.ProcessInfo()
    survivor.register(settings, "cli", [])
    assert list(read_info(settings)["processes"]) == [survivor.key]
    survivor.unregister()


# --- addresses -------------------------------------------------------------------------


def test_addresses_are_those_of_the_interfaces_loopback_last() -> None:
    found = info.host_addresses()
    assert "127.0.0.1" in found
    assert found[-1] in ("127.0.0.1", "::1")  # loopback last
    listed = subprocess.run(["ip", "-j", "addr", "show"], capture_output=True, text=True)
    if listed.returncode == 0:  # the kernel's own listing, read another way, agrees
        expected = {
            a["local"]
            for iface in json.loads(listed.stdout)
            for a in iface.get("addr_info", [])
            if a.get("family") in ("inet", "inet6")
        }
        assert {a.split("%")[0] for a in expected} == set(found)
