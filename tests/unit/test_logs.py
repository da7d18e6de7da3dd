"""Log files: levels, format, rotation shared by many processes, VM logs, child processes,
secrets."""

from __future__ import annotations

import gc
import logging
import multiprocessing
import os
import re
import sys
import weakref
from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest
from hypothesis import assume, given
from hypothesis import strategies as st

from hamal_workers import logs

AUTH_KEY = "0f1e2d3c-test-4bad-beef-000000000001"
REDIS_PASSWORD = "r3dis-Pa55word"
VM_ID = "5f0c2b1e-8a3d-4c55-9d3e-2f6a7b8c9d0e"
MIB = 1024 * 1024


def make_settings(log_dir: Path, **default: Any) -> SimpleNamespace:
    values = {
        "debug": False,
        "verbose": False,
        "log_rotation_type": "size",
        "max_logfile_count": 10,
        "max_logfile_size_mb": 64,
        "log_dir": str(log_dir),
        "hamal_lib_dir": str(log_dir.parent / "lib"),
        "hamal_info_path": str(log_dir.parent / "lib" / "hamal_info"),
    } | default
    return SimpleNamespace(
        default=SimpleNamespace(**values),
        mass=SimpleNamespace(hyper_exporter_id="exporter-1", auth_key=AUTH_KEY),
        redis=SimpleNamespace(url=f"redis://hamal:{REDIS_PASSWORD}@redis:6379/0"),
    )


@pytest.fixture(autouse=True)
def restore_logging() -> Iterator[None]:
    root = logging.getLogger()
    level = root.level
    yield
    logs.close_process_logging()
    root.setLevel(level)


@pytest.fixture
def log_dir(tmp_path: Path) -> Path:
    return tmp_path / "var" / "log" / "hamal"


def read_logs(log_dir: Path) -> str:
    return "".join(p.read_text(encoding="utf-8") for p in sorted(log_dir.glob("*.log*")))


# --- levels and format -----------------------------------------------------------------


@pytest.mark.parametrize(
    ("debug", "verbose", "level", "written"),
    [
        (False, False, logging.INFO, {"info"}),
        (False, True, logs.VERBOSE, {"verbose", "info"}),
        (True, False, logging.DEBUG, {"debug", "verbose", "info"}),
        (True, True, logging.DEBUG, {"debug", "verbose", "info"}),
    ],
)
def test_level_follows_debug_and_verbose(
    log_dir: Path, debug: bool, verbose: bool, level: int, written: set[str]
) -> None:
    settings = make_settings(log_dir, debug=debug, verbose=verbose)
    assert logs.log_level(settings) == level

    logs.setup_process_logging(settings, "cli")
    log = logging.getLogger("hamal.test.levels")
    log.debug("marker-debug")
    log.log(logs.VERBOSE, "marker-verbose")
    log.info("marker-info")

    text = (log_dir / logs.MAIN_LOG).read_text()
    assert set(re.findall(r"marker-(\w+)", text)) == written
    assert logging.getLogger().level == level


def test_main_log_is_created_in_a_new_log_dir_with_utc_iso_lines(log_dir: Path) -> None:
    logs.setup_process_logging(make_settings(log_dir), "scan")
    logging.getLogger("hamal.period.scan").info("found %d VMs", 3)

    lines = (log_dir / logs.MAIN_LOG).read_text().splitlines()
    pattern = (
        r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z "
        rf"{os.getpid()} INFO \[scan\] hamal\.period\.scan: found 3 VMs"
    )
    assert len(lines) == 1
    assert re.fullmatch(pattern, lines[0]), lines[0]


def test_setup_twice_installs_handlers_once(log_dir: Path) -> None:
    settings = make_settings(log_dir)
    logs.setup_process_logging(settings, "cli")
    handlers = list(logging.getLogger().handlers)
    logs.setup_process_logging(settings, "cli")

    assert logging.getLogger().handlers == handlers
    logging.getLogger("hamal.test").info("only once")
    assert (log_dir / logs.MAIN_LOG).read_text().count("only once") == 1


def test_unsupported_rotation_type_names_the_key(log_dir: Path) -> None:
    with pytest.raises(logs.LogSetupError, match=r"\[DEFAULT\] log_rotation_type = 'time'"):
        logs.setup_process_logging(make_settings(log_dir, log_rotation_type="time"), "cli")


def test_uncreatable_log_dir_names_the_key(tmp_path: Path) -> None:
    blocker = tmp_path / "a-file"
    blocker.write_text("")
    with pytest.raises(logs.LogSetupError, match=r"\[DEFAULT\] log_dir = .*a-file/logs"):
        logs.setup_process_logging(make_settings(blocker / "logs"), "cli")


