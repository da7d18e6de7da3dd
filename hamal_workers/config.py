"""hamal.conf: the one declaration of every key, and everything derived from it.

Each section is a frozen dataclass whose fields are its keys, declared with `option(...)`: the
annotation is the type, then the default, a one-line meaning, bounds or choices, and whether
the value is secret. `KEYS` (one `Key` per key) is read from those classes; parsing, validation,
error messages, the reference hamal.conf, `hamal config show` and the Celery settings all use
`KEYS`, so adding a key is one line here.
"""

import configparser
import difflib
import ipaddress
import os
import re
import stat
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field, fields
from typing import TypeVar, cast
from urllib.parse import SplitResult, unquote, urlsplit

from kombu import Queue

from hamal_workers.retention import RetentionPolicy, duration_seconds

DEFAULT_PATH = "/etc/hamal/hamal.conf"
# Scan, vm.sync and finalize; each platform's disk tasks have a queue named after it.
CONTROL_QUEUE = "period"


def queue_names() -> tuple[str, ...]:
    from hamal_workers.platforms import platform_names

    return (CONTROL_QUEUE, *platform_names())


# The reference hamal.conf is under 10 KiB; anything far larger is not a hamal.conf.
MAX_CONFIG_BYTES = 1024 * 1024

Value = bool | int | float | str
_V = TypeVar("_V", bool, int, float, str)


@dataclass(frozen=True)
class Rule:
    """An extra check of a text value, and how to say what it must be when it fails."""

    expected: str
    ok: Callable[[str], bool]


@dataclass(frozen=True)
class Exceeds:
    """A key must be more than `factor` times another key of `section`; `why` says why."""

    section: str
    name: str
    factor: int
    why: str


@dataclass(frozen=True)
class Key:
    """One hamal.conf key, as declared in its section class."""

    section: str
    name: str
    type: type  # bool, int, float or str
    default: Value
    meaning: str
    unit: str = ""
    low: int | float | None = None
    high: int | float | None = None
    high_key: str | None = None  # a key of the same section whose value caps this one
    choices: tuple[str, ...] = ()
    path: bool = False
    allow_empty: bool = False
    secret: bool = False
    rule: Rule | None = None
    exceeds: Exceeds | None = None

    @property
    def env_name(self) -> str:
        return f"HAMAL_{self.section}_{self.name}".upper()

    @property
    def comment(self) -> str:
        return f"{self.meaning} ({self.unit})" if self.unit else self.meaning

    def shown(self, text: str) -> str:
        """`text` as it may appear in a message or `config show`: never a secret."""
        if self.secret and text:
            return MASK
        return mask_url(text)

    def convert(self, text: str) -> Value | None:
        """The typed value written as `text`, or None when it is not one (bounds apart)."""
        if "\n" in text:  # a continuation line glued onto the value
            return None
        if self.type is bool:
            return _BOOLS.get(text.lower())
        if self.type is int:
            return _int(text) if _INT.fullmatch(text) else None
        if self.type is float:
            return float(text) if _FLOAT.fullmatch(text) else None
        if not text:
            return text if self.allow_empty else None
        if self.choices:
            return text.lower() if text.lower() in self.choices else None
        if self.rule and not self.rule.ok(text):
            return None
        return text

    def within(self, value: Value, high: int | float | None) -> bool:
        if self.type not in (int, float):
            return True
        assert self.low is not None and high is not None
        return self.low <= value <= high

    def expected(self, high: int | float | None) -> str:
        """What the operator may write, for the error message."""
        if self.type is bool:
            return "expected true or false (or yes/no, on/off, 1/0)"
        if self.type in (int, float):
            number = "a whole number" if self.type is int else "a number"
            unit = f" of {self.unit}" if self.unit else ""
            top = as_text(cast(float, high))
            if self.high_key:
                top = f"{self.high_key} ({top})"
            return f"expected {number}{unit} from {as_text(cast(float, self.low))} to {top}"
        if self.choices:
            return "expected one of: " + ", ".join(self.choices)
        what = (
            self.rule.expected if self.rule else "a path" if self.path else "a single line of text"
        )
        if self.allow_empty and (self.rule or self.path):
            return f"expected {what}, or empty"
        return f"expected {what}"


def _int(text: str) -> int | None:
    try:
        return int(text)
    except ValueError:  # more digits than int() converts (sys.get_int_max_str_digits)
        return None


def option(
    default: _V,
    meaning: str,
    *,
    unit: str = "",
    low: int | float | None = None,
    high: int | float | None = None,
    high_key: str | None = None,
    choices: tuple[str, ...] = (),
    path: bool = False,
    allow_empty: bool = False,
    secret: bool = False,
    rule: Rule | None = None,
    exceeds: Exceeds | None = None,
) -> _V:
    """Declare a key in a section class: the field name is the key, its annotation the type."""
    rules = {
        "meaning": meaning,
        "unit": unit,
        "low": low,
        "high": high,
        "high_key": high_key,
        "choices": choices,
        "path": path,
        "allow_empty": allow_empty,
        "secret": secret,
        "rule": rule,
        "exceeds": exceeds,
    }
    return cast(_V, field(default=default, metadata={"rules": rules}))


def _url_parts(text: str) -> SplitResult | None:
    """`text` taken apart as a URL, or None when a client would refuse it (bad host or port)."""
    try:
        parts = urlsplit(text)
        parts.port  # noqa: B018 - raises on a port that is not a number from 0 to 65535
    except ValueError:
        return None
    return parts


def _is_http_url(text: str) -> bool:
    parts = _url_parts(text)
    return parts is not None and parts.scheme in ("http", "https") and bool(parts.hostname)


def _is_ip_address(text: str) -> bool:
    try:
        ipaddress.ip_address(text)
    except ValueError:
        return False
    return True


def _is_redis_url(text: str) -> bool:
    parts = _url_parts(text)
    if parts is None:
        return False
    if parts.scheme in ("redis", "rediss"):
        return bool(parts.hostname)
    return parts.scheme == "unix" and bool(parts.path)


# Ten years: longer is a typo (a unit left out), not a retention anyone means.
MAX_DURATION_S = 3650 * 86400


def _is_duration(text: str) -> bool:
    try:
        return duration_seconds(text) <= MAX_DURATION_S
    except ValueError:
        return False


