"""Chunks encrypted at rest: AES-256-GCM per chunk, each under its own key (docs/FORMAT.md).

`[target] encryption_key_file` names a file holding the master key: 32 random bytes,
written as 64 hex digits (`hamal key new FILE` makes one). The master key never encrypts
data itself; three keys are derived from it with HKDF-SHA256:

    name key   chunk names are blake3 keyed with it, so a name reveals nothing of the
               content to whoever reads the store (plain blake3 would let anyone holding
               a guess of a block confirm it), and dedup still works within the store;
    wrap key   wraps each chunk's own random data key (AES-256-GCM, the name as
               associated data);
    key id     eight bytes recorded in format.json, so a proxy given another key is
               refused with a clear error before it writes or restores anything.

A sealed chunk payload is

    nonce (12) | wrapped data key (32 + 16 tag) | nonce (12) | ciphertext | tag (16)

where the ciphertext is the (possibly compressed) payload, and the chunk's name and
codec are associated data: a chunk moved under another name, or with its codec byte
changed, fails authentication like one whose bytes were altered. Compression runs
before encryption (ciphertext does not compress).

A fresh data key per chunk keeps every (key, nonce) pair single-use whatever the number
of chunks, which one key with random 96-bit nonces would only promise up to about 2^32
messages; it also lets a later key rotation rewrap 48-byte keys instead of re-encrypting
the store.
"""

from __future__ import annotations

import os
import stat
from dataclasses import dataclass
from pathlib import Path

import blake3
from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

from hamal_workers.targets.base import TargetError

KEY_SIZE = 32
NONCE_SIZE = 12
TAG_SIZE = 16
WRAPPED_SIZE = KEY_SIZE + TAG_SIZE
# What sealing adds to a payload: two nonces, the wrapped key and the payload's tag.
OVERHEAD = NONCE_SIZE + WRAPPED_SIZE + NONCE_SIZE + TAG_SIZE

CIPHER = "aes-256-gcm"
NAMES = "blake3-keyed"
KEY_ID_SIZE = 8


class KeyFileError(TargetError):
    """The key file cannot be used; the message names it and says why (never the key)."""


class SealedChunkError(ValueError):
    """A sealed payload that is cut short or fails authentication."""


@dataclass(frozen=True)
class EncryptionRecord:
    """What format.json says of an encrypted store."""

    cipher: str
    names: str
    key_id: str

    def to_json(self) -> dict[str, str]:
        return {"cipher": self.cipher, "names": self.names, "key_id": self.key_id}


class ChunkCipher:
    """Names and seals chunks under one master key. Thread-safe: it keeps no state per call."""

    def __init__(self, master: bytes, source: str = "the key") -> None:
        if len(master) != KEY_SIZE:
            raise ValueError(f"a master key is {KEY_SIZE} bytes, not {len(master)}")
        self.source = source
        self._name_key = _derive(master, b"hamal chunk names")
        self._wrap = AESGCM(_derive(master, b"hamal chunk key wrap"))
        self.key_id = _derive(master, b"hamal key id")[:KEY_ID_SIZE].hex()

    def __repr__(self) -> str:
        # Never the key: the id is what an operator compares.
        return f"ChunkCipher(key_id={self.key_id})"

    def record(self) -> EncryptionRecord:
        return EncryptionRecord(CIPHER, NAMES, self.key_id)

    def name(self, content: bytes | bytearray | memoryview) -> bytes:
        return blake3.blake3(content, key=self._name_key).digest()

    def seal(self, name: bytes, codec: int, payload: bytes | bytearray | memoryview) -> bytes:
        """The sealed form of `payload`, bound to the chunk's name and codec."""
        data_key = os.urandom(KEY_SIZE)
        wrap_nonce = os.urandom(NONCE_SIZE)
        wrapped = self._wrap.encrypt(wrap_nonce, data_key, name)
        nonce = os.urandom(NONCE_SIZE)
        # AESGCM takes the caller's buffer as it is: no copy of a 4 MiB chunk first.
        sealed = AESGCM(data_key).encrypt(nonce, payload, _associated(name, codec))
        return b"".join((wrap_nonce, wrapped, nonce, sealed))

    def open(self, name: bytes, codec: int, sealed: bytes | bytearray | memoryview) -> bytes:
        """The payload `seal` was given; SealedChunkError when it is short or not authentic."""
        if len(sealed) < OVERHEAD:
            raise SealedChunkError(f"is {len(sealed)} bytes, shorter than any sealed chunk")
        view = memoryview(sealed)
        wrap_nonce = bytes(view[:NONCE_SIZE])
        wrapped = bytes(view[NONCE_SIZE : NONCE_SIZE + WRAPPED_SIZE])
        nonce = bytes(view[NONCE_SIZE + WRAPPED_SIZE : 2 * NONCE_SIZE + WRAPPED_SIZE])
        body = view[2 * NONCE_SIZE + WRAPPED_SIZE :]  # a view: decrypt reads it in place
        try:
            data_key = self._wrap.decrypt(wrap_nonce, wrapped, name)
            return AESGCM(data_key).decrypt(nonce, body, _associated(name, codec))
        except InvalidTag:
            raise SealedChunkError(
                "fails authentication: it was altered, moved under another name, or sealed "
                "with another key"
            ) from None


