"""The manifest file format: round trip, and every kind of damage refused with its file named."""

from __future__ import annotations

import json
import os
import struct

import blake3
import pytest

from hamal_workers.targets.base import CorruptManifest, DiskManifest
from hamal_workers.targets.manifest_format import (
    MAGIC,
    ZERO_DIGEST,
    decode_manifest,
    encode_manifest,
    expected_count,
)

CS = 64 * 1024


def digest(n: int) -> bytes:
    return blake3.blake3(n.to_bytes(8, "big")).digest()


def sample(count: int = 5, tail: int = 100) -> DiskManifest:
    entries: list[bytes | None] = [digest(i) if i % 2 == 0 else None for i in range(count)]
    return DiskManifest("disk-0", (count - 1) * CS + tail, CS, entries)


def handmade(header: dict[str, object], entries: list[bytes], *, checksum: bool = True) -> bytes:
    """A manifest built without the encoder, to reach what the encoder would never write."""
    raw = json.dumps(header).encode()
    body = MAGIC + struct.pack(">I", len(raw)) + raw + b"".join(entries)
    return body + (blake3.blake3(body).digest() if checksum else b"")


def good_header(**changes: object) -> dict[str, object]:
    header: dict[str, object] = {
        "version": 1,
        "disk": "d",
        "size": 2 * CS,
        "chunk_size": CS,
        "count": 2,
        "hash": "blake3",
    }
    header.update(changes)
    return header


def test_round_trip_keeps_zero_entries_and_last_short_chunk() -> None:
    manifest = sample()
    data = encode_manifest(manifest)
    assert data.startswith(MAGIC)
    assert data[-32:] == blake3.blake3(data[:-32]).digest()
    assert decode_manifest(data, "x") == manifest
    assert decode_manifest(data).entries[1] is None


def test_zero_entries_are_stored_as_all_zero_digests() -> None:
    data = encode_manifest(DiskManifest("d", 2 * CS, CS, [None, digest(1)]))
    entries = data[-32 * 3 : -32]
    assert entries[:32] == ZERO_DIGEST and entries[32:] == digest(1)


def test_empty_disk_round_trips() -> None:
    manifest = DiskManifest("empty", 0, CS, [])
    assert decode_manifest(encode_manifest(manifest)) == manifest


def test_unicode_disk_names_round_trip() -> None:
    manifest = DiskManifest('диск/../\u00e9 "q"', 1, CS, [digest(0)])
    assert decode_manifest(encode_manifest(manifest)).disk == manifest.disk


@pytest.mark.parametrize("cut", [1, 31, 32, 33, 100])
def test_truncated_manifest_is_refused_naming_the_file(cut: int) -> None:
    data = encode_manifest(sample())
    with pytest.raises(CorruptManifest, match=r"/store/x\.manifest is corrupt"):
        decode_manifest(data[:-cut], "/store/x.manifest")


@pytest.mark.parametrize("cut_to", [0, 3, 6, 20])
def test_manifest_cut_inside_its_header_is_refused(cut_to: int) -> None:
    with pytest.raises(CorruptManifest, match="m1"):
        decode_manifest(encode_manifest(sample())[:cut_to], "m1")


def test_altered_entry_is_refused() -> None:
    data = bytearray(encode_manifest(sample()))
    data[-40] ^= 0x01
    with pytest.raises(CorruptManifest, match="checksum"):
        decode_manifest(bytes(data), "m")


def test_altered_header_is_refused() -> None:
    manifest = sample()
    data = encode_manifest(manifest)
    # Same length and still valid JSON: only the checksum can tell.
    altered = data.replace(b"%d" % manifest.size, b"%d" % (manifest.size + 1), 1)
    assert altered != data
    with pytest.raises(CorruptManifest, match="checksum"):
        decode_manifest(altered, "m")


def test_bad_magic_is_refused() -> None:
    with pytest.raises(CorruptManifest, match="bad magic"):
        decode_manifest(b"XXXX" + encode_manifest(sample())[4:], "m")


def test_newer_version_is_refused_with_a_clear_message() -> None:
    data = handmade(good_header(version=2), [digest(0), digest(1)])
    with pytest.raises(CorruptManifest) as err:
        decode_manifest(data, "/s/points/v/p/d.manifest")
    assert "manifest format version 2 is newer than this reader (1)" in str(err.value)
    assert "/s/points/v/p/d.manifest" in str(err.value)


def test_newer_version_is_refused_even_without_a_checksum_we_know() -> None:
    data = handmade(good_header(version=3), [os.urandom(40)], checksum=False)
    with pytest.raises(CorruptManifest, match="version 3 is newer"):
        decode_manifest(data, "m")


def test_count_must_match_the_file_length() -> None:
    data = handmade(good_header(count=3), [digest(0), digest(1)])
    with pytest.raises(CorruptManifest, match="3 entries"):
        decode_manifest(data, "m")


def test_entries_must_cover_the_disk_exactly() -> None:
    data = handmade(good_header(size=3 * CS, count=2), [digest(0), digest(1)])
    with pytest.raises(CorruptManifest, match="needs 3 entries"):
        decode_manifest(data, "m")


@pytest.mark.parametrize(
    "header",
    [good_header(hash="sha256"), good_header(size="big"), good_header(disk=None), [1, 2]],
)
def test_bad_header_fields_are_refused(header: object) -> None:
    raw = json.dumps(header).encode()
    body = MAGIC + struct.pack(">I", len(raw)) + raw + digest(0) + digest(1)
    with pytest.raises(CorruptManifest, match="m"):
        decode_manifest(body + blake3.blake3(body).digest(), "m")


def test_encoder_refuses_an_inconsistent_manifest() -> None:
    with pytest.raises(ValueError, match="needs 2 entries"):
        encode_manifest(DiskManifest("d", CS + 1, CS, [digest(0)]))
    with pytest.raises(ValueError, match="entry 0"):
        encode_manifest(DiskManifest("d", 1, CS, [b"short"]))
    with pytest.raises(ValueError, match="entry 0"):
        encode_manifest(DiskManifest("d", 1, CS, [ZERO_DIGEST]))


@pytest.mark.parametrize(
    ("size", "count"), [(0, 0), (1, 1), (CS - 1, 1), (CS, 1), (CS + 1, 2), (10 * CS, 10)]
)
def test_expected_count_is_ceil(size: int, count: int) -> None:
    assert expected_count(size, CS) == count