# --- rotation with many writers --------------------------------------------------------

WRITERS = 4
LINES_PER_WRITER = 3000
PADDING = "x" * 120  # ~200-byte lines: 4 x 3000 of them are ~2.3 MiB, three 1 MiB files


def write_numbered_lines(settings: SimpleNamespace, writer: int) -> None:
    # Celery calls setup in every prefork child too; forked children must reuse what
    # the parent installed, spawned ones set up their own.
    logs.setup_process_logging(settings, f"writer{writer}")
    log = logging.getLogger("hamal.test.rotation")
    for n in range(LINES_PER_WRITER):
        log.info("writer=%d line=%d %s", writer, n, PADDING)


@pytest.mark.parametrize("start_method", ["fork", "spawn"])
def test_rotation_is_exact_when_several_processes_write_one_file(
    log_dir: Path, start_method: str
) -> None:
    settings = make_settings(log_dir, max_logfile_size_mb=1, max_logfile_count=3)
    if start_method == "fork":
        logs.setup_process_logging(settings, "parent")
    context = multiprocessing.get_context(start_method)
    writers = [
        context.Process(target=write_numbered_lines, args=(settings, w)) for w in range(WRITERS)
    ]
    for process in writers:
        process.start()
    for process in writers:
        process.join(timeout=120)
    assert [p.exitcode for p in writers] == [0] * WRITERS

    files = sorted(log_dir.glob("hamal-period.log*"))
    assert [f.name for f in files] == [
        "hamal-period.log",
        "hamal-period.log.1",
        "hamal-period.log.2",
    ]
    lines = [line for f in files for line in f.read_text().splitlines()]
    longest = max(len(line.encode()) + 1 for line in lines)
    assert all(f.stat().st_size <= MIB + longest for f in files)
    seen = Counter(re.search(r"writer=(\d+) line=(\d+)", line).groups() for line in lines)
    expected = {(str(w), str(n)) for w in range(WRITERS) for n in range(LINES_PER_WRITER)}
    assert set(seen) == expected
    assert set(seen.values()) == {1}


def test_rotation_keeps_at_most_max_logfile_count_files(log_dir: Path) -> None:
    logs.setup_process_logging(
        make_settings(log_dir, max_logfile_size_mb=1, max_logfile_count=2), "x"
    )
    log = logging.getLogger("hamal.test.overflow")
    big = "y" * 10_000
    for n in range(400):  # ~4 MiB into two files of 1 MiB: the oldest lines must go
        log.info("record=%d %s", n, big)

    files = sorted(log_dir.glob("hamal-period.log*"))
    assert [f.name for f in files] == ["hamal-period.log", "hamal-period.log.1"]
    assert all(f.stat().st_size <= MIB + 10_200 for f in files)
    text = read_logs(log_dir)
    assert "record=399 " in text
    assert "record=0 " not in text


# --- per-VM logs -----------------------------------------------------------------------


def test_vm_log_uses_the_ops_guide_name_and_stays_out_of_the_main_log(log_dir: Path) -> None:
    settings = make_settings(log_dir)
    logs.setup_process_logging(settings, "worker")
    vm_log = logs.vm_logger(settings, "kylin_v10", VM_ID)
    vm_log.info("snapshot created: %s", "snap-1")

    path = log_dir / f"vm-kylin_v10_Agent-{VM_ID}.log"
    assert logs.vm_log_path(settings, "kylin_v10", VM_ID) == path
    assert re.search(r" INFO \[worker\] .*: snapshot created: snap-1$", path.read_text())
    assert "snapshot created" not in (log_dir / logs.MAIN_LOG).read_text()


def test_vm_logger_makes_its_handler_once(log_dir: Path) -> None:
    settings = make_settings(log_dir)
    first = logs.vm_logger(settings, "db01", VM_ID)
    second = logs.vm_logger(settings, "db01", VM_ID)
    second.info("one line")

    assert first is second
    assert len(first.handlers) == 1
    assert (log_dir / f"vm-db01_Agent-{VM_ID}.log").read_text().count("one line") == 1


