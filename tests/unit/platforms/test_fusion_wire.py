"""fusion_wire: the CBT bitmap as the documents' example reads it, frames, and URNs."""

from __future__ import annotations

import socket
import struct
import zlib

import pytest
from hypothesis import given
from hypothesis import strategies as st

from hamal_workers.engine.extents import Extent
from hamal_workers.platforms import fusion_wire as wire
from hamal_workers.platforms.fusion_compute import extents_of_blocks, split_token


def test_the_documented_example_reads_left_to_right_from_start_block() -> None:
    # "c0" from block 8: the first two blocks; "01" in the second byte: the sixteenth.
    assert wire.decode_bitmap("c001", 8, 16, 3) == [8, 9, 23]
    assert wire.decode_bitmap("80", 0, 1, 1) == [0]


def test_a_bitmap_that_does_not_add_up_is_refused() -> None:
    with pytest.raises(wire.BitmapError, match="bit1Num says 2"):
        wire.decode_bitmap("e0", 0, 8, 2)
    with pytest.raises(wire.BitmapError, match="holds 8 bits, the answer says 16"):
        wire.decode_bitmap("ff", 0, 16, 8)
    with pytest.raises(wire.BitmapError, match="beyond its 4"):
        wire.decode_bitmap("f8", 0, 4, 5)
    with pytest.raises(wire.BitmapError, match="not hex"):
        wire.decode_bitmap("zz", 0, 8, 0)


@given(
    st.integers(0, 1 << 20).map(lambda n: n - n % 8),
    st.integers(1, 3000),
    st.data(),
)
def test_encode_then_decode_gives_the_marked_blocks(
    start: int, bits: int, data: st.DataObject
) -> None:
    marked = data.draw(st.frozensets(st.integers(start, start + bits - 1), max_size=200))
    text = wire.encode_bitmap(marked, start, bits)
    assert len(text) == 2 * -(-bits // 8)
    assert wire.decode_bitmap(text, start, bits, len(marked)) == sorted(marked)


def test_adjacent_blocks_make_one_extent_and_the_last_is_clipped() -> None:
    assert extents_of_blocks([0, 1, 2, 5, 9], 100, 950) == [
        Extent(0, 300),
        Extent(500, 100),
        Extent(900, 50),
    ]
    assert extents_of_blocks([], 100, 950) == []


def test_tokens_carry_the_cbt_epoch_and_the_change_id() -> None:
    assert split_token("2026-11-26 10:00:00|17") == ("2026-11-26 10:00:00", "17")
    assert split_token("") is None and split_token("no-bar") is None


def test_urns_map_to_uris() -> None:
    assert wire.urn_to_uri("urn:sites:S1:vms:i-3") == "/service/sites/S1/vms/i-3"
    with pytest.raises(ValueError):
        wire.urn_to_uri("sites:S1")


def test_a_frame_round_trips_and_a_bad_crc_is_caught() -> None:
    a, b = socket.socketpair()
    with a, b:
        a.sendall(wire.frame(wire.OP_OPEN, 7, b"hello"))
        header = wire.recv_header(b)
        assert (header.operation, header.sequence, header.length) == (wire.OP_OPEN, 7, 5)
        assert bytes(wire.recv_body(b, header)) == b"hello"
        bad = wire.HEADER.pack(wire.MAGIC, wire.ASSUMED_WIRE_VERSION, 3, 1, 2,
                               struct.pack(">I", zlib.crc32(b"xy") ^ 1)) + b"xy"  # fmt: skip
        a.sendall(bad)
        with pytest.raises(wire.WireError, match="CRC"):
            wire.recv_body(b, wire.recv_header(b))
        a.sendall(b"\x12\x34" + bytes(16))
        with pytest.raises(wire.WireError, match="magic"):
            wire.recv_header(b)
