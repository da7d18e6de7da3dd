"""Log files under [DEFAULT] log_dir: the main log, per-VM agent logs, child processes.

Layout (the ops guide's names):

    hamal-period.log             root logger: scan, dispatch, finalize, everything not VM-specific
    hamal-period-subprocess.log  every child process: command, exit code, duration, output
    vm-<name>_Agent-<id>.log     one per VM: the state of its syncs

Every file rotates by size through ``ConcurrentRotatingFileHandler``: Celery prefork
children, beat and the CLI all append to the same files, and the standard
``RotatingFileHandler`` would let two processes rotate at once and lose or duplicate
lines. Each handler takes a lock file next to the log for every write and rotation.

Every handler created here carries a ``SecretFilter``: registered secrets and URL
passwords are replaced by ``***`` before any line is written.
"""

from __future__ import annotations

import logging
import os
import re
import shlex
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, Protocol
from urllib.parse import unquote

from concurrent_log_handler import ConcurrentRotatingFileHandler

from hamal_workers.config import mask_url, url_passwords

VERBOSE = 15
logging.addLevelName(VERBOSE, "VERBOSE")

MAIN_LOG = "hamal-period.log"
SUBPROCESS_LOG = "hamal-period-subprocess.log"
REDACTED = "***"

# Child output beyond this is cut from the log (the tail is kept: errors come last).
_MAX_LOGGED_OUTPUT_CHARS = 64 * 1024
_STDERR_TAIL_LINES = 10
# Longest file name most filesystems accept, in bytes.
_MAX_FILE_NAME_BYTES = 255

subprocess_logger = logging.getLogger("hamal.subprocess")


# Read-only members, so frozen dataclasses and SimpleNamespace objects both match.
class DefaultSettings(Protocol):
    @property
    def debug(self) -> bool: ...
    @property
    def verbose(self) -> bool: ...
    @property
    def log_rotation_type(self) -> str: ...
    @property
    def max_logfile_count(self) -> int: ...
    @property
    def max_logfile_size_mb(self) -> int: ...
    @property
    def log_dir(self) -> str: ...


class MassSettings(Protocol):
    @property
    def auth_key(self) -> str: ...


class RedisSettings(Protocol):
    @property
    def url(self) -> str: ...


class LogSettings(Protocol):
    """The part of ``hamal_workers.config.Settings`` this module reads."""

    @property
    def default(self) -> DefaultSettings: ...
    @property
    def mass(self) -> MassSettings: ...
    @property
    def redis(self) -> RedisSettings: ...


class LogSetupError(Exception):
    """A log setting cannot be used; the message names the config key."""


class ChildProcessFailed(Exception):
    """A child process exited non-zero, timed out or could not start.

    ``args`` are the constructor's arguments so that pickling and Celery's result
    serialisation rebuild it; every text is already redacted.
    """

    def __init__(
        self, command: str, returncode: int | None, stderr_tail: str, reason: str = ""
    ) -> None:
        super().__init__(command, returncode, stderr_tail, reason)
        self.command = command
        self.returncode = returncode
        self.stderr_tail = stderr_tail
        self.reason = reason or f"exited with code {returncode}"

    def __str__(self) -> str:
        message = f"command `{self.command}` {self.reason}"
        return f"{message}; last output:\n{self.stderr_tail}" if self.stderr_tail else message


# --- secrets ---------------------------------------------------------------------------

_secrets: set[str] = set()
_secrets_lock = threading.Lock()


def register_secret(value: str) -> None:
    """Never write ``value`` to a log again (this process). Empty values are ignored."""
    if not value:
        return
    with _secrets_lock:
        _secrets.add(value)
        # A password taken from a URL may be percent-encoded there and decoded elsewhere.
        decoded = unquote(value)
        if decoded:
            _secrets.add(decoded)


def redact(text: str) -> str:
    """``text`` with every registered secret and URL password replaced by ``***``."""
    with _secrets_lock:
        # Longest first, so a secret containing another is replaced whole.
        secrets = sorted(_secrets, key=len, reverse=True)
    for secret in secrets:
        if secret in text:
            text = text.replace(secret, REDACTED)
    # scheme://user:password@ and ?password= (Redis, S3 endpoints, proxies ...), parsed or not.
    return mask_url(text)