@pytest.mark.parametrize(
    ("vm_name", "file_name"),
    [
        ("prod/db 01", f"vm-prod_db_01_Agent-{VM_ID}.log"),
        ("../../etc/passwd", f"vm-.._.._etc_passwd_Agent-{VM_ID}.log"),
        ("数据库-1", f"vm-数据库-1_Agent-{VM_ID}.log"),
        ("", f"vm-__Agent-{VM_ID}.log"),
    ],
)
def test_vm_name_becomes_one_safe_file_name(log_dir: Path, vm_name: str, file_name: str) -> None:
    settings = make_settings(log_dir)
    logs.vm_logger(settings, vm_name, VM_ID).info("hello")

    assert [p.name for p in log_dir.glob("*.log")] == [file_name]
    assert not list(log_dir.glob("*/"))


def test_a_very_long_vm_name_is_cut_to_a_legal_file_name(log_dir: Path) -> None:
    path = logs.vm_log_path(make_settings(log_dir), "虚" * 200, VM_ID)
    assert len(path.name.encode()) <= 255
    assert path.name.endswith(f"_Agent-{VM_ID}.log")


# --- child processes -------------------------------------------------------------------


def python(code: str) -> list[str]:
    return [sys.executable, "-c", code]


def test_run_logged_writes_command_exit_code_duration_and_output(log_dir: Path) -> None:
    logs.setup_process_logging(make_settings(log_dir), "worker")
    done = logs.run_logged(python("import sys; print('to-out'); print('to-err', file=sys.stderr)"))

    assert (done.returncode, done.stdout, done.stderr) == (0, "to-out\n", "to-err\n")
    text = (log_dir / logs.SUBPROCESS_LOG).read_text()
    assert re.search(r"INFO \[worker\] hamal\.subprocess: exit 0 in \d+\.\d{3}s: .*print", text)
    assert "--- stdout\nto-out\n--- stderr\nto-err" in text
    assert "to-out" not in (log_dir / logs.MAIN_LOG).read_text()


def test_run_logged_failure_raises_with_the_stderr_tail(log_dir: Path) -> None:
    logs.setup_process_logging(make_settings(log_dir), "worker")
    code = "import sys\nfor i in range(30): print(f'err-line-{i}', file=sys.stderr)\nsys.exit(3)"

    with pytest.raises(logs.ChildProcessFailed) as caught:
        logs.run_logged(python(code))

    message = str(caught.value)
    assert caught.value.returncode == 3
    assert sys.executable in message and "exited with code 3" in message
    assert "err-line-29" in message and "err-line-20" in message
    assert "err-line-19" not in message
    text = (log_dir / logs.SUBPROCESS_LOG).read_text()
    assert "ERROR [worker] hamal.subprocess: exit 3" in text
    assert "err-line-0\n" in text  # the log keeps the whole output


def test_run_logged_without_check_returns_the_failure(log_dir: Path) -> None:
    logs.setup_process_logging(make_settings(log_dir), "worker")
    done = logs.run_logged(python("import sys; sys.exit(5)"), check=False)
    assert done.returncode == 5
    assert "exit 5 in" in (log_dir / logs.SUBPROCESS_LOG).read_text()


def test_run_logged_timeout_and_missing_program_raise(log_dir: Path) -> None:
    logs.setup_process_logging(make_settings(log_dir), "worker")
    with pytest.raises(logs.ChildProcessFailed, match="timed out after 0.5s"):
        logs.run_logged(python("import time; time.sleep(60)"), timeout=0.5)
    with pytest.raises(logs.ChildProcessFailed, match="could not start"):
        logs.run_logged(["/nonexistent/hamal-tool", "--flag"])
    assert "could not start" in (log_dir / logs.SUBPROCESS_LOG).read_text()


def test_run_logged_works_before_logging_is_set_up(tmp_path: Path) -> None:
    done = logs.run_logged(python("print('fine')"), cwd=tmp_path)
    assert done.stdout == "fine\n"
    with pytest.raises(logs.ChildProcessFailed, match="exited with code 2"):
        logs.run_logged(python("import sys; sys.exit(2)"))
    assert list(tmp_path.iterdir()) == []


def test_child_process_failed_survives_pickling() -> None:
    import pickle

    error = logs.ChildProcessFailed("tool --x", 4, "bad thing")
    copy = pickle.loads(pickle.dumps(error))
    assert (copy.command, copy.returncode, str(copy)) == ("tool --x", 4, str(error))


# --- secrets ---------------------------------------------------------------------------


def fail_connecting(url: str) -> None:
    try:
        raise ConnectionError(f"auth {AUTH_KEY} refused")
    except ConnectionError as exc:
        raise RuntimeError(f"cannot reach {url}") from exc


