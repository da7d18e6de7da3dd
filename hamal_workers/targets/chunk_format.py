"""The encoding of one chunk file (docs/FORMAT.md, "Chunks"), and how a stored one is checked.

    b"HMC1" | codec byte (0 raw, 1 zstd; + 0x80 when sealed) | payload

A raw payload is the content itself. A zstd payload is exactly one zstd frame that
declares its content size (python-zstandard writes it by default). A sealed payload is
one of those encrypted (targets/encryption.py): its shape says less (a raw one still has
an exact size), and only the key opens it. The file's name is the chunk's name, which the
store derives from the raw content.

Three depths of checking, cheapest first:
  `shape_problem`   header, codec, and that the chunk holds exactly `length` raw bytes
                    (raw: the file size; zstd: the declared size, and the frame's blocks
                    end exactly at the end of the file) -- a few small reads, no decoding;
  `content_problem` the same shape checks on the whole file read at once, then the
                    chunk decoded and compared with the caller's bytes;
  `decode_payload`  the whole chunk decoded, for a reader who then hashes it.
"""

from __future__ import annotations

import os
import threading
from collections.abc import Callable

import zstandard

from hamal_workers.targets.base import CODEC_RAW, CODEC_ZSTD
from hamal_workers.targets.encryption import OVERHEAD, ChunkCipher

Buffer = bytes | bytearray | memoryview

CHUNK_MAGIC = b"HMC1"
HEADER_SIZE = len(CHUNK_MAGIC) + 1
CODECS = {CODEC_RAW: "raw", CODEC_ZSTD: "zstd"}
# Set in the codec byte of a chunk whose payload is sealed (encrypted and authenticated).
SEALED = 0x80

# A zstd frame header is at most 18 bytes; every block starts with a 3-byte header.
_ZSTD_FRAME_HEADER_MAX = 18
_ZSTD_BLOCK_HEADER = 3
_ZSTD_CHECKSUM = 4
_ZSTD_RLE, _ZSTD_RESERVED = 1, 3

_local = threading.local()


def chunk_header(codec: int, sealed: bool = False) -> bytes:
    if codec not in CODECS:
        raise ValueError(f"unknown chunk codec {codec}")
    return CHUNK_MAGIC + bytes([codec | SEALED if sealed else codec])


def seal_payload(
    cipher: ChunkCipher, name: bytes, codec: int, payload: Buffer
) -> tuple[bytes, bytes]:
    """The header and the sealed payload of a chunk stored encrypted."""
    header = chunk_header(codec, sealed=True)
    return header, cipher.seal(name, header[4], payload)


def check_payload(payload: Buffer, codec: int, length: int) -> None:
    """ValueError unless `payload` is what put_chunk may store for `length` raw bytes."""
    chunk_header(codec)
    if codec == CODEC_RAW:
        if len(payload) != length:
            raise ValueError(f"a raw payload of {len(payload)} bytes for {length} raw bytes")
        return
    try:
        declared = zstandard.frame_content_size(payload)
    except zstandard.ZstdError as exc:
        raise ValueError(f"not a zstd frame: {exc}") from None
    if declared != length:
        raise ValueError(f"a zstd frame declaring {declared} bytes for {length} raw bytes")


def max_payload(chunk_size: int) -> int:
    """The most bytes a payload can have: raw is chunk_size, zstd adds a small bound, and
    sealing its nonces, wrapped key and tag."""
    return chunk_size + chunk_size // 128 + 1024 + OVERHEAD


# --- checking a stored chunk ------------------------------------------------------------

# Reads `n` bytes of a chunk file at offset `at` (fewer at its end).
Reader = Callable[[int, int], bytes]


def shape_problem(fd: int, length: int) -> str | None:
    """Why the chunk file at `fd` cannot hold exactly `length` raw bytes, or None.

    A few small reads: the header, the zstd frame header and its block headers.
    """
    size = os.fstat(fd).st_size
    head = os.pread(fd, HEADER_SIZE + _ZSTD_FRAME_HEADER_MAX, 0)
    return _shape_problem(head, size, length, lambda at, n: os.pread(fd, n, at))


def content_problem(
    fd: int,
    content: Buffer,
    chunk_size: int,
    name: bytes = b"",
    cipher: ChunkCipher | None = None,
) -> str | None:
    """Why the chunk file at `fd` is not exactly `content`, encoded, or None.

    The file is read once, whole; its shape is checked in memory, then it is decoded (a
    sealed one opened with `cipher` first) and compared byte for byte. Compared, not
    hashed: a memcmp costs far less than blake3, and the caller's content hashes to the name.
    """
    limit = HEADER_SIZE + max_payload(chunk_size)
    file = _buffer(limit + 1)
    size = os.preadv(fd, [file], 0)
    if size > limit:
        return "is larger than any chunk can be"
    data = memoryview(file)[:size]
    head = bytes(data[: HEADER_SIZE + _ZSTD_FRAME_HEADER_MAX])
    problem = _shape_problem(head, size, len(content), _slicer(data))
    if problem is not None:
        return problem
    stored = data[HEADER_SIZE:]
    codec = data[4]
    if codec & SEALED:
        try:
            stored = memoryview(_open_sealed(codec, stored, name, cipher))
        except ValueError as exc:
            return str(exc)
        codec &= ~SEALED
    if codec == CODEC_ZSTD:
        try:
            stored = memoryview(_decompressor().decompress(stored, max_output_size=len(content)))
        except zstandard.ZstdError as exc:
            return f"cannot be decompressed: {exc}"
    return None if _same(stored, content) else "differs from the content it is named for"


