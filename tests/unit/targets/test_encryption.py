"""Chunks encrypted at rest (targets/encryption.py) in the filesystem chunk store."""

from __future__ import annotations

import json
import os
from pathlib import Path

import blake3
import pytest
import zstandard
from hypothesis import given, settings
from hypothesis import strategies as st

from hamal_workers.targets.base import (
    CODEC_RAW,
    CODEC_ZSTD,
    CorruptChunk,
    DiskManifest,
    TargetError,
)
from hamal_workers.targets.chunk_format import HEADER_SIZE, SEALED
from hamal_workers.targets.chunkstore import ChunkStore
from hamal_workers.targets.encryption import (
    NONCE_SIZE,
    OVERHEAD,
    WRAPPED_SIZE,
    ChunkCipher,
    KeyFileError,
    SealedChunkError,
    load_key_file,
    new_key_file,
)
from hamal_workers.targets.restore import restore_disk, verify_point

KEY_A = bytes(range(32))
KEY_B = bytes(range(1, 33))


def put(store: ChunkStore, content: bytes, compress: bool = False) -> bytes:
    name = store.chunk_name(content)
    if compress:
        store.put_chunk(name, zstandard.compress(content), CODEC_ZSTD, len(content))
    else:
        store.put_chunk(name, content, CODEC_RAW, len(content))
    return name


@settings(max_examples=50, deadline=None)
@given(payload=st.binary(max_size=4096), codec=st.sampled_from([CODEC_RAW, CODEC_ZSTD]))
def test_seal_then_open_gives_the_payload_back(payload: bytes, codec: int) -> None:
    cipher = ChunkCipher(KEY_A)
    name = cipher.name(payload)
    sealed = cipher.seal(name, codec | SEALED, payload)
    assert len(sealed) == len(payload) + OVERHEAD
    assert cipher.open(name, codec | SEALED, sealed) == payload


