"""The collector's mark: never a false "not named", whatever the order and the batching."""

from __future__ import annotations

import struct

import numpy as np
from hypothesis import given, settings
from hypothesis import strategies as st

from hamal_workers import gc
from hamal_workers.gc import MarkSet, sorted_unique

digest = st.binary(min_size=32, max_size=32)


@given(st.lists(st.integers(min_value=0, max_value=2**64 - 1), max_size=200))
def test_sorted_unique_is_the_sorted_set(values: list[int]) -> None:
    got = sorted_unique(np.array(values, dtype=np.uint64))
    assert got.tolist() == sorted(set(values))


@settings(max_examples=200)
@given(
    st.lists(st.lists(digest, max_size=30), max_size=8),
    st.lists(digest, max_size=30),
    st.lists(digest, max_size=30),
    st.integers(min_value=1, max_value=40),
)
def test_every_named_digest_is_marked_and_others_are_not(
    manifests: list[list[bytes]],
    checkpoint: list[bytes],
    others: list[bytes],
    merge_at: int,
) -> None:
    named = {d for m in manifests for d in m} | set(checkpoint)
    marks = MarkSet()
    original = gc._MERGE_AT
    gc._MERGE_AT = merge_at  # merge often and seldom: the answer must not change
    try:
        for manifest in manifests:
            marks.add_digests(b"".join(manifest))
        records = b"".join(struct.pack(">I32s", i, d) for i, d in enumerate(checkpoint))
        marks.add_checkpoint_entries(records)
        queries = sorted(named) + others
        answers = marks.contains(queries)
    finally:
        gc._MERGE_AT = original
    prefixes = {d[:8] for d in named}
    for query, answer in zip(queries, answers, strict=True):
        # Named: always marked. Not named: marked only when it shares 8 bytes with one.
        assert bool(answer) == (query[:8] in prefixes), query.hex()
    assert len(marks) == len(prefixes)


def test_zero_entries_and_empty_input() -> None:
    marks = MarkSet()
    assert marks.contains([]).size == 0
    assert not marks.contains([bytes(32)]).any()
    marks.add_digests(b"")
    marks.add_digests(bytes(64))  # two holes
    assert len(marks) == 1
