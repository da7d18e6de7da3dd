"""FusionCompute's wire formats, and every assumption about them, in one place.

Huawei's public documents (the VRM interface documents of FusionCompute 8.0.0, the
"backup interface for eBackup CBT" among them) describe the REST calls, the CBT bitmap and
the CNA backup socket, but leave some details open. Each open point is settled here, named
`ASSUMED_*` or said in the comment beside it, so that checking them against a real system
is a matter of this one module; the client (`fusion_compute.py`) and the simulator
(`simulators/fusion_compute.py`) both take them from here.

What is settled by the documents (see `FUSIONCOMPUTE_API.md` in the design notes) is only
restated where the code needs it.
"""

from __future__ import annotations

import socket
import struct
import zlib
from dataclasses import dataclass

# --------------------------------------------------------------------------- REST

API_PREFIX = "/service"
DEFAULT_PORT = 7443
PAGE_LIMIT = 100  # the largest `limit` a listing accepts
# Accept header; without a version the VRM answers with its 1.0 interfaces.
ACCEPT = "application/json;version={version};charset=UTF-8"
# X-ENCRIPT-ALGORITHM (Huawei's spelling): "0" = X-Auth-Key is sha256(password) in hex.
KEY_ALGORITHM_SHA256 = "0"

# Error codes (`{errorCode, errorDes}` in every non-200 answer).
NOT_LOGGED_IN = "10000002"
BUSY = frozenset({"10000005", "10000006", "10000007"})
NO_SUCH_OBJECT = "10000008"
STATE_CONFLICT = "10000009"
BAD_CREDENTIALS = "10100103"
PASSWORD_MUST_CHANGE = frozenset({"10100108", "10100109"})
PASSWORD_EXPIRES_SOON = "10100110"
ACCOUNT_LOCKED = frozenset({"10100113", "10100116"})
SNAPSHOT_MISSING = "10300109"
SNAPSHOT_LIMIT = "10300111"
SNAPSHOT_TASK_RUNNING = "10300112"
SNAPSHOT_NOT_READY = "10300298"
NOT_ON_ONE_CHAIN = "10300408"
BACKUP_TASKS_FULL = "10300412"  # at most 8 backup tasks in the whole system
NO_USABLE_HOST = "10300414"
DISK_MISSING = "10420004"
# Answers worth asking again a little later: the VRM or its hosts are busy.
RETRY_LATER = BUSY | {BACKUP_TASKS_FULL, NO_USABLE_HOST, SNAPSHOT_NOT_READY}


def urn_to_uri(urn: str) -> str:
    """`urn:sites:S:vms:i-3` -> `/service/sites/S/vms/i-3` (the documented mapping)."""
    parts = urn.split(":")
    if len(parts) < 3 or parts[0] != "urn" or len(parts) % 2 == 0:
        raise ValueError(f"not a FusionCompute URN: {urn!r}")
    return API_PREFIX + "/" + "/".join(parts[1:])


# --------------------------------------------------------------------------- CBT bitmap

# ASSUMED: sectors are 512 bytes (the documents give `sectorOfBlock`, not the sector size).
ASSUMED_SECTOR_SIZE = 512
# ASSUMED: the bitmap reads left to right from startBlock: the first hex digit's high bit is
# startBlock, its low bit startBlock + 3 (the documented example). The same document also
# describes the opposite order within a byte; `decode_bitmap` checks every answer against
# bit1Num, and a wrong order still counts the same bits -- so the simulator writes its
# bitmaps from its own table of written blocks, and a unit test pins the example.
ASSUMED_BITMAP_MSB_FIRST = True
# getcbt's startBlock must be a multiple of 8; blocks asked per call (a bitmap of 2 KiB of hex).
CBT_BLOCKS_PER_CALL = 8192


class BitmapError(ValueError):
    """A getcbt answer that does not add up: reading it would miss or invent blocks."""


def decode_bitmap(bitmap: str, start_block: int, bit_num: int, bit1_num: int) -> list[int]:
    """The block numbers a getcbt bitmap marks, checked against the answer's own counts.

    A bitmap shorter than `bit_num` bits, with marks beyond `bit_num`, or whose marks do not
    number `bit1_num` is refused: it was cut, padded or read with the wrong assumptions.
    """
    text = bitmap.strip()
    try:
        raw = bytes.fromhex(text)
    except ValueError:
        raise BitmapError(f"the bitmap is not hex ({len(text)} characters)") from None
    if bit_num < 0 or len(raw) * 8 < bit_num:
        raise BitmapError(f"the bitmap holds {len(raw) * 8} bits, the answer says {bit_num}")
    blocks: list[int] = []
    for index, byte in enumerate(raw):
        if not byte:
            continue
        for bit in range(8):
            if byte & ((0x80 >> bit) if ASSUMED_BITMAP_MSB_FIRST else (1 << bit)):
                position = index * 8 + bit
                if position >= bit_num:
                    raise BitmapError(f"the bitmap marks bit {position} beyond its {bit_num}")
                blocks.append(start_block + position)
    if len(blocks) != bit1_num:
        raise BitmapError(
            f"the bitmap marks {len(blocks)} blocks, the answer's bit1Num says {bit1_num}"
        )
    return blocks