def decode_payload(
    codec: int,
    payload: bytes,
    chunk_size: int,
    name: bytes = b"",
    cipher: ChunkCipher | None = None,
) -> bytes:
    """The raw content of a chunk payload; ValueError saying why it cannot be decoded.

    A sealed payload is opened with `cipher` and bound to `name` first.
    """
    if codec & SEALED:
        payload = _open_sealed(codec, payload, name, cipher)
        codec &= ~SEALED
    if codec == CODEC_RAW:
        content = payload
    elif codec == CODEC_ZSTD:
        content = _decompress(payload, chunk_size)
    else:
        raise ValueError(f"has unknown codec {codec}")
    if len(content) > chunk_size:
        raise ValueError(f"holds {len(content)} bytes, more than a chunk")
    return content


def _open_sealed(codec: int, sealed: Buffer, name: bytes, cipher: ChunkCipher | None) -> bytes:
    if cipher is None:
        raise ValueError("is encrypted, and no key was given to open it")
    return cipher.open(name, codec, sealed)


def _shape_problem(head: bytes, size: int, length: int, read: Reader) -> str | None:
    if len(head) < HEADER_SIZE or head[:4] != CHUNK_MAGIC:
        return "is truncated or not a hamal chunk (bad header)"
    codec = head[4]
    if codec & SEALED:
        return _sealed_shape_problem(codec & ~SEALED, size, length)
    if codec == CODEC_RAW:
        stored = size - HEADER_SIZE
        return None if stored == length else f"holds {stored} bytes, {length} expected"
    if codec != CODEC_ZSTD:
        return f"has unknown codec {codec}"
    return _zstd_shape_problem(head[HEADER_SIZE:], size, length, read)


def _sealed_shape_problem(codec: int, size: int, length: int) -> str | None:
    """What can be told of a sealed chunk without its key: a raw one's exact size."""
    stored = size - HEADER_SIZE - OVERHEAD
    if codec == CODEC_RAW:
        return None if stored == length else f"holds {stored} sealed bytes, {length} expected"
    if codec != CODEC_ZSTD:
        return f"has unknown codec {codec}"
    # A zstd frame of `length` bytes: at least its headers, at most the raw size plus a bound.
    if not _ZSTD_BLOCK_HEADER < stored <= max_payload(length) - OVERHEAD:
        return f"holds {stored} sealed bytes, which no zstd frame of {length} bytes takes"
    return None


def _slicer(data: memoryview) -> Reader:
    return lambda at, n: bytes(data[at : at + n])


def _same(stored: memoryview, content: Buffer) -> bool:
    # bytearray == compares any buffer with one memcmp; memoryview == goes item by item,
    # and bytes == defers to it: at most one copy puts the comparison on the fast path.
    if isinstance(content, bytearray):
        return content == stored
    return bytearray(content) == stored


# --- zstd -------------------------------------------------------------------------------


def _zstd_shape_problem(frame_head: bytes, size: int, length: int, read: Reader) -> str | None:
    try:
        declared = zstandard.frame_content_size(frame_head)
        at = HEADER_SIZE + zstandard.frame_header_size(frame_head)
        checksum = zstandard.get_frame_parameters(frame_head).has_checksum
    except zstandard.ZstdError as exc:
        return f"has a damaged zstd frame header: {exc}"
    if declared != length:
        return f"declares {declared} bytes, {length} expected"
    end = _zstd_frame_end(read, at, size)
    if end is None:
        return "has a damaged or truncated zstd frame"
    end += _ZSTD_CHECKSUM if checksum else 0
    if end != size:
        return f"ends its zstd frame at byte {end} of {size}"
    return None


def _zstd_frame_end(read: Reader, at: int, size: int) -> int | None:
    """Where the last block of the frame starting its blocks at `at` ends (no decoding).

    Walks the 3-byte block headers: a cut or zeroed stretch of the file breaks the walk
    or moves its end. None when a header is missing or reserved.
    """
    while True:
        raw = read(at, _ZSTD_BLOCK_HEADER)
        if len(raw) < _ZSTD_BLOCK_HEADER:
            return None
        header = int.from_bytes(raw, "little")
        last, kind, block_size = header & 1, (header >> 1) & 3, header >> 3
        if kind == _ZSTD_RESERVED:
            return None
        at += _ZSTD_BLOCK_HEADER + (1 if kind == _ZSTD_RLE else block_size)
        if at > size:
            return None
        if last:
            return at


def _decompressor() -> zstandard.ZstdDecompressor:
    # Not safe to share between threads; restore, verify and the engine decode in pools.
    dctx = getattr(_local, "dctx", None)
    if dctx is None:
        dctx = _local.dctx = zstandard.ZstdDecompressor()
    return dctx


def _decompress(payload: bytes, chunk_size: int) -> bytes:
    try:
        # decompress() trusts a frame's declared size over max_output_size: check it.
        declared = zstandard.frame_content_size(payload)
        if declared > chunk_size:
            raise ValueError(f"cannot be decompressed: its frame declares {declared} bytes")
        return _decompressor().decompress(
            payload, max_output_size=chunk_size, allow_extra_data=False
        )
    except zstandard.ZstdError as exc:
        raise ValueError(f"cannot be decompressed: {exc}") from None


def _buffer(size: int) -> bytearray:
    """A per-thread buffer of at least `size` bytes, reused across calls.

    Reading a whole chunk file into fresh memory would fault in its pages every time.
    """
    buf: bytearray | None = getattr(_local, "file", None)
    if buf is None or len(buf) < size:
        buf = _local.file = bytearray(size)
    return buf