HTTP_URL = Rule("an http:// or https:// URL", _is_http_url)
IP_ADDRESS = Rule("an IPv4 or IPv6 address", _is_ip_address)
REDIS_URL = Rule("a redis://, rediss:// or unix:// URL", _is_redis_url)
DURATION = Rule(
    "a duration of at most 3650d: seconds, or a number with unit s, m, h, d or w "
    "(90s, 30m, 12h, 7d, 2w)",
    _is_duration,
)


@dataclass(frozen=True)
class Conflict:
    """Keys of one section that are each valid but not together, and what to say about it."""

    names: tuple[str, ...]  # the keys at fault, in the order the message names them
    problem: str  # what is wrong, then what is expected


class Section:
    """Base of the section classes: their fields are the keys of one [section]."""

    def conflicts(self) -> list[Conflict]:
        """What is wrong with the keys taken together, once each is valid on its own."""
        return []


# Sections in the ops guide's order, keys in its order; what the ops guide lacks comes after.


@dataclass(frozen=True)
class DefaultSection(Section):
    debug: bool = option(False, "Enable debug logs")
    verbose: bool = option(False, "Enable verbose logs")
    log_rotation_type: str = option("size", "Log rotation by size", choices=("size",))
    max_logfile_count: int = option(10, "Max number of log files", low=1, high=1000)
    max_logfile_size_mb: int = option(64, "Max size per log file", unit="MB", low=1, high=10240)
    hamal_lib_dir: str = option("/var/lib/hamal/", "Program data directory", path=True)
    hamal_info_path: str = option("/var/lib/hamal/hamal_info", "Program info file path", path=True)
    log_dir: str = option("/var/log/hamal", "Log files directory", path=True)


@dataclass(frozen=True)
class PeriodSection(Section):
    interval: int = option(60, "Interval for scheduled tasks", unit="seconds", low=5, high=86400)
    task_update_wait_time: float = option(
        1.0, "Least time between status updates of a task", unit="seconds", low=0.1, high=3600
    )
    openstack_release_cpu_time: int = option(
        0, "Time slept per MB read from OpenStack", unit="ms per MB", low=0, high=1000
    )
    vmware_release_cpu_time: int = option(
        0, "Time slept per MB read from VMware", unit="ms per MB", low=0, high=1000
    )


@dataclass(frozen=True)
class MassSection(Section):
    mass_endpoint: str = option(
        "", "Mass service API address; empty = local mode", allow_empty=True, rule=HTTP_URL
    )
    auth_key: str = option("", "Auth key", allow_empty=True, secret=True)
    hyper_exporter_id: str = option("", "Unique ID for Hyper Exporter", allow_empty=True)
    public_key_path: str = option(
        "/etc/hamal/public_key", "Public key: unsigned tasks are refused", path=True
    )
    default_request_timeout: int = option(600, "Request timeout", unit="seconds", low=1, high=86400)
    enable_get_public_ips: bool = option(False, "Enable public IP retrieval")
    get_public_ip_timeout: int = option(
        5, "Public IP retrieval timeout", unit="seconds", low=1, high=300
    )
    enable_heartbeat_msg: bool = option(True, "Enable heartbeat reporting")
    # What the ops guide's [mass] lacks: how to trust Mass' certificate.
    ca_file: str = option(
        "", "CA bundle for Mass' certificate; empty = the system's", path=True, allow_empty=True
    )
    insecure: bool = option(False, "Do not verify Mass' certificate (tests only)")

    def conflicts(self) -> list[Conflict]:
        found = []
        if self.mass_endpoint and not (self.auth_key and self.hyper_exporter_id):
            found.append(
                Conflict(
                    ("mass_endpoint", "auth_key", "hyper_exporter_id"),
                    "mass_endpoint is set: expected auth_key and hyper_exporter_id too",
                )
            )
        if self.insecure and self.ca_file:
            found.append(
                Conflict(
                    ("insecure", "ca_file"), "both set: expected ca_file or insecure, not both"
                )
            )
        return found


@dataclass(frozen=True)
class VmwareSection(Section):
    skip_disk_flag: bool = option(False, "Skip disk flag check")
    disk_flag_size: int = option(48, "Minimum disk size for flag", unit="MB", low=0, high=1048576)
    max_read_blocks: int = option(1024, "Max blocks per read", low=1, high=65536)
    # What the ops guide's [vmware] lacks: where vCenter is and how to reach it.
    host: str = option("", "vCenter address; empty = VMware off", allow_empty=True)
    port: int = option(443, "vCenter HTTPS port", low=1, high=65535)
    user: str = option("", "vCenter user", allow_empty=True)
    password: str = option("", "vCenter password", allow_empty=True, secret=True)
    ca_file: str = option(
        "", "CA bundle for vCenter's certificate; empty = the system's", path=True, allow_empty=True
    )
    insecure: bool = option(False, "Do not verify vCenter's certificate (tests only)")
    transport: str = option("https", "How disks are read", choices=("https", "nbd"))
    vms: str = option(
        "",
        "VMs to protect: instance UUIDs, managed object ids or names, comma-separated; "
        "empty = every VM",
        allow_empty=True,
    )
    quiesce: bool = option(False, "Quiesce guest file systems (VMware Tools) in snapshots")
    snapshot_timeout: int = option(
        3600, "Longest a snapshot creation or removal may take", unit="seconds", low=1,
        high=86400,
    )  # fmt: skip
    # transport = nbd: an nbdkit per disk serves the snapshot's disk, libnbd reads it.
    nbdkit: str = option("nbdkit", "The nbdkit program (transport = nbd)")
    nbd_plugin: str = option(
        "vddk", "nbdkit plugin: vddk (VMware's VDDK) or file (datastores mounted here)",
        choices=("vddk", "file"),
    )  # fmt: skip
    vddk_libdir: str = option(
        "", "VDDK's directory, which the operator provides (nbd_plugin = vddk)", path=True,
        allow_empty=True,
    )  # fmt: skip
    vddk_thumbprint: str = option(
        "", "SHA-1 thumbprint of the certificate of vCenter, for VDDK", allow_empty=True
    )
    datastore_mounts: str = option(
        "",
        "Where datastores are mounted on this machine, as name=directory pairs, "
        "comma-separated (nbd_plugin = file)",
        allow_empty=True,
    )

    def mounts(self) -> dict[str, str]:
        """datastore name -> directory, from datastore_mounts."""
        found = {}
        for part in self.datastore_mounts.split(","):
            name, _, directory = part.strip().partition("=")
            if name.strip() and directory.strip():
                found[name.strip()] = directory.strip()
        return found

    def conflicts(self) -> list[Conflict]:
        found = []
        if self.host and not (self.user and self.password):
            found.append(
                Conflict(
                    ("host", "user", "password"),
                    "host is set: expected user and password too",
                )
            )
        if self.insecure and self.ca_file:
            found.append(
                Conflict(
                    ("insecure", "ca_file"), "both set: expected ca_file or insecure, not both"
                )
            )
        vddk = self.transport == "nbd" and self.nbd_plugin == "vddk"
        if vddk and not (self.vddk_libdir and self.vddk_thumbprint):
            found.append(
                Conflict(
                    ("transport", "nbd_plugin", "vddk_libdir", "vddk_thumbprint"),
                    "nbd through VDDK: expected vddk_libdir and vddk_thumbprint too",
                )
            )
        if self.transport == "nbd" and self.nbd_plugin == "file":
            malformed = [
                p.strip()
                for p in self.datastore_mounts.split(",")
                if p.strip() and not all(x.strip() for x in p.strip().partition("=")[::2])
            ]
            if not self.mounts() or malformed:
                found.append(
                    Conflict(
                        ("transport", "nbd_plugin", "datastore_mounts"),
                        "nbd from mounted datastores: expected datastore_mounts as "
                        "name=directory pairs, comma-separated",
                    )
                )
        return found