def _register_settings_secrets(settings: LogSettings) -> None:
    register_secret(settings.mass.auth_key)
    for password in url_passwords(settings.redis.url):
        register_secret(password)


class SecretFilter(logging.Filter):
    """Redacts a record's message, exception text and stack before it is formatted.

    The record is changed in place (Python 3.11 filters cannot return a copy), so any
    handler later in the chain also sees the redacted text.
    """

    _exception_formatter = logging.Formatter()

    def filter(self, record: logging.LogRecord) -> bool:
        record.msg = redact(_message_of(record))
        record.args = None
        if record.exc_info and not record.exc_text:
            record.exc_text = self._exception_formatter.formatException(record.exc_info)
        if record.exc_text:
            record.exc_text = redact(record.exc_text)
        if record.stack_info:
            record.stack_info = redact(record.stack_info)
        return True


def _message_of(record: logging.LogRecord) -> str:
    try:
        return record.getMessage()
    except Exception:
        # Bad %-args: keep the line (logging would print msg and args unredacted to stderr).
        return f"{record.msg} {record.args!r}"


# --- formatting and handlers -----------------------------------------------------------

_process_label = "hamal"


class _UtcFormatter(logging.Formatter):
    """``%(asctime)s %(process)d %(levelname)s [<process>] %(name)s: %(message)s``."""

    def __init__(self) -> None:
        super().__init__(
            "%(asctime)s %(process)d %(levelname)s [%(hamal_process)s] %(name)s: %(message)s"
        )

    def format(self, record: logging.LogRecord) -> str:
        # Read at format time, so VM handlers made before setup get the final label.
        record.hamal_process = _process_label
        return super().format(record)

    def formatTime(self, record: logging.LogRecord, datefmt: str | None = None) -> str:  # noqa: N802
        stamp = datetime.fromtimestamp(record.created, UTC).isoformat(timespec="milliseconds")
        return stamp.replace("+00:00", "Z")


def log_level(settings: LogSettings) -> int:
    """[DEFAULT] debug -> DEBUG, verbose -> VERBOSE, otherwise INFO."""
    if settings.default.debug:
        return logging.DEBUG
    if settings.default.verbose:
        return VERBOSE
    return logging.INFO


def _log_dir(settings: LogSettings) -> Path:
    path = Path(settings.default.log_dir)
    try:
        path.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise LogSetupError(
            f"[DEFAULT] log_dir = {path}: cannot create it: {exc.strerror or exc}"
        ) from exc
    return path


def _create_file(settings: LogSettings, path: Path) -> None:
    # The handler opens on first write; operators look for the files at start.
    try:
        path.touch(exist_ok=True)
    except OSError as exc:
        raise LogSetupError(
            f"[DEFAULT] log_dir = {settings.default.log_dir}: cannot write {path.name}: "
            f"{exc.strerror or exc}"
        ) from exc


@dataclass(frozen=True)
class _Rotation:
    max_bytes: int
    backup_count: int

    @classmethod
    def of(cls, settings: LogSettings) -> _Rotation:
        d = settings.default
        if d.log_rotation_type != "size":
            raise LogSetupError(
                f"[DEFAULT] log_rotation_type = {d.log_rotation_type!r}: only 'size' is supported"
            )
        # backupCount counts the files besides the live one: max_logfile_count files in all.
        return cls(max(d.max_logfile_size_mb, 0) * 1024 * 1024, max(d.max_logfile_count - 1, 0))


def _secret_safe(handler: logging.Handler, level: int) -> logging.Handler:
    handler.setLevel(level)
    handler.setFormatter(_UtcFormatter())
    handler.addFilter(SecretFilter())
    return handler


def _file_handler(
    path: Path, rotation: _Rotation, level: int, *, keep_open: bool = True
) -> ConcurrentRotatingFileHandler:
    handler = ConcurrentRotatingFileHandler(
        str(path),
        maxBytes=rotation.max_bytes,
        backupCount=rotation.backup_count,
        encoding="utf-8",
        keep_file_open=keep_open,
    )
    _secret_safe(handler, level)
    return handler


def _stderr_handler() -> logging.Handler:
    return _secret_safe(logging.StreamHandler(sys.stderr), logging.WARNING)


