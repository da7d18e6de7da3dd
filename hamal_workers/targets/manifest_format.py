"""The on-disk encoding of a DiskManifest (docs/FORMAT.md, "Manifest").

    b"HMM1" | u32 big-endian header length | JSON header | count x 32-byte digest | blake3

The JSON header is {"version", "disk", "size", "chunk_size", "count", "hash"}. An all-zero
digest stands for a zero chunk (None). The trailing 32 bytes are the blake3 of everything
before them, so a truncated or altered manifest is never mistaken for a good one.
"""

from __future__ import annotations

import json
import struct
from collections.abc import Callable
from typing import Any

import blake3

from hamal_workers.targets.base import DIGEST_SIZE, CorruptManifest, DiskManifest

MAGIC = b"HMM1"
VERSION = 1
HASH_NAME = "blake3"

ZERO_DIGEST = bytes(DIGEST_SIZE)
_HEADER_LEN = struct.Struct(">I")
# A header is a handful of fields; anything larger is damage, not a bigger disk.
_MAX_HEADER = 64 * 1024


def expected_count(size: int, chunk_size: int) -> int:
    """How many entries a disk of `size` bytes has: ceil(size / chunk_size)."""
    return -(-size // chunk_size)


def encode_manifest(manifest: DiskManifest) -> bytes:
    """The bytes of a manifest file; ValueError if the manifest is inconsistent."""
    _check_shape(manifest)
    header = json.dumps(
        {
            "version": VERSION,
            "disk": manifest.disk,
            "size": manifest.size,
            "chunk_size": manifest.chunk_size,
            "count": len(manifest.entries),
            "hash": HASH_NAME,
        },
        sort_keys=True,
        separators=(",", ":"),
    ).encode()
    body = b"".join(
        [MAGIC, _HEADER_LEN.pack(len(header)), header]
        + [ZERO_DIGEST if d is None else d for d in manifest.entries]
    )
    return body + blake3.blake3(body).digest()


def decode_manifest(data: bytes, source: str = "<manifest>") -> DiskManifest:
    """Parse manifest bytes read from `source` (named in every error); raises CorruptManifest."""
    header, entries = _checked(data, source)
    manifest = DiskManifest(
        disk=header["disk"],
        size=header["size"],
        chunk_size=header["chunk_size"],
        entries=_entries(entries, header["count"]),
    )
    try:
        _check_shape(manifest)
    except ValueError as exc:
        raise CorruptManifest(f"manifest {source} is corrupt: {exc}") from None
    return manifest


def manifest_digests(data: bytes, source: str = "<manifest>") -> memoryview:
    """The entries of a manifest as they are stored: count x 32 bytes, zero entries as zeros.

    Checked like decode_manifest (magic, version, checksum, count) without making an
    object per entry: garbage collection reads every manifest of the store this way.
    """
    header, entries = _checked(data, source)
    if header["count"] != expected_count(header["size"], header["chunk_size"]):
        raise CorruptManifest(
            f"manifest {source} is corrupt: {header['count']} entries for a disk of "
            f"{header['size']} bytes in chunks of {header['chunk_size']}"
        )
    return entries


def _checked(data: bytes, source: str) -> tuple[dict[str, Any], memoryview]:
    """The header and the entry bytes of a manifest whose framing and checksum hold."""

    def fail(why: str) -> CorruptManifest:
        return CorruptManifest(f"manifest {source} is corrupt: {why}")

    if data[: len(MAGIC)] != MAGIC:
        raise fail("not a hamal manifest (bad magic)")
    start = len(MAGIC) + _HEADER_LEN.size
    if len(data) < start:
        raise fail(f"truncated ({len(data)} bytes)")
    (header_len,) = _HEADER_LEN.unpack_from(data, len(MAGIC))
    if header_len > _MAX_HEADER or len(data) < start + header_len:
        raise fail(f"truncated or damaged header ({len(data)} bytes, header {header_len})")
    header = _parse_header(data[start : start + header_len], fail)
    # The version is checked before the checksum: a newer layout may not even end in one.
    if header["version"] != VERSION:
        raise CorruptManifest(
            f"manifest {source}: manifest format version {header['version']} is newer than "
            f"this reader ({VERSION})"
            if header["version"] > VERSION
            else f"manifest {source}: unknown manifest format version {header['version']}"
        )
    if len(data) < start + header_len + DIGEST_SIZE or not _checksum_ok(data):
        raise fail(f"checksum mismatch: the file is truncated or altered ({len(data)} bytes)")
    entries_at = start + header_len
    count = header["count"]
    if len(data) - DIGEST_SIZE - entries_at != count * DIGEST_SIZE:
        raise fail(f"header says {count} entries, the file holds a different number")
    return header, memoryview(data)[entries_at : entries_at + count * DIGEST_SIZE]


def _parse_header(raw: bytes, fail: Callable[[str], CorruptManifest]) -> dict[str, Any]:
    try:
        header = json.loads(raw)
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise fail(f"unreadable header: {exc}") from None
    if not isinstance(header, dict):
        raise fail("unreadable header: not a JSON object")
    types = {"version": int, "disk": str, "size": int, "chunk_size": int, "count": int}
    for key, kind in types.items():
        value = header.get(key)
        # bool is an int in Python; a true/false here is damage all the same.
        if not isinstance(value, kind) or isinstance(value, bool):
            raise fail(f"header field {key!r} is missing or not {kind.__name__}")
    if header["version"] == VERSION and header.get("hash") != HASH_NAME:
        raise fail(f"unknown hash {header.get('hash')!r} (this reader knows {HASH_NAME})")
    return header


def _checksum_ok(data: bytes) -> bool:
    body, trailer = data[:-DIGEST_SIZE], data[-DIGEST_SIZE:]
    return blake3.blake3(body).digest() == trailer


def _entries(data: memoryview, count: int) -> list[bytes | None]:
    entries: list[bytes | None] = []
    for i in range(count):
        digest = bytes(data[i * DIGEST_SIZE : (i + 1) * DIGEST_SIZE])
        entries.append(None if digest == ZERO_DIGEST else digest)
    return entries


def _check_shape(manifest: DiskManifest) -> None:
    if manifest.size < 0 or manifest.chunk_size <= 0:
        raise ValueError(f"bad size {manifest.size} or chunk size {manifest.chunk_size}")
    want = expected_count(manifest.size, manifest.chunk_size)
    if len(manifest.entries) != want:
        raise ValueError(
            f"disk {manifest.disk!r} of {manifest.size} bytes needs {want} entries "
            f"of {manifest.chunk_size} bytes, the manifest has {len(manifest.entries)}"
        )
    for i, digest in enumerate(manifest.entries):
        if digest is not None and (len(digest) != DIGEST_SIZE or digest == ZERO_DIGEST):
            raise ValueError(f"entry {i} is not a {DIGEST_SIZE}-byte digest")