def encode_bitmap(marked: set[int] | frozenset[int], start_block: int, bit_num: int) -> str:
    """The hex bitmap of `bit_num` blocks from `start_block` with `marked` set (the inverse)."""
    raw = bytearray(-(-bit_num // 8))
    for block in marked:
        position = block - start_block
        if 0 <= position < bit_num:
            shift = (7 - position % 8) if ASSUMED_BITMAP_MSB_FIRST else position % 8
            raw[position // 8] |= 1 << shift
    return raw.hex()


# --------------------------------------------------------------------------- backup socket

MAGIC = 0x3535
# ASSUMED: every integer is big-endian (network order); the documents do not say.
# ASSUMED: the version field is 1; the CRC is zlib's CRC-32 of the body, big-endian;
# offsets (startOffset) are in bytes; an answer echoes its request's operation and sequence.
ASSUMED_WIRE_VERSION = 1
HEADER = struct.Struct(">HHHII4s")  # magic, version, operation, sequence, length, crc
# ASSUMED: the largest dataLen a read may ask; bigger reads are split.
ASSUMED_MAX_READ = 4 << 20
# A frame longer than this is not one of ours: the stream is out of step.
MAX_FRAME = ASSUMED_MAX_READ + 64

OP_OPEN = 1
OP_CLOSE = 2
OP_READ = 3
OP_WRITE = 4
OP_WRITE_ZEROS = 5

OK = 0
RESULTS = {
    0: "ok",
    1: "unknown operation",
    2: "no such file",
    3: "the token is not valid",
    4: "bad flags",
    5: "bad file handle",
    6: "offset out of range",
    7: "length out of range",
    8: "I/O error",
    9: "beyond the end of the file",
    10: "I/O error",
}
BAD_TOKEN = 3
NO_FILE = 2
BAD_HANDLE = 5
IO_ERRORS = frozenset({8, 10})  # worth retrying, then failing clearly

OPEN_REQUEST = struct.Struct(">256s128sH")  # snapfile, token, flags (0 read, 1 write)
OPEN_REPLY = struct.Struct(">HI")  # result, fileHandle
CLOSE_REQUEST = struct.Struct(">I")  # fileHandle
CLOSE_REPLY = struct.Struct(">H")  # result
READ_REQUEST = struct.Struct(">IQI")  # fileHandle, startOffset, dataLen
READ_REPLY = struct.Struct(">HI")  # result, dataLen; then dataLen bytes


class WireError(ConnectionError):
    """The stream is not the protocol (magic, version, CRC, length) or ended early."""


def crc(body: bytes | memoryview) -> bytes:
    return struct.pack(">I", zlib.crc32(body) & 0xFFFFFFFF)


def frame(operation: int, sequence: int, body: bytes) -> bytes:
    header = HEADER.pack(
        MAGIC, ASSUMED_WIRE_VERSION, operation, sequence & 0xFFFFFFFF, len(body), crc(body)
    )
    return header + body


def recv_exact(sock: socket.socket, view: memoryview) -> None:
    """Fill `view` from the socket; a stream that ends first is a WireError."""
    got = 0
    while got < len(view):
        n = sock.recv_into(view[got:])
        if not n:
            raise WireError(f"the connection closed after {got} of {len(view)} bytes")
        got += n


@dataclass(frozen=True)
class Header:
    operation: int
    sequence: int
    length: int
    crc: bytes


def recv_header(sock: socket.socket) -> Header:
    raw = bytearray(HEADER.size)
    recv_exact(sock, memoryview(raw))
    magic, version, operation, sequence, length, checksum = HEADER.unpack(raw)
    if magic != MAGIC:
        raise WireError(f"bad magic 0x{magic:04x}")
    if version != ASSUMED_WIRE_VERSION:
        raise WireError(f"protocol version {version}, expected {ASSUMED_WIRE_VERSION}")
    if length > MAX_FRAME:
        raise WireError(f"a frame of {length} bytes")
    return Header(operation, sequence, length, checksum)


def recv_body(sock: socket.socket, header: Header, into: memoryview | None = None) -> memoryview:
    """The frame's body (into `into` when given, which must be at least as long), CRC checked."""
    view = memoryview(bytearray(header.length)) if into is None else into[: header.length]
    if len(view) < header.length:
        raise WireError(f"a frame of {header.length} bytes for a buffer of {len(view)}")
    recv_exact(sock, view)
    if crc(view) != header.crc:
        raise WireError(f"CRC mismatch in a frame of {header.length} bytes")
    return view


def c_string(raw: bytes) -> str:
    """A NUL-padded char[] field as text."""
    return raw.split(b"\0", 1)[0].decode("utf-8", "replace")


def result_text(code: int) -> str:
    return f"{code} ({RESULTS.get(code, 'unknown result')})"