@dataclass(frozen=True)
class OpenstackCephSection(Section):
    skip_disk_flag: bool = option(False, "Skip disk flag check")
    disk_flag_size: int = option(48, "Minimum disk size for flag", unit="MB", low=0, high=1048576)


@dataclass(frozen=True)
class SyncSection(Section):
    save_local_snapshot_metadata: bool = option(False, "Save snapshot metadata locally")
    upload_metadata_to_oss: bool = option(False, "Upload metadata to OSS")


@dataclass(frozen=True)
class DataSyncV2Section(Section):
    fsync_period_frequency: int = option(
        3, "Checkpoint flush period", unit="seconds", low=1, high=3600
    )
    fsync_timeout: int = option(
        0, "Longest a flush may take, 0 = no limit", unit="seconds", low=0, high=86400
    )
    parallel_sync_disks_count: int = option(
        4, "Disks synced at once per worker", low=1, high_key="max_parallel_sync_disks_count"
    )
    pre_disk_readers_count: int = option(
        2, "Reader threads per disk", low=1, high_key="max_pre_disk_readers_count"
    )
    max_parallel_sync_disks_count: int = option(16, "Max parallel disk syncs", low=1, high=256)
    max_pre_disk_readers_count: int = option(16, "Max reader threads per disk", low=1, high=256)


@dataclass(frozen=True)
class FusionComputeSection(Section):
    task_timeout: int = option(3600, "Task timeout", unit="seconds", low=1, high=604800)
    create_snap_task_timeout: int = option(
        3600, "Snapshot creation timeout", unit="seconds", low=1, high=604800
    )
    delete_snap_task_timeout: int = option(
        3600, "Snapshot deletion timeout", unit="seconds", low=1, high=604800
    )
    local_host_ip: str = option("", "Local host IP (optional)", allow_empty=True, rule=IP_ADDRESS)
    # FusionCompute itself refuses more than 8 connections per host.
    max_socket_connections_per_host: int = option(8, "Max connections per host", low=1, high=8)
    max_writer_num: int = option(10, "Max writer threads", low=1, high=64)
    # What the ops guide's [fusion_compute] lacks: where the VRM is and how to reach it.
    vrm_host: str = option("", "VRM address; empty = FusionCompute off", allow_empty=True)
    vrm_port: int = option(7443, "VRM HTTPS port", low=1, high=65535)
    user: str = option("", "VRM user (an interface account)", allow_empty=True)
    password: str = option("", "VRM password", allow_empty=True, secret=True)
    user_type: int = option(2, "User type: 0 local, 1 domain, 2 interface account", low=0, high=2)
    api_version: str = option("8.0", "VRM interface version", choices=("6.3", "6.5", "8.0"))
    ca_file: str = option(
        "", "CA bundle for the VRM's certificate; empty = the system's", path=True,
        allow_empty=True,
    )  # fmt: skip
    insecure: bool = option(False, "Do not verify the VRM's certificate (tests only)")
    vms: str = option(
        "", "VMs to protect: UUIDs, URNs or names, comma-separated; empty = every VM",
        allow_empty=True,
    )  # fmt: skip
    transport_mode: str = option(
        "lanssl", "How hosts send disk data: lanssl (TLS) or lan (plain)", choices=("lanssl", "lan")
    )
    api_calls_per_minute: int = option(
        300, "Most VRM calls a minute from the whole fleet", low=1, high=6000
    )
    request_timeout: int = option(
        60, "Longest one VRM call or socket read may take", unit="seconds", low=1, high=3600
    )
    backup_resource_delay: int = option(
        600, "Life of a backup resource between keep-alives", unit="seconds", low=60, high=7200
    )

    def conflicts(self) -> list[Conflict]:
        found = []
        if self.vrm_host and not (self.user and self.password):
            found.append(
                Conflict(
                    ("vrm_host", "user", "password"),
                    "vrm_host is set: expected user and password too",
                )
            )
        if self.insecure and self.ca_file:
            found.append(
                Conflict(
                    ("insecure", "ca_file"), "both set: expected ca_file or insecure, not both"
                )
            )
        return found


@dataclass(frozen=True)
class RedisSection(Section):
    url: str = option(
        "redis://127.0.0.1:6379/0", "Broker, results, schedule and state", rule=REDIS_URL
    )
    socket_timeout: float = option(
        5.0, "Longest one Redis call may block", unit="seconds", low=0.1, high=300
    )


@dataclass(frozen=True)
class TargetSection(Section):
    type: str = option(
        "local",
        "Where restore points are stored: local (path), s3 ([s3]) or replica ([replica])",
        choices=("local", "s3", "replica"),
    )
    path: str = option("/var/lib/hamal/store", "Chunk store directory", path=True)
    writers: int = option(10, "Writer threads per disk sync", low=1, high=64)
    # Comparing every reused chunk in full costs an unchanged re-read several times its
    # source read; each day another part of the names gets that check (bench/chunkstore.py).
    full_compare_days: int = option(
        7, "Days over which every reused chunk is compared in full once", low=1, high=365
    )
    # The store records the key's id at its creation: a store is encrypted from then or never.
    encryption_key_file: str = option(
        "", "Master key of chunks encrypted at rest (hamal key new); empty = not encrypted",
        path=True, allow_empty=True,
    )  # fmt: skip