# --- process setup ---------------------------------------------------------------------


@dataclass
class _Installed:
    key: tuple[object, ...]
    root_handlers: list[logging.Handler]
    subprocess_handler: logging.Handler


_installed: _Installed | None = None
_setup_lock = threading.Lock()


def setup_process_logging(settings: LogSettings, process: str) -> None:
    """Send this process's logs to ``<log_dir>/hamal-period.log`` (+ WARNING to stderr).

    Idempotent: a second call with the same settings does nothing, and a process forked
    from a configured one keeps the inherited handlers (the handler reopens its lock
    file after a fork). A call with different settings replaces what it installed.
    """
    global _installed, _process_label
    _register_settings_secrets(settings)
    rotation, level = _Rotation.of(settings), log_level(settings)
    log_dir = _log_dir(settings)
    key = (str(log_dir.resolve()), rotation, level)
    with _setup_lock:
        _process_label = process
        if _installed is not None and _installed.key == key:
            return
        close_process_logging()
        for name in (MAIN_LOG, SUBPROCESS_LOG):
            _create_file(settings, log_dir / name)
        root = logging.getLogger()
        root_handlers = [_file_handler(log_dir / MAIN_LOG, rotation, level), _stderr_handler()]
        for handler in root_handlers:
            root.addHandler(handler)
        root.setLevel(level)
        sub_handler = _file_handler(log_dir / SUBPROCESS_LOG, rotation, level)
        subprocess_logger.addHandler(sub_handler)
        # Child output is bulky: it goes to its own file, not the main log.
        subprocess_logger.propagate = False
        _installed = _Installed(key, root_handlers, sub_handler)


def close_process_logging() -> None:
    """Remove and close what ``setup_process_logging`` installed (tests, re-configuration)."""
    global _installed
    if _installed is None:
        return
    root = logging.getLogger()
    for handler in _installed.root_handlers:
        root.removeHandler(handler)
        handler.close()
    subprocess_logger.removeHandler(_installed.subprocess_handler)
    _installed.subprocess_handler.close()
    subprocess_logger.propagate = True
    _installed = None


_celery_hooks: list[Callable[..., None]] = []


def celery_logging_hook(settings: LogSettings, process: str) -> Callable[..., None]:
    """A receiver for ``celery.signals.setup_logging`` that calls ``setup_process_logging``.

    Connecting any receiver to that signal stops Celery from configuring logging itself:
    it no longer hijacks the root logger (``worker_hijack_root_logger``), adds no
    handlers of its own and does not redirect stdout/stderr. The signal fires in the
    main process and again in each prefork child.

    Celery connects receivers weakly by default; this module keeps a reference to the
    returned function, so ``connect(hook)`` and ``connect(hook, weak=False)`` both work.
    """

    def hook(**_: Any) -> None:
        setup_process_logging(settings, process)

    _celery_hooks.append(hook)
    return hook


# --- per-VM logs -----------------------------------------------------------------------

_UNSAFE_FILE_CHARS = re.compile(r"[^\w.-]")
_vm_handlers: dict[str, tuple[str, logging.Handler]] = {}
_vm_lock = threading.Lock()


def safe_file_part(text: str) -> str:
    """``text`` usable inside one file name: no separators, spaces or control characters.

    Letters of any script are kept, so two VMs named in Chinese do not collapse into
    the same name of underscores.
    """
    return _UNSAFE_FILE_CHARS.sub("_", text) or "_"


def vm_log_path(settings: LogSettings, vm_name: str, vm_id: str) -> Path:
    """``<log_dir>/vm-<name>_Agent-<id>.log``, the name cut so the file name stays legal."""
    suffix = f"_Agent-{safe_file_part(vm_id)}.log"
    room = _MAX_FILE_NAME_BYTES - len(("vm-" + suffix).encode())
    name = safe_file_part(vm_name).encode()[: max(room, 1)].decode(errors="ignore") or "_"
    return Path(settings.default.log_dir) / f"vm-{name}{suffix}"


