"""The chunk file checks on frames the store meets: several blocks, RLE blocks, checksums."""

from __future__ import annotations

import os
import random
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest
import zstandard

from hamal_workers.targets.base import CODEC_RAW, CODEC_ZSTD
from hamal_workers.targets.chunk_format import (
    CHUNK_MAGIC,
    HEADER_SIZE,
    check_payload,
    chunk_header,
    content_problem,
    decode_payload,
    max_payload,
    shape_problem,
)
from hamal_workers.targets.chunkstore import ChunkStore
from hamal_workers.targets.encryption import OVERHEAD

MiB = 1024 * 1024
_rng = random.Random(11)
# A random stretch, a run of one byte (zstd stores it as RLE blocks), then text: a frame
# of five blocks of three kinds.
CONTENT = _rng.randbytes(64 * 1024) + b"\x07" * (256 * 1024) + b"abc" * 50_000


def frame(checksum: bool) -> bytes:
    return zstandard.ZstdCompressor(level=1, write_checksum=checksum).compress(CONTENT)


def block_kinds(data: bytes) -> list[int]:
    at = zstandard.frame_header_size(data)
    kinds = []
    while True:
        header = int.from_bytes(data[at : at + 3], "little")
        kinds.append((header >> 1) & 3)
        at += 3 + (1 if (header >> 1) & 3 == 1 else header >> 3)
        if header & 1:
            return kinds


@contextmanager
def chunk_file(tmp_path: Path, data: bytes) -> Iterator[int]:
    path = tmp_path / "chunk"
    path.write_bytes(data)
    fd = os.open(path, os.O_RDONLY)
    try:
        yield fd
    finally:
        os.close(fd)


def test_the_frames_here_have_several_blocks_and_rle_ones() -> None:
    kinds = block_kinds(frame(False))
    assert len(kinds) > 2 and 1 in kinds and 2 in kinds
    assert zstandard.get_frame_parameters(frame(True)).has_checksum


@pytest.mark.parametrize("checksum", [False, True], ids=["plain", "checksummed"])
def test_a_whole_zstd_chunk_passes_every_check(tmp_path: Path, checksum: bool) -> None:
    data = chunk_header(CODEC_ZSTD) + frame(checksum)
    with chunk_file(tmp_path, data) as fd:
        assert shape_problem(fd, len(CONTENT)) is None
        assert content_problem(fd, CONTENT, MiB) is None
        assert content_problem(fd, bytearray(CONTENT), MiB) is None
        assert shape_problem(fd, len(CONTENT) - 1) == (
            f"declares {len(CONTENT)} bytes, {len(CONTENT) - 1} expected"
        )
    assert decode_payload(CODEC_ZSTD, frame(checksum), MiB) == CONTENT


@pytest.mark.parametrize("checksum", [False, True], ids=["plain", "checksummed"])
def test_the_store_reuses_a_whole_zstd_chunk(tmp_path: Path, checksum: bool) -> None:
    store = ChunkStore(tmp_path / "store", chunk_size=MiB, full_compare_days=1)
    name = store.chunk_name(CONTENT)
    assert store.put_chunk(name, frame(checksum), CODEC_ZSTD, len(CONTENT)) > 0
    assert store.has_chunk(name, len(CONTENT))
    assert store.has_chunk(name, len(CONTENT), CONTENT)
    assert store.put_chunk(name, frame(checksum), CODEC_ZSTD, len(CONTENT)) == 0
    assert store.get_chunk(name) == CONTENT


@pytest.mark.parametrize(
    ("damage", "problem"),
    [
        ("checksum cut", "ends its zstd frame at byte {end} of {size}"),
        ("checksum added", "ends its zstd frame at byte {end} of {size}"),
        ("last block cut", "has a damaged or truncated zstd frame"),
        ("last flag cleared", "has a damaged or truncated zstd frame"),
    ],
)
def test_a_frame_that_does_not_end_at_the_end_of_the_file_is_refused(
    tmp_path: Path, damage: str, problem: str
) -> None:
    good = frame(damage == "checksum cut")
    at = zstandard.frame_header_size(good)
    starts = []
    while True:  # the offset of every block header
        starts.append(at)
        header = int.from_bytes(good[at : at + 3], "little")
        at += 3 + (1 if (header >> 1) & 3 == 1 else header >> 3)
        if header & 1:
            break
    blocks_end = HEADER_SIZE + at
    if damage == "checksum cut":
        payload = good[:-4]
        end = blocks_end + 4
    elif damage == "checksum added":
        payload = good + b"\x00" * 4
        end = blocks_end
    elif damage == "last block cut":
        payload = good[:-1]
        end = 0
    else:
        last = starts[-1]
        header = int.from_bytes(good[last : last + 3], "little") & ~1
        payload = good[:last] + header.to_bytes(3, "little") + good[last + 3 :]
        end = 0
    data = chunk_header(CODEC_ZSTD) + payload
    with chunk_file(tmp_path, data) as fd:
        expected = problem.format(end=end, size=len(data))
        assert shape_problem(fd, len(CONTENT)) == expected
        assert content_problem(fd, CONTENT, MiB) == expected