@dataclass(frozen=True)
class LocalSection(Section):
    inventory: str = option(
        "", "A directory per VM, *.raw/*.img disks; empty = off", path=True, allow_empty=True
    )
    release_cpu_time: int = option(
        0, "Time slept per MB read from local disks", unit="ms per MB", low=0, high=1000
    )
    keep_base_snapshot: bool = option(
        False, "Keep the last snapshot copy as the base, as Ceph must (tests, demos)"
    )


@dataclass(frozen=True)
class OpenstackSection(Section):
    cloud: str = option(
        "", "A cloud of clouds.yaml; when set, it gives the connection keys", allow_empty=True
    )
    auth_url: str = option(
        "", "Keystone v3 address; empty (and no cloud) = off", allow_empty=True, rule=HTTP_URL
    )
    username: str = option("", "User name", allow_empty=True)
    password: str = option("", "Password", allow_empty=True, secret=True)
    project_name: str = option("", "Project of the protected instances", allow_empty=True)
    user_domain_name: str = option("Default", "Domain of the user")
    project_domain_name: str = option("Default", "Domain of the project")
    region_name: str = option("", "Region; empty = the catalog's only one", allow_empty=True)
    interface: str = option(
        "public", "Endpoints used from the catalog", choices=("public", "internal", "admin")
    )
    cacert: str = option(
        "", "CA bundle for the API certificates; empty = the system's", path=True, allow_empty=True
    )
    insecure: bool = option(False, "Do not verify the API certificates (tests only)")
    api_timeout: int = option(60, "Longest one API call may take", unit="seconds", low=1, high=3600)
    servers: str = option(
        "",
        "Instances to protect, ids or names, comma-separated; empty = every one of the project",
        allow_empty=True,
    )

    def conflicts(self) -> list[Conflict]:
        found = []
        if self.cloud and self.auth_url:
            found.append(
                Conflict(("cloud", "auth_url"), "both set: expected one of them, not both")
            )
        if self.auth_url and not (self.username and self.password and self.project_name):
            found.append(
                Conflict(
                    ("auth_url", "username", "password", "project_name"),
                    "auth_url is set: expected username, password and project_name too",
                )
            )
        if self.insecure and self.cacert:
            found.append(
                Conflict(("insecure", "cacert"), "both set: expected cacert or insecure, not both")
            )
        return found


@dataclass(frozen=True)
class CephSection(Section):
    conf: str = option(
        "/etc/ceph/ceph.conf", "ceph.conf of the cluster holding the disks", path=True
    )
    client_id: str = option("admin", "Ceph user, without 'client.'")
    keyring: str = option(
        "", "Keyring of that user; empty = where ceph.conf says", path=True, allow_empty=True
    )
    volumes_pool: str = option("volumes", "Pool of the Cinder volumes")
    vms_pool: str = option("vms", "Pool of the Nova ephemeral disks")
    group_snapshots: bool = option(
        True, "Snapshot an instance's disks together in an RBD group (crash-consistent)"
    )
    connect_timeout: int = option(
        10, "Longest the cluster connection may take", unit="seconds", low=1, high=600
    )


@dataclass(frozen=True)
class S3Section(Section):
    endpoint_url: str = option(
        "", "S3 endpoint (OSS, RGW, MinIO ...); empty = AWS's for the region", allow_empty=True
    )
    bucket: str = option("", "Bucket of the chunk store", allow_empty=True)
    prefix: str = option("", "Key prefix of the store inside the bucket", allow_empty=True)
    region: str = option("us-east-1", "Region of the bucket")
    addressing_style: str = option(
        "auto", "Bucket in the path or in the host name", choices=("auto", "path", "virtual")
    )
    access_key: str = option(
        "", "Access key id; empty = the AWS environment and files", allow_empty=True
    )
    secret_key: str = option("", "Secret access key", allow_empty=True, secret=True)
    ca_bundle: str = option(
        "", "CA bundle for the endpoint's certificate; empty = the system's", path=True,
        allow_empty=True,
    )  # fmt: skip
    insecure: bool = option(False, "Do not verify the endpoint's certificate (tests only)")
    connect_timeout: int = option(
        10, "Longest a connection may take to open", unit="seconds", low=1, high=600
    )
    read_timeout: int = option(60, "Longest an answer may take", unit="seconds", low=1, high=3600)
    max_attempts: int = option(
        8, "Attempts of one request (throttling, 5xx, dropped connections)", low=1, high=50
    )

    def conflicts(self) -> list[Conflict]:
        found = []
        if bool(self.access_key) != bool(self.secret_key):
            found.append(
                Conflict(
                    ("access_key", "secret_key"),
                    "one is set: expected both, or neither (the AWS environment and files)",
                )
            )
        if self.insecure and self.ca_bundle:
            found.append(
                Conflict(
                    ("insecure", "ca_bundle"), "both set: expected ca_bundle or insecure, not both"
                )
            )
        if self.prefix.startswith("/") or "//" in self.prefix:
            found.append(
                Conflict(("prefix",), f"{self.prefix!r}: expected key parts like 'hamal/site-1'")
            )
        return found


def replica_devices(text: str) -> tuple[list[tuple[str, str, str]], list[str]]:
    """[replica] devices as (VM, DISK, path) entries, and every entry not VM:DISK=/path.

    Entries are comma-separated; the VM (an id or a name) ends at the last ':' before the
    '=', since disk names never hold one and a VM name may.
    """
    found = []
    bad = []
    for entry in (part.strip() for part in text.split(",")):
        if not entry:
            continue
        left, _, path = entry.partition("=")
        vm, _, disk = left.strip().rpartition(":")
        vm, disk, path = vm.strip(), disk.strip(), path.strip()
        if vm and disk and os.path.isabs(path):
            found.append((vm, disk, os.path.normpath(path)))
        else:
            bad.append(entry)
    return found, bad