def test_every_part_of_a_sealed_payload_is_authenticated() -> None:
    cipher = ChunkCipher(KEY_A)
    payload = b"the content of a chunk" * 100
    name = cipher.name(payload)
    sealed = cipher.seal(name, SEALED, payload)
    # The two nonces, the wrapped key, the ciphertext and its tag: one bit anywhere fails.
    for at in (0, NONCE_SIZE + 3, NONCE_SIZE + WRAPPED_SIZE + 1, len(sealed) // 2, len(sealed) - 1):
        bad = bytearray(sealed)
        bad[at] ^= 0x01
        with pytest.raises(SealedChunkError, match="fails authentication"):
            cipher.open(name, SEALED, bytes(bad))
    # Another name, another codec, another key, a cut: all refused.
    with pytest.raises(SealedChunkError):
        cipher.open(cipher.name(b"other"), SEALED, sealed)
    with pytest.raises(SealedChunkError):
        cipher.open(name, SEALED | CODEC_ZSTD, sealed)
    with pytest.raises(SealedChunkError):
        ChunkCipher(KEY_B).open(name, SEALED, sealed)
    with pytest.raises(SealedChunkError, match="shorter"):
        cipher.open(name, SEALED, sealed[: OVERHEAD - 1])


def test_names_are_keyed_and_reveal_nothing_of_the_content() -> None:
    content = os.urandom(4096)
    a, b = ChunkCipher(KEY_A), ChunkCipher(KEY_B)
    assert a.name(content) == ChunkCipher(KEY_A).name(content)  # dedup within a store
    assert a.name(content) != b.name(content)
    assert a.name(content) != blake3.blake3(content).digest()
    assert "00010203" not in repr(a) and a.key_id in repr(a)


def test_an_encrypted_store_round_trips_and_holds_no_plaintext(tmp_path: Path) -> None:
    store = ChunkStore(tmp_path / "s", chunk_size=64 * 1024, cipher=ChunkCipher(KEY_A))
    plain = os.urandom(60 * 1024)
    text = b"a compressible line of text, repeated\n" * 1500
    names = [put(store, plain), put(store, text[: 64 * 1024], compress=True)]
    assert store.get_chunk(names[0]) == plain
    assert store.get_chunk(names[1]) == text[: 64 * 1024]
    assert put(store, plain) == names[0]  # dedup: the same content is stored once
    for name in names:
        stored = store.chunk_path(name).read_bytes()
        assert stored[4] & SEALED
        assert plain[:64] not in stored and b"a compressible line" not in stored
    fmt = json.loads((tmp_path / "s" / "format.json").read_text())
    assert fmt["version"] == 2
    assert fmt["encryption"] == {
        "cipher": "aes-256-gcm",
        "names": "blake3-keyed",
        "key_id": ChunkCipher(KEY_A).key_id,
    }


def test_has_chunk_checks_a_sealed_chunk_by_its_size_and_in_full(tmp_path: Path) -> None:
    store = ChunkStore(
        tmp_path / "s", chunk_size=64 * 1024, cipher=ChunkCipher(KEY_A), full_compare_days=1
    )
    content = os.urandom(32 * 1024)
    name = put(store, content)
    assert store.has_chunk(name, len(content), content)
    assert not store.has_chunk(name, len(content) - 1)  # a raw sealed chunk has an exact size
    name = put(store, content)  # quarantined: stored again
    path = store.chunk_path(name)
    data = bytearray(path.read_bytes())
    data[HEADER_SIZE + OVERHEAD + 100] ^= 0xFF  # same size, altered ciphertext
    path.write_bytes(bytes(data))
    assert store.has_chunk(name, len(content))  # the shape alone cannot tell ...
    assert not store.has_chunk(name, len(content), content)  # ... the full compare does
    assert not path.exists()


def test_a_tampered_chunk_fails_restore_and_verify_naming_it(tmp_path: Path) -> None:
    store = ChunkStore(tmp_path / "s", chunk_size=64 * 1024, cipher=ChunkCipher(KEY_A))
    chunks = [os.urandom(64 * 1024) for _ in range(3)]
    names = [put(store, c) for c in chunks]
    store.stage_disk("vm", "p1", DiskManifest("d", 3 * 64 * 1024, 64 * 1024, list(names)))
    store.commit_point("vm", "vm", "p1", 1.0, ["d"], {})
    restore_disk(store, "vm", "p1", "d", str(tmp_path / "ok.raw"))
    assert (tmp_path / "ok.raw").read_bytes() == b"".join(chunks)

    path = store.chunk_path(names[1])
    data = bytearray(path.read_bytes())
    data[-1] ^= 0x01  # the tag
    path.write_bytes(bytes(data))
    with pytest.raises(CorruptChunk, match=f"chunk {names[1].hex()}.*fails authentication"):
        restore_disk(store, "vm", "p1", "d", str(tmp_path / "bad.raw"))
    (problem,) = verify_point(store, "vm", "p1")
    assert f"disk d chunk 1 digest {names[1].hex()}" in problem
    assert "fails authentication" in problem


def test_a_store_opens_only_with_its_own_key(tmp_path: Path) -> None:
    root = tmp_path / "s"
    ChunkStore(root, cipher=ChunkCipher(KEY_A))
    with pytest.raises(TargetError, match=r"is encrypted \(key id [0-9a-f]{16}\): set \[target\]"):
        ChunkStore(root, create=False)
    with pytest.raises(TargetError, match="is not this store's key"):
        ChunkStore(root, create=False, cipher=ChunkCipher(KEY_B))
    ChunkStore(root, create=False, cipher=ChunkCipher(KEY_A))
    plain = tmp_path / "plain"
    ChunkStore(plain)
    with pytest.raises(TargetError, match="created without encryption"):
        ChunkStore(plain, cipher=ChunkCipher(KEY_A))


def test_a_format_that_contradicts_itself_is_refused(tmp_path: Path) -> None:
    root = tmp_path / "s"
    ChunkStore(root, cipher=ChunkCipher(KEY_A))
    fmt = json.loads((root / "format.json").read_text())
    del fmt["encryption"]
    (root / "format.json").write_text(json.dumps(fmt))
    with pytest.raises(TargetError, match="version 2 store must say how it is encrypted"):
        ChunkStore(root, create=False)


def test_key_files(tmp_path: Path) -> None:
    path = tmp_path / "hamal.key"
    made = new_key_file(path)
    assert path.stat().st_mode & 0o777 == 0o600
    assert load_key_file(path).key_id == made.key_id
    with pytest.raises(KeyFileError, match="never overwritten"):
        new_key_file(path)
    assert load_key_file(path).key_id == made.key_id

    (tmp_path / "short.key").write_text("abcd\n")
    (tmp_path / "big.key").write_bytes(b"0" * 4096)
    (tmp_path / "link.key").symlink_to(path)
    os.mkfifo(tmp_path / "fifo.key")
    cases = {
        "short.key": "expected 64 hex digits",
        "big.key": "a key file is one line",
        "link.key": "cannot be opened",
        "fifo.key": "not a regular file",
        "missing.key": "does not exist: create one with `hamal key new`",
    }
    for name, problem in cases.items():
        with pytest.raises(KeyFileError, match=problem) as caught:
            load_key_file(tmp_path / name)
        assert str(tmp_path / name) in str(caught.value)
    with pytest.raises(KeyFileError, match="not a regular file"):
        load_key_file("/dev/zero")
    secret = path.read_text().strip()
    (tmp_path / "typo.key").write_text(secret[:10] + "g" + secret[11:])
    with pytest.raises(KeyFileError) as caught:
        load_key_file(tmp_path / "typo.key")
    assert secret[:10] not in str(caught.value)