def vm_logger(settings: LogSettings, vm_name: str, vm_id: str) -> logging.Logger:
    """The logger of one VM's agent log; its lines do not go to the main log.

    The handler is made once per process per file and reused by later calls.
    """
    _register_settings_secrets(settings)
    path = vm_log_path(settings, vm_name, vm_id)
    rotation, level = _Rotation.of(settings), log_level(settings)
    logger = logging.getLogger(f"hamal.vm.{path.stem}")
    logger.propagate = False
    logger.setLevel(level)
    with _vm_lock:
        current = _vm_handlers.get(logger.name)
        if current is not None and current[0] == str(path):
            current[1].setLevel(level)
            return logger
        if current is not None:  # log_dir changed since: write to the new place only
            logger.removeHandler(current[1])
            current[1].close()
        _log_dir(settings)
        # A worker touches thousands of VMs: open per write rather than hold 2 fds each.
        handler = _file_handler(path, rotation, level, keep_open=False)
        logger.addHandler(handler)
        _vm_handlers[logger.name] = (str(path), handler)
    return logger


# --- child processes -------------------------------------------------------------------


def run_logged(
    cmd: list[str],
    *,
    timeout: float | None = None,
    cwd: str | os.PathLike[str] | None = None,
    check: bool = True,
) -> subprocess.CompletedProcess[str]:
    """Run ``cmd`` and log its command line, exit code, duration and output.

    Raises ``ChildProcessFailed`` when it exits non-zero (if ``check``), and always when
    it times out or cannot be started: there is no exit code to return then.
    """
    command = redact(shlex.join(cmd))
    started = time.monotonic()
    try:
        # stdin closed: a child must never wait on a worker's terminal.
        done = subprocess.run(
            cmd,
            cwd=cwd,
            timeout=timeout,
            stdin=subprocess.DEVNULL,
            capture_output=True,
            text=True,
            encoding="utf-8",
            errors="replace",
            check=False,
        )
    except subprocess.TimeoutExpired as exc:
        out, err = _text(exc.stdout), _text(exc.stderr)
        _log_child(logging.ERROR, command, f"timed out after {timeout}s", out, err)
        raise ChildProcessFailed(
            command, None, _tail(err or out), f"timed out after {timeout}s"
        ) from None
    except OSError as exc:
        reason = f"could not start: {exc.strerror or exc}"
        _log_child(logging.ERROR, command, reason, "", "")
        raise ChildProcessFailed(command, None, "", redact(reason)) from None
    elapsed = time.monotonic() - started
    failed = done.returncode != 0
    outcome = f"exit {done.returncode} in {elapsed:.3f}s"
    _log_child(
        logging.ERROR if failed else logging.INFO, command, outcome, done.stdout, done.stderr
    )
    if failed and check:
        raise ChildProcessFailed(command, done.returncode, _tail(done.stderr or done.stdout))
    return done


def _text(output: str | bytes | None) -> str:
    # TimeoutExpired carries bytes even when the run was in text mode.
    if isinstance(output, bytes):
        return output.decode("utf-8", errors="replace")
    return output or ""


def _tail(output: str, lines: int = _STDERR_TAIL_LINES) -> str:
    return redact("\n".join(output.rstrip().splitlines()[-lines:]))


def _log_child(level: int, command: str, outcome: str, stdout: str, stderr: str) -> None:
    # One record per run, so lines of concurrent runs never interleave in the file.
    parts = [f"{outcome}: {command}"]
    parts += [
        _output_block(label, text) for label, text in (("stdout", stdout), ("stderr", stderr))
    ]
    subprocess_logger.log(level, redact("\n".join(p for p in parts if p)))


def _output_block(label: str, text: str) -> str:
    if not text:
        return ""
    if len(text) > _MAX_LOGGED_OUTPUT_CHARS:
        cut = len(text) - _MAX_LOGGED_OUTPUT_CHARS
        text = f"[{cut} earlier characters omitted]\n{text[cut:]}"
    return f"--- {label}\n{text.rstrip()}"


__all__ = [
    "MAIN_LOG",
    "SUBPROCESS_LOG",
    "VERBOSE",
    "ChildProcessFailed",
    "LogSettings",
    "LogSetupError",
    "SecretFilter",
    "celery_logging_hook",
    "close_process_logging",
    "log_level",
    "redact",
    "register_secret",
    "run_logged",
    "safe_file_part",
    "setup_process_logging",
    "subprocess_logger",
    "vm_log_path",
    "vm_logger",
]