@dataclass(frozen=True)
class ReplicaSection(Section):
    directory: str = option(
        "/var/lib/hamal/replica",
        "Replica records (points, flags); disks not in devices are images under images/",
        path=True,
    )
    devices: str = option(
        "",
        "Disks kept in an existing image file or block device, as VM:DISK=/path entries, "
        "comma-separated; VM is its id or name",
        allow_empty=True,
    )

    def devices_map(self) -> dict[tuple[str, str], str]:
        """(VM id or name, disk) -> the path its replica is kept at."""
        return {(vm, disk): path for vm, disk, path in replica_devices(self.devices)[0]}

    def conflicts(self) -> list[Conflict]:
        found = []
        entries, bad = replica_devices(self.devices)
        if bad:
            shown = ", ".join(repr(shorten(entry)) for entry in bad[:3])
            found.append(
                Conflict(("devices",), f"{shown}: expected VM:DISK=/absolute/path, comma-separated")
            )
        by_path: dict[str, list[str]] = {}
        by_disk: dict[tuple[str, str], list[str]] = {}
        for vm, disk, path in entries:
            by_path.setdefault(path, []).append(f"{vm}:{disk}")
            by_disk.setdefault((vm, disk), []).append(path)
        for path, names in by_path.items():
            if len(names) > 1:
                shown = f"{', '.join(names)} all map to {shorten(path)}"
                problem = f"{shown}: expected one disk per path"
                found.append(Conflict(("devices",), problem))
        for (vm, disk), paths in by_disk.items():
            if len(paths) > 1:
                problem = f"{vm}:{disk} is given {len(paths)} times: expected one path per disk"
                found.append(Conflict(("devices",), problem))
        inside = os.path.join(os.path.normpath(self.directory), "")
        mine = [path for _, _, path in entries if os.path.join(path, "").startswith(inside)]
        if mine:
            found.append(
                Conflict(
                    ("directory", "devices"),
                    f"{shorten(mine[0])} is inside directory: expected devices elsewhere "
                    "(the directory holds the target's records and its own images)",
                )
            )
        return found


@dataclass(frozen=True)
class WorkerSection(Section):
    disk_task_time_limit: int = option(
        43200, "Longest a disk task may run", unit="seconds", low=600, high=604800
    )
    # Leases are renewed every third of this, so two renewals may fail before one expires.
    lease_timeout: int = option(
        30,
        "A lease not renewed for this long expires",
        unit="seconds",
        low=3,
        high=3600,
        exceeds=Exceeds(
            "redis",
            "socket_timeout",
            3,
            "a lease is renewed every third of it, and a renewal that blocks for "
            "socket_timeout must end before the next one is due",
        ),
    )


# Far above any schedule (100000 days are 270 years): only a typo reaches it.
MAX_KEEP = 100000


def _periods_kept(default: int, periods: str) -> int:
    """Declare a keep_<period> key: how many of the newest `periods` with a point keep one."""
    meaning = f"Last point of each of the newest N {periods} that have one; 0 = none"
    return option(default, meaning, low=0, high=MAX_KEEP)


@dataclass(frozen=True)
class RetentionSection(Section):
    keep_last: int = option(24, "Newest restore points kept per VM", low=0, high=MAX_KEEP)
    keep_hourly: int = _periods_kept(0, "UTC hours")
    keep_daily: int = _periods_kept(7, "UTC days")
    keep_weekly: int = _periods_kept(4, "ISO weeks (UTC)")
    keep_monthly: int = _periods_kept(0, "UTC months")
    keep_within: str = option(
        "0",
        "Keep every point this recent (12h, 7d, 2w), relative to the VM's newest point; 0 = off",
        rule=DURATION,
    )

    def conflicts(self) -> list[Conflict]:
        # With every rule off only the newest point would be left: refused before a prune does it.
        if not RetentionPolicy.from_settings(self).keeps_nothing():
            return []
        names = tuple(f.name for f in fields(self))
        expected = "expected at least one of them above 0"
        return [Conflict(names, f"all 0 keeps no restore point but the newest: {expected}")]


@dataclass(frozen=True)
class MetricsSection(Section):
    # Loopback by default: a Prometheus on another host needs it opened on purpose.
    listen_address: str = option(
        "127.0.0.1", "Address `hamal metrics` serves Prometheus metrics on", rule=IP_ADDRESS
    )
    port: int = option(9464, "Port of `hamal metrics`", low=1, high=65535)


@dataclass(frozen=True)
class Settings:
    """Validated hamal.conf: one attribute per section, in file order."""

    default: DefaultSection
    period: PeriodSection
    mass: MassSection
    vmware: VmwareSection
    openstack_ceph: OpenstackCephSection
    sync: SyncSection
    data_sync_v2: DataSyncV2Section
    fusion_compute: FusionComputeSection
    redis: RedisSection
    target: TargetSection
    local: LocalSection
    openstack: OpenstackSection
    ceph: CephSection
    s3: S3Section
    replica: ReplicaSection
    worker: WorkerSection
    retention: RetentionSection
    metrics: MetricsSection
    path: str = ""
    warnings: list[str] = field(default_factory=list, compare=False)
    env_overrides: tuple[str, ...] = ()  # names of the HAMAL_* variables that set a key

    def get(self, section: str, key: str) -> Value:
        """The value of [section] key, with section spelled as in hamal.conf."""
        if (section, key) not in _KEYS_BY_ID:
            raise KeyError(f"[{section}] {key}")
        return cast(Value, getattr(getattr(self, section.lower()), key))

    def masked(self) -> dict[str, dict[str, str]]:
        """Every effective value as text, with secrets (and passwords in URLs) as ***."""
        texts: dict[str, dict[str, str]] = {section: {} for section in SECTIONS}
        for key in KEYS:
            texts[key.section][key.name] = key.shown(as_text(self.get(key.section, key.name)))
        return texts


def _section_name(attribute: str) -> str:
    # The ops guide's first section is [DEFAULT]; as an attribute it reads `default`.
    return "DEFAULT" if attribute == "default" else attribute


SECTIONS: dict[str, type[Section]] = {
    _section_name(f.name): f.type
    for f in fields(Settings)
    if isinstance(f.type, type) and issubclass(f.type, Section)
}
KEYS: tuple[Key, ...] = tuple(
    Key(section=section, name=f.name, type=f.type, default=f.default, **f.metadata["rules"])
    for section, cls in SECTIONS.items()
    for f in fields(cls)
)
_KEYS_BY_ID = {(key.section, key.name): key for key in KEYS}
_KEYS_BY_ENV = {key.env_name: key for key in KEYS}