def test_a_file_larger_than_any_chunk_is_refused_before_it_is_decoded(tmp_path: Path) -> None:
    size = max_payload(64 * 1024) + 1
    with chunk_file(tmp_path, chunk_header(CODEC_RAW) + bytes(size)) as fd:
        assert content_problem(fd, bytes(64 * 1024), 64 * 1024) == (
            "is larger than any chunk can be"
        )
    exact = max_payload(64 * 1024)
    with chunk_file(tmp_path, chunk_header(CODEC_RAW) + bytes(exact)) as fd:
        assert content_problem(fd, bytes(64 * 1024), 64 * 1024) == (
            f"holds {exact} bytes, {64 * 1024} expected"
        )


def test_raw_chunks_are_checked_by_length_and_content(tmp_path: Path) -> None:
    content = b"hamal" * 1000
    with chunk_file(tmp_path, chunk_header(CODEC_RAW) + content) as fd:
        assert shape_problem(fd, len(content)) is None
        assert content_problem(fd, content, MiB) is None
        assert shape_problem(fd, len(content) + 1) == f"holds {len(content)} bytes, 5001 expected"
        changed = b"H" + content[1:]
        assert content_problem(fd, changed, MiB) == "differs from the content it is named for"
    with chunk_file(tmp_path, CHUNK_MAGIC + b"\x02" + content) as fd:
        assert shape_problem(fd, len(content)) == "has unknown codec 2"
    with chunk_file(tmp_path, CHUNK_MAGIC) as fd:
        assert shape_problem(fd, 0) == "is truncated or not a hamal chunk (bad header)"
    with chunk_file(tmp_path, b"HMC2\x00" + content) as fd:
        assert shape_problem(fd, len(content)) == "is truncated or not a hamal chunk (bad header)"


def test_payloads_are_checked_against_their_length() -> None:
    check_payload(b"x" * 10, CODEC_RAW, 10)
    with pytest.raises(ValueError, match="a raw payload of 10 bytes for 11 raw bytes"):
        check_payload(b"x" * 10, CODEC_RAW, 11)
    check_payload(frame(False), CODEC_ZSTD, len(CONTENT))
    with pytest.raises(ValueError, match=f"declaring {len(CONTENT)} bytes for 5 raw bytes"):
        check_payload(frame(False), CODEC_ZSTD, 5)
    with pytest.raises(ValueError, match="not a zstd frame"):
        check_payload(b"x" * 10, CODEC_ZSTD, 10)
    with pytest.raises(ValueError, match="unknown chunk codec 7"):
        check_payload(b"x", 7, 1)
    assert chunk_header(CODEC_ZSTD) == b"HMC1\x01" and chunk_header(CODEC_RAW) == b"HMC1\x00"


def test_decoding_refuses_more_than_a_chunk() -> None:
    assert decode_payload(CODEC_RAW, b"x" * 4096, 4096) == b"x" * 4096
    with pytest.raises(ValueError, match="holds 4097 bytes, more than a chunk"):
        decode_payload(CODEC_RAW, b"x" * 4097, 4096)
    big = zstandard.ZstdCompressor().compress(b"y" * 5000)
    with pytest.raises(ValueError, match="its frame declares 5000 bytes"):
        decode_payload(CODEC_ZSTD, big, 4096)
    with pytest.raises(ValueError, match="has unknown codec 9"):
        decode_payload(9, b"", 4096)
    # zstd's bound, and what sealing adds (nonces, a wrapped key, a tag).
    assert max_payload(128 * 1024) == 128 * 1024 + 1024 + 1024 + OVERHEAD


def test_a_zstd_payload_with_anything_after_its_frame_is_refused() -> None:
    good = frame(False)
    assert decode_payload(CODEC_ZSTD, good, MiB) == CONTENT
    with pytest.raises(ValueError, match="cannot be decompressed"):
        decode_payload(CODEC_ZSTD, good + b"junk", MiB)
    with pytest.raises(ValueError, match="cannot be decompressed"):
        decode_payload(CODEC_ZSTD, good + good, MiB)


def test_a_quarantined_chunk_keeps_why_in_at_most_a_kilobyte(tmp_path: Path) -> None:
    store = ChunkStore(tmp_path / "store", chunk_size=MiB)
    name = store.chunk_name(b"q" * 100)
    store.put_chunk(name, b"q" * 100, CODEC_RAW, 100)
    path = store.chunk_path(name)
    try:
        os.setxattr(path, "user.hamal.probe", b"1")
    except OSError:
        pytest.skip("this filesystem keeps no user extended attributes")
    assert store.quarantine_chunk(name, "r" * 2000)
    assert not store.quarantine_chunk(name, "again")  # nothing left to move
    (moved,) = [p for p in path.parent.iterdir() if ".damaged." in p.name]
    assert os.getxattr(moved, "user.hamal.damaged") == b"r" * 1024
    assert not store.has_chunk(name, 100)