def _associated(name: bytes, codec: int) -> bytes:
    return name + bytes([codec])


def _derive(master: bytes, purpose: bytes) -> bytes:
    return HKDF(algorithm=hashes.SHA256(), length=KEY_SIZE, salt=None, info=purpose).derive(master)


# --- the key file -----------------------------------------------------------------------


def load_key_file(path: str | os.PathLike[str]) -> ChunkCipher:
    """The cipher of the master key in `path`; KeyFileError naming the file and the problem."""
    where = f"encryption key file {path} ([target] encryption_key_file)"
    try:
        # O_NOFOLLOW | O_NONBLOCK: a planted symlink or a FIFO is refused, not followed or
        # waited on; the size check keeps /dev/zero and friends out.
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC)
    except FileNotFoundError:
        raise KeyFileError(f"{where} does not exist: create one with `hamal key new`") from None
    except OSError as exc:
        raise KeyFileError(f"{where} cannot be opened: {exc.strerror or exc}") from None
    try:
        info = os.fstat(fd)
        if not stat.S_ISREG(info.st_mode):
            raise KeyFileError(f"{where} is not a regular file")
        if info.st_size > 1024:
            raise KeyFileError(f"{where} is {info.st_size} bytes: a key file is one line")
        text = os.read(fd, 1025)
    except OSError as exc:
        raise KeyFileError(f"{where} cannot be read: {exc.strerror or exc}") from None
    finally:
        os.close(fd)
    try:
        master = bytes.fromhex(text.decode("ascii").strip())
    except (UnicodeDecodeError, ValueError):
        master = b""
    if len(master) != KEY_SIZE:
        # Never echo the content: it may be a key in another form.
        raise KeyFileError(f"{where} does not hold a key: expected {2 * KEY_SIZE} hex digits")
    return ChunkCipher(master, str(path))


def new_key_file(path: str | os.PathLike[str]) -> ChunkCipher:
    """Write a new random master key to `path` (mode 0600); never replaces an existing file."""
    master = os.urandom(KEY_SIZE)
    target = Path(path)
    try:
        fd = os.open(target, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o600)
    except FileExistsError:
        raise KeyFileError(
            f"{target} exists: a key file is never overwritten (the chunks sealed with it "
            "would be lost)"
        ) from None
    except OSError as exc:
        raise KeyFileError(f"cannot create key file {target}: {exc.strerror or exc}") from None
    try:
        os.write(fd, master.hex().encode() + b"\n")
        os.fsync(fd)
    finally:
        os.close(fd)
    return ChunkCipher(master, str(target))


def check_store_key(
    where: str, recorded: object, cipher: ChunkCipher | None
) -> EncryptionRecord | None:
    """The store's encryption record checked against the configured key (or its absence)."""
    if recorded is None:
        if cipher is not None:
            raise TargetError(
                f"{where}: this store was created without encryption, and [target] "
                "encryption_key_file is set: a store is encrypted from its creation or never "
                "(use a new store for encrypted restore points)"
            )
        return None
    if not isinstance(recorded, dict) or not all(
        isinstance(recorded.get(k), str) for k in ("cipher", "names", "key_id")
    ):
        raise TargetError(f"{where}: its encryption record is damaged: {recorded!r:.200}")
    record = EncryptionRecord(recorded["cipher"], recorded["names"], recorded["key_id"])
    if (record.cipher, record.names) != (CIPHER, NAMES):
        raise TargetError(
            f"{where}: encrypted with {record.cipher} and {record.names} names, which this "
            f"reader does not know ({CIPHER}, {NAMES})"
        )
    if cipher is None:
        raise TargetError(
            f"{where}: this store is encrypted (key id {record.key_id}): set [target] "
            "encryption_key_file to the file holding its key"
        )
    if cipher.key_id != record.key_id:
        raise TargetError(
            f"{where}: the key in {cipher.source} (key id {cipher.key_id}) is not this "
            f"store's key (key id {record.key_id}): nothing was read or written"
        )
    return record