_BOOLS = {"true": True, "yes": True, "on": True, "1": True}
_BOOLS |= {"false": False, "no": False, "off": False, "0": False}
_INT = re.compile(r"[+-]?[0-9]+")
_FLOAT = re.compile(r"[+-]?([0-9]+(\.[0-9]*)?|\.[0-9]+)([eE][+-]?[0-9]+)?")
# ?password=... or &password=...; the value ends at the next parameter.
_QUERY_PASSWORD = re.compile(r"([?&;]password=)([^&\n]*)", re.IGNORECASE)
MASK = "***"
# Values quoted in messages are cut to this many characters.
SHOWN_CHARS = 60
# A section header is one line, so a name holding a newline can never be [DEFAULT]'s stand-in:
# configparser's special default section would otherwise leak [DEFAULT] into every section.
_NO_DEFAULT_SECTION = "\n"


class ConfigError(Exception):
    """hamal.conf (or a HAMAL_* override) is unusable; `problems` has one line per problem."""

    def __init__(self, problems: list[str]) -> None:
        self.problems = list(problems)
        super().__init__("\n".join(self.problems))


def as_text(value: Value) -> str:
    """A value as hamal.conf writes it: True/False, and whole floats without '.0'."""
    if isinstance(value, float) and value.is_integer():
        return str(int(value))
    return str(value)


def ini_value(text: str) -> str:
    # An empty value is written as "" (as the ops guide does) so it is visibly empty.
    return text or '""'


def mask_url(text: str) -> str:
    """`text` with any URL password in it (user:password@, ?password=) replaced by ***."""
    return "\n".join(_mask_line(line) for line in text.split("\n"))


def url_passwords(text: str) -> list[str]:
    """Every URL password in `text` as written there (maybe percent-encoded); [] if none."""
    found = []
    for line in text.split("\n"):
        span = _userinfo_password(line)
        if span:
            found.append(line[span[0] : span[1]])
        found += [match.group(2) for match in _QUERY_PASSWORD.finditer(line) if match.group(2)]
    return found


def _mask_line(line: str) -> str:
    span = _userinfo_password(line)
    if span:
        line = f"{line[: span[0]]}{MASK}{line[span[1] :]}"
    return _QUERY_PASSWORD.sub(rf"\1{MASK}", line)


def _userinfo_password(line: str) -> tuple[int, int] | None:
    """Where the password of scheme://user:password@ is in `line`, found without parsing.

    It runs from the first ':' after '://' to the last '@' of the line, so a password holding
    '/', '#', '?', '@' or a space is found too (urlsplit would cut it or refuse the URL). Text
    between two URLs may be hidden with it: a password shown is worse than a host hidden.
    Linear in the length of the line, whatever it holds.
    """
    at = line.rfind("@")
    if at < 0:
        return None
    scheme_end = line.find("://", 0, at)
    if scheme_end < 0:
        return None
    colon = line.find(":", scheme_end + 3, at)
    return (colon + 1, at) if colon >= 0 else None


def shorten(text: str, *, quote: bool = False) -> str:
    """`text` for a message, cut to its first characters when long: a value can be megabytes."""
    head = repr(text[:SHOWN_CHARS]) if quote else text[:SHOWN_CHARS]
    return head if len(text) <= SHOWN_CHARS else f"{head}… ({len(text)} characters)"


def config_path(cli_value: str | None, environ: Mapping[str, str]) -> str:
    """The hamal.conf to read: --config, else $HAMAL_CONF, else /etc/hamal/hamal.conf."""
    return cli_value or environ.get("HAMAL_CONF") or DEFAULT_PATH


def defaults() -> Settings:
    """Settings with every key at its declared default, read from no file."""
    sections = {name.lower(): cls() for name, cls in SECTIONS.items()}
    return Settings(**sections, path="(defaults)")  # type: ignore[arg-type]


def load(path: str, environ: Mapping[str, str] | None = None) -> Settings:
    """Read and validate `path` with HAMAL_<SECTION>_<KEY> overrides from `environ`.

    `environ` None means os.environ, so a container's variables apply however the caller loads.
    Raises ConfigError listing every problem found; an unreadable file or a syntax error stops
    at that, since the rest of the file cannot be trusted.
    """
    environ = os.environ if environ is None else environ
    problems: list[str] = []
    warnings: list[str] = []
    texts = {key: (as_text(key.default), path) for key in KEYS}  # key -> (text, source)
    texts |= _file_texts(_read(path), path, problems, warnings)
    overrides = _env_texts(environ, warnings)
    texts |= overrides
    values = _validate(texts, problems)
    sections = _sections(values)
    problems += _conflicts(sections, texts, path)
    if problems:
        raise ConfigError(problems)
    return Settings(
        **{name.lower(): section for name, section in sections.items()},  # type: ignore[arg-type]
        path=path,
        warnings=warnings,
        env_overrides=tuple(overrides[key][1] for key in KEYS if key in overrides),
    )


def _read(path: str) -> configparser.ConfigParser:
    try:
        text = _read_bounded(path).decode("utf-8")
    except OSError as exc:
        raise ConfigError([f"{path}: cannot read: {exc.strerror or exc}"]) from None
    except UnicodeDecodeError as exc:
        raise ConfigError([f"{path}: cannot read: not UTF-8 (byte {exc.start})"]) from None
    parser = configparser.ConfigParser(
        delimiters=("=",),
        inline_comment_prefixes=("#", ";"),
        interpolation=None,
        empty_lines_in_values=False,
        default_section=_NO_DEFAULT_SECTION,
    )
    try:
        parser.read_string(text, source=path)
    except configparser.Error as exc:
        raise ConfigError(_syntax_problems(exc, path)) from None
    return parser


def _read_bounded(path: str) -> bytes:
    """The bytes of a regular file of at most MAX_CONFIG_BYTES; ConfigError for anything else.

    A device (/dev/zero), a FIFO or a huge file would otherwise be read until memory runs out.
    """
    # Non-blocking, or opening a FIFO would wait for a writer.
    fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC)
    try:
        status = os.fstat(fd)
        if not stat.S_ISREG(status.st_mode):
            kind = _file_kind(status.st_mode)
            raise ConfigError([f"{path}: cannot read: {kind}, not a regular file"])
        data = b""
        if status.st_size <= MAX_CONFIG_BYTES:
            with open(fd, "rb", closefd=False) as file:
                data = file.read(MAX_CONFIG_BYTES + 1)  # one byte more tells it grew past it
    finally:
        os.close(fd)
    if max(status.st_size, len(data)) > MAX_CONFIG_BYTES:
        limit = f"{MAX_CONFIG_BYTES // 1024**2} MiB"
        raise ConfigError([f"{path}: cannot read: larger than {limit}, too large for a hamal.conf"])
    return data