def test_secrets_never_reach_a_log_file(log_dir: Path) -> None:
    settings = make_settings(log_dir)
    logs.setup_process_logging(settings, "worker")
    log = logging.getLogger("hamal.test.secrets")
    other_url = "redis://admin:other-pw@10.0.0.1:6379/1"

    log.info("calling mass with key=%s via %s", AUTH_KEY, settings.redis.url)
    log.warning(f"plain f-string {AUTH_KEY} {REDIS_PASSWORD} {other_url}")
    try:
        fail_connecting(settings.redis.url)
    except RuntimeError:
        log.exception("heartbeat failed")
    log.info("where", stack_info=True, extra={"unused": AUTH_KEY})
    logs.vm_logger(settings, "vm1", VM_ID).error("token %s rejected", AUTH_KEY)
    with pytest.raises(logs.ChildProcessFailed) as caught:
        logs.run_logged(
            python(f"import sys; print('{REDIS_PASSWORD}', file=sys.stderr); sys.exit(1)")
            + [AUTH_KEY]
        )

    text = read_logs(log_dir)
    for secret in (AUTH_KEY, REDIS_PASSWORD, "other-pw"):
        assert secret not in text
        assert secret not in str(caught.value)
    assert "key=*** via redis://hamal:***@redis:6379/0" in text
    assert "ConnectionError: auth *** refused" in text  # the traceback was written
    assert "RuntimeError: cannot reach redis://hamal:***@redis" in text
    assert text.count("***") >= 10


def test_a_registered_secret_is_redacted_from_every_handler(log_dir: Path) -> None:
    settings = make_settings(log_dir)
    logs.setup_process_logging(settings, "cli")
    logs.register_secret("s3-secret-key-AbC")
    logs.register_secret("")  # ignored, would otherwise replace everything

    logging.getLogger("hamal.test").info("s3 key s3-secret-key-AbC")
    logs.vm_logger(settings, "vm2", VM_ID).info("s3 key s3-secret-key-AbC")

    text = read_logs(log_dir)
    assert "s3-secret-key-AbC" not in text
    assert text.count("s3 key ***") == 2


@pytest.mark.parametrize(
    ("line", "shown"),
    [
        ("to redis://user:pa ss@host:99999999 failed", "to redis://user:***@host:99999999 failed"),
        ("endpoint https://u:p@[::1: bad", "endpoint https://u:***@[::1: bad"),
        ("url 'redis://:secret@' refused", "url 'redis://:***@' refused"),
        ("redis://:pa/ss@h/0", "redis://:***@h/0"),
        ("unix:///s.sock?password=pw&db=0 up", "unix:///s.sock?password=***&db=0 up"),
        ("celery@host: redis://h:6379/0 up", "celery@host: redis://h:6379/0 up"),
    ],
)
def test_redact_hides_passwords_of_malformed_urls(line: str, shown: str) -> None:
    assert logs.redact(line) == shown


def text_without(*chars: str, min_size: int = 0) -> st.SearchStrategy[str]:
    alphabet = st.characters(blacklist_characters=chars, blacklist_categories=("Cs",))
    return st.text(alphabet, min_size=min_size, max_size=24)


@given(
    before=text_without(":", "\n"),
    scheme=st.from_regex(r"[a-z][a-z0-9+.-]{0,9}", fullmatch=True),
    user=text_without(":", "\n"),
    password=text_without("\n", min_size=1),
    after=text_without("@", "\n"),
    next_line=text_without("@"),
)
def test_redact_hides_any_userinfo_password_in_a_line(
    before: str, scheme: str, user: str, password: str, after: str, next_line: str
) -> None:
    text = f"{before}{scheme}://{user}:{password}@{after}\n{next_line}"
    assume("password=" not in text.casefold() and "***" not in text)
    assert logs.redact(text) == f"{before}{scheme}://{user}:***@{after}\n{next_line}"


# --- Celery ----------------------------------------------------------------------------


def test_celery_hook_sets_up_logging_from_the_setup_logging_signal(log_dir: Path) -> None:
    from celery import signals

    hook = logs.celery_logging_hook(make_settings(log_dir), "celery")
    signals.setup_logging.connect(hook)  # weakly, as Celery does by default
    hook_ref = weakref.ref(hook)
    del hook
    gc.collect()
    try:
        replies = signals.setup_logging.send(sender=None, loglevel=logging.WARNING, logfile=None)
    finally:
        if hook_ref() is not None:
            signals.setup_logging.disconnect(hook_ref())

    # Other receivers (the app's own hook, once celery_app is imported) may answer too.
    assert hook_ref() in [receiver for receiver, _ in replies]
    logging.getLogger("celery.worker").info("ready")
    assert "INFO [celery] celery.worker: ready" in (log_dir / logs.MAIN_LOG).read_text()