def _file_kind(mode: int) -> str:
    kinds = {
        stat.S_ISDIR: "a directory",
        stat.S_ISCHR: "a character device",
        stat.S_ISBLK: "a block device",
        stat.S_ISFIFO: "a FIFO",
        stat.S_ISSOCK: "a socket",
    }
    return next((kind for test, kind in kinds.items() if test(mode)), "a special file")


def _syntax_problems(exc: configparser.Error, path: str) -> list[str]:
    # Lines are named by number, never quoted: a malformed line may hold a secret.
    if isinstance(exc, configparser.MissingSectionHeaderError):
        return [f"{path}: line {exc.lineno}: expected a [section] header before the first key"]
    if isinstance(exc, configparser.DuplicateSectionError):
        return [f"{path}: line {exc.lineno}: section [{shorten(exc.section)}] appears twice"]
    if isinstance(exc, configparser.DuplicateOptionError):
        where = f"[{shorten(exc.section)}] {shorten(exc.option)}"
        return [f"{path}: line {exc.lineno}: {where} is set twice"]
    if isinstance(exc, configparser.ParsingError):
        return [f"{path}: line {lineno}: expected 'key = value'" for lineno, _ in exc.errors]
    return [f"{path}: {exc.message}"]


def _unquote(text: str) -> str:
    # The ops guide writes an empty value as "": wrapping double quotes are not part of it.
    text = text.strip()
    if len(text) >= 2 and text[0] == text[-1] == '"':
        return text[1:-1]
    return text


def _file_texts(
    parser: configparser.ConfigParser, path: str, problems: list[str], warnings: list[str]
) -> dict[Key, tuple[str, str]]:
    texts = {}
    for section in parser.sections():
        if section not in SECTIONS:
            known = ", ".join(SECTIONS)
            problems.append(
                f"{path}: [{shorten(section)}]: unknown section; known sections: {known}"
            )
            continue
        for name, text in parser.items(section):
            key = _KEYS_BY_ID.get((section, name))
            if key is None:
                warnings.append(_unknown_key(path, section, name))
            else:
                texts[key] = (_unquote(text), path)
    return texts


def _unknown_key(path: str, section: str, name: str) -> str:
    names = [key.name for key in KEYS if key.section == section]
    close = difflib.get_close_matches(name, names, n=1)
    hint = f" (did you mean {close[0]}?)" if close else ""
    return f"{path}: [{section}] {shorten(name)}: unknown key, ignored{hint}"


# HAMAL_* variables that are not hamal.conf keys: the config's path, the fault points of the
# tests, the install scripts' and compose's own (deploy/, docker-compose-hamal.yaml).
NOT_KEYS = frozenset(
    {
        "HAMAL_CONF", "HAMAL_FAULTS", "HAMAL_TESTRUN", "HAMAL_BEAT_HEARTBEAT_FILE",
        "HAMAL_ROOT", "HAMAL_PYTHON", "HAMAL_HEALTH_TIMEOUT", "HAMAL_VERSION",
        "HAMAL_REDIS_PASSWORD", "HAMAL_FLOWER_USER", "HAMAL_FLOWER_PASSWORD",
    }
)  # fmt: skip


def _env_texts(environ: Mapping[str, str], warnings: list[str]) -> dict[Key, tuple[str, str]]:
    texts = {}
    for variable, text in sorted(environ.items()):
        if not variable.startswith("HAMAL_") or variable in NOT_KEYS:
            continue
        key = _KEYS_BY_ENV.get(variable)
        if key is None:
            warnings.append(f"{shorten(variable)}: matches no hamal.conf key, ignored")
        else:
            texts[key] = (_unquote(text), variable)
    return texts


def _validate(texts: Mapping[Key, tuple[str, str]], problems: list[str]) -> dict[Key, Value]:
    values: dict[Key, Value] = {}
    # Keys checked against another key go last, so that key is known to be valid by then.
    for key in sorted(KEYS, key=lambda key: key.high_key is not None or key.exceeds is not None):
        text, source = texts[key]
        high = _high(key, values)
        value = key.convert(text)
        if value is None or not key.within(value, high):
            problem: str | None = key.expected(high)
        else:
            problem = _too_small(key, value, values, texts)
        if problem:
            shown = shorten(key.shown(text), quote=True)
            problems.append(f"{source}: [{key.section}] {key.name} = {shown}: {problem}")
        else:
            values[key] = value
    return values


def _sections(values: Mapping[Key, Value]) -> dict[str, Section]:
    """Each section whose keys are all valid, built from them."""
    built = {}
    for name, cls in SECTIONS.items():
        keys = [key for key in KEYS if key.section == name]
        if all(key in values for key in keys):
            built[name] = cls(**{key.name: values[key] for key in keys})
    return built


def _conflicts(
    sections: Mapping[str, Section], texts: Mapping[Key, tuple[str, str]], path: str
) -> list[str]:
    """One line per conflict between keys, led by where their values come from.

    The file comes first, then the HAMAL_* variables that set any of the keys, in key order.
    """
    found = [
        (name, conflict) for name, section in sections.items() for conflict in section.conflicts()
    ]
    found += _across_sections(sections)
    lines = []
    for name, conflict in found:
        keys = [_KEYS_BY_ID[(name, key_name)] for key_name in conflict.names]
        sources = dict.fromkeys(texts[key][1] for key in keys)
        where = ", ".join(sorted(sources, key=lambda source: source != path))
        lines.append(f"{where}: [{name}] {', '.join(conflict.names)}: {conflict.problem}")
    return lines


def _across_sections(sections: Mapping[str, Section]) -> list[tuple[str, Conflict]]:
    """Keys one section needs because of another's value (each section valid on its own)."""
    found: list[tuple[str, Conflict]] = []
    target, s3 = sections.get("target"), sections.get("s3")
    if (
        isinstance(target, TargetSection)
        and isinstance(s3, S3Section)
        and target.type == "s3"
        and not s3.bucket
    ):
        found.append(
            ("s3", Conflict(("bucket",), "empty, and [target] type is s3: expected a bucket"))
        )
    if (
        isinstance(target, TargetSection)
        and target.type == "replica"
        and target.encryption_key_file
    ):
        found.append(
            (
                "target",
                Conflict(
                    ("type", "encryption_key_file"),
                    "a replica is a raw copy of the disk: expected encryption_key_file empty "
                    "with type = replica (chunk stores only are encrypted)",
                ),
            )
        )
    return found


def _too_small(
    key: Key, value: Value, values: Mapping[Key, Value], texts: Mapping[Key, tuple[str, str]]
) -> str | None:
    """What `key` must exceed when it does not, per its `exceeds` rule; None when it does."""
    rule = key.exceeds
    if rule is None:
        return None
    other = _KEYS_BY_ID[(rule.section, rule.name)]
    if other not in values:  # invalid itself, and reported on its own
        return None
    least = rule.factor * cast(float, values[other])
    if cast(float, value) > least:
        return None
    source = texts[other][1]
    origin = "" if source == texts[key][1] else f", from {source}"
    unit = f" {key.unit}" if key.unit else ""
    return (
        f"expected more than {rule.factor} × [{rule.section}] {rule.name} "
        f"({as_text(values[other])}{origin}) = {least:g}{unit}: {rule.why}"
    )


def _high(key: Key, values: Mapping[Key, Value]) -> int | float | None:
    if key.high_key is None:
        return key.high
    cap = _KEYS_BY_ID[(key.section, key.high_key)]
    # An invalid cap is reported on its own; measured against it, this key would only add noise.
    return cast(int, values.get(cap, cap.high))


def ini_text(texts: Mapping[str, Mapping[str, str]]) -> str:
    """Sections of `key = value` lines, each key's meaning as a comment in one column."""
    assignments = {key: f"{key.name} = {ini_value(texts[key.section][key.name])}" for key in KEYS}
    column = max(map(len, assignments.values())) + 2
    lines = []
    for section in SECTIONS:
        lines.append(f"[{section}]")
        lines += [
            f"{line:<{column}}# {key.comment}"
            for key, line in assignments.items()
            if key.section == section
        ]
        lines.append("")
    return "\n".join(lines)


def reference_config_text() -> str:
    """The reference hamal.conf (etc/hamal/hamal.conf): every key at its default."""
    header = (
        "# hamal.conf: every key at its default. Written from hamal_workers/config.py.\n"
        "# Any key can be overridden by the environment variable HAMAL_<SECTION>_<KEY>.\n\n"
    )
    return header + ini_text(defaults().masked())


def visibility_timeout(settings: Settings) -> int:
    # Longer than the longest task allowed, so Redis never redelivers a task still running.
    return settings.worker.disk_task_time_limit + 3600


def _split_password(url: str) -> tuple[str, str]:
    """`url` without the password of its user part, and that password decoded ("" if none)."""
    parts = urlsplit(url)
    if parts.password is None:
        return url, ""
    userinfo, _, host = parts.netloc.rpartition("@")
    user = userinfo.partition(":")[0]
    netloc = f"{user}@{host}" if user else host
    # In place rather than urlunsplit, which would rewrite unix:///path as unix:/path.
    return url.replace(parts.netloc, netloc, 1), unquote(parts.password)


SOFT_SHUTDOWN_MAX_S = 90


def celery_settings(settings: Settings) -> dict[str, object]:
    """The Celery configuration every hamal process uses (worker, beat, CLI)."""
    url = settings.redis.url
    # Celery masks passwords in broker_url and result_backend, not in redbeat_redis_url, when it
    # shows settings (`celery inspect conf`, `celery report`): RedBeat gets the password in its
    # options, under a key Celery masks.
    redbeat_url, password = _split_password(url)
    time_limit = settings.worker.disk_task_time_limit
    # RedBeat's loop must wake at least once per scan; stand-by beats take over after 3 loops.
    loop_interval = min(5, settings.period.interval)
    return {
        "broker_url": url,
        "result_backend": url,
        "redbeat_redis_url": redbeat_url,
        "redbeat_redis_options": {"password": password} if password else {},
        # Every process must use the same value: the shortest one sharing the broker wins.
        "broker_transport_options": {"visibility_timeout": visibility_timeout(settings)},
        "result_backend_transport_options": {"visibility_timeout": visibility_timeout(settings)},
        "redbeat_key_prefix": "hamal:redbeat:",
        "beat_scheduler": "hamal_workers.beat:HamalScheduler",
        "beat_max_loop_interval": loop_interval,
        "redbeat_lock_timeout": 3 * loop_interval,
        "task_acks_late": True,
        "task_acks_on_failure_or_timeout": True,
        # Redelivering on a killed child can loop forever; leases re-dispatch lost disks instead.
        "task_reject_on_worker_lost": False,
        "worker_prefetch_multiplier": 1,
        # Stopped with SIGQUIT (or SIGTERM with REMAP_SIGTERM=SIGQUIT, as compose's workers
        # are), a worker lets its tasks run one more checkpoint period, then cancels them:
        # their messages go back to the queue at once and another worker resumes them from
        # their checkpoints, instead of waiting hours for the task or for a lease to expire.
        # At most 90 s: docker-compose-hamal.yaml gives workers 2 minutes to stop.
        "worker_soft_shutdown_timeout": float(
            min(2 * settings.data_sync_v2.fsync_period_frequency, SOFT_SHUTDOWN_MAX_S)
        ),
        "worker_concurrency": settings.data_sync_v2.parallel_sync_disks_count,
        "task_queues": tuple(Queue(name, routing_key=name) for name in queue_names()),
        "task_default_queue": "period",
        "task_create_missing_queues": False,
        # Disk tasks get their platform's queue when they are sent.
        "task_routes": {"hamal.period.*": {"queue": "period"}, "hamal.vm.*": {"queue": "period"}},
        "task_time_limit": time_limit,
        "task_soft_time_limit": time_limit - 60,
        "task_serializer": "json",
        "result_serializer": "json",
        "accept_content": ["json"],
        # The record of a sync is Hamal's own (run and disk hashes, events); results are
        # for whoever sent a task and waits on it, so they expire soon: kept for a day,
        # they would be millions of Redis keys at a thousand VMs.
        "result_expires": 600,
        "result_extended": True,
        "worker_send_task_events": True,
        # A sent event per message doubles the cost of sending it; Flower shows tasks from
        # when a worker receives them.
        "task_send_sent_event": False,
        "worker_hijack_root_logger": False,
        "broker_connection_retry_on_startup": True,
        "worker_cancel_long_running_tasks_on_connection_loss": True,
        "timezone": "UTC",
    }
