"""Sealed values: what shmcache writes to Redis (L2) and disk (L3), and how it reads them.

Anything that leaves the shared segment crosses a trust boundary: Redis is shared with
other hosts and other programs, a disk directory outlives the process.  So every value
written there is *sealed*: a small header, the L1 bytes (optionally AES-GCM encrypted)
and an HMAC-SHA256 over the key, the header and the body.  :meth:`Sealer.open` checks the
MAC in constant time *before* anything is deserialized; a value that fails is reported
as :class:`BadSeal` and the caller treats it as a miss.  Nothing pickled is ever loaded
from an unverified value.

Layout (all after the fixed ASCII prefix is binary)::

    b"SC1" | stamp: 16 lowercase hex digits | kind: b"V" value or b"T" tombstone
    | flags u16 | mode u8 | pad u8 | body_len u32 | expires_at f64 (0: never)
    | body | mac (32 bytes HMAC-SHA256, or 16 bytes BLAKE2b when unsigned)

``stamp`` is the writer's wall clock in microseconds, as fixed-width hex so that the
Redis script that refuses older writes can compare stamps as strings (tiers.py).  A
tombstone marks a delete so that a late write-back of an older value cannot resurrect
it.

Without a secret, values can only be sealed *unsigned* (a checksum, no authenticity),
which ``allow_unsigned`` must switch on explicitly, and :meth:`Sealer.open` refuses
pickled (or custom-serialized) bodies in unsigned values whatever the configuration.
"""

from __future__ import annotations

import hashlib
import hmac
import os
import struct
from typing import Any, Final, NamedTuple

from .errors import ShmCacheError
from .serializers import SER_MASK

__all__ = ["Sealer", "Sealed", "BadSeal", "MAGIC", "STAMP_HEX"]

MAGIC: Final = b"SC1"
STAMP_HEX: Final = 16
_PREFIX_LEN: Final = len(MAGIC) + STAMP_HEX + 1
_FIX: Final = struct.Struct("<HBxId")
_HDR_LEN: Final = _PREFIX_LEN + _FIX.size
_MODE_SIGNED: Final = 1
_MODE_ENCRYPTED: Final = 2
_MAC_LEN: Final = 32
_SUM_LEN: Final = 16
_NONCE: Final = 12
#: Serializer ids whose payloads are plain data (raw bytes, JSON, msgpack): the only
#: ones an unsigned value may carry.  Pickle (1) and custom serializers never.
_DATA_ONLY_SERIALIZERS: Final = frozenset({0, 2, 3})


class BadSeal(ShmCacheError):
    """A value from Redis or disk that is not a valid sealed shmcache value (tampered,
    written with another secret, truncated, or not written by shmcache at all)."""


class Sealed(NamedTuple):
    """An opened value: the L1 bytes and what the writer recorded about them."""

    body: bytes
    flags: int
    stamp: int
    expires_at: float | None
    tombstone: bool


def stamp_of(blob: bytes) -> int | None:
    """The stamp of a sealed value without verifying it (for ordering only)."""
    if len(blob) < _PREFIX_LEN or blob[:3] != MAGIC:
        return None
    try:
        return int(blob[3:3 + STAMP_HEX], 16)
    except ValueError:
        return None


class Sealer:
    """Seals and opens values for one secret.

    ``secret``: bytes or str, at least 16 bytes; the MAC key and the encryption key
    are derived from it separately.  ``encrypt=True`` also encrypts bodies with
    AES-256-GCM (needs the ``cryptography`` package).  ``allow_unsigned``: without a
    secret, seal with a checksum only (values must not be pickled).

    >>> s = Sealer(b"0123456789abcdef-secret")
    >>> blob = s.seal(b"user:1", b'{"id": 1}', flags=2, stamp=7)
    >>> s.open(b"user:1", blob).body
    b'{"id": 1}'
    >>> s.open(b"user:2", blob)
    Traceback (most recent call last):
    ...
    shmcache.sealing.BadSeal: MAC mismatch (tampered, another key or another secret)
    """

    def __init__(self, secret: bytes | str | None, *, encrypt: bool = False,
                 allow_unsigned: bool = False) -> None:
        if isinstance(secret, str):
            secret = secret.encode()
        if secret is not None and len(secret) < 16:
            raise ValueError("the secret must be at least 16 bytes")
        if secret is None and not allow_unsigned:
            raise ValueError("a secret is needed to sign values (or allow_unsigned=True)")
        if encrypt and secret is None:
            raise ValueError("encryption needs a secret")
        self.signed = secret is not None
        self._mac_key = (hmac.new(secret, b"shmcache mac v1", hashlib.sha256).digest()
                         if secret is not None else b"")
        self._aead: Any = None
        if encrypt and secret is not None:
            try:
                from cryptography.hazmat.primitives.ciphers.aead import AESGCM
            except ImportError as e:  # pragma: no cover - depends on the installation
                raise ShmCacheError("encrypt=True needs the 'cryptography' package "
                                    "(pip install 'shmcache[crypto]')") from e
            self._aead = AESGCM(hmac.new(secret, b"shmcache aes-gcm v1",
                                         hashlib.sha256).digest())

    def __repr__(self) -> str:  # never the keys
        return f"<Sealer signed={self.signed} encrypted={self._aead is not None}>"

    def _mac(self, key: bytes, data: bytes) -> bytes:
        msg = len(key).to_bytes(2, "little") + key + data
        if self.signed:
            return hmac.new(self._mac_key, msg, hashlib.sha256).digest()
        return hashlib.blake2b(msg, digest_size=_SUM_LEN).digest()

    def sign(self, label: bytes, data: bytes) -> bytes:
        """``data`` followed by its MAC under ``label`` (for messages between hosts)."""
        return data + self._mac(b"\x00" + label, data)

    def verified(self, label: bytes, blob: bytes) -> bytes | None:
        """The data of a :meth:`sign` ed blob, or None if its MAC does not verify."""
        n = _MAC_LEN if self.signed else _SUM_LEN
        if not isinstance(blob, bytes) or len(blob) < n:
            return None
        data, mac = blob[:-n], blob[-n:]
        return data if hmac.compare_digest(mac, self._mac(b"\x00" + label, data)) else None

    def seal(self, key: bytes, body: bytes, *, flags: int, stamp: int,
             expires_at: float | None = None, tombstone: bool = False) -> bytes:
        """The sealed form of ``body`` (the L1 bytes of ``key``)."""
        if not self.signed and (flags & SER_MASK) not in _DATA_ONLY_SERIALIZERS \
                and not tombstone:
            raise ShmCacheError("refusing to write a pickled value to a shared level "
                                "without a secret")
        mode = _MODE_SIGNED if self.signed else 0
        if self._aead is not None and not tombstone:
            mode |= _MODE_ENCRYPTED
        prefix = MAGIC + b"%016x" % stamp + (b"T" if tombstone else b"V")
        if mode & _MODE_ENCRYPTED:
            nonce = os.urandom(_NONCE)
            fix = _FIX.pack(flags, mode, _NONCE + len(body) + 16, expires_at or 0.0)
            body = nonce + self._aead.encrypt(nonce, body, len(key).to_bytes(2, "little")
                                              + key + prefix + fix)
        else:
            fix = _FIX.pack(flags, mode, len(body), expires_at or 0.0)
        data = prefix + fix + body
        return data + self._mac(key, data)

    def open(self, key: bytes, blob: bytes) -> Sealed:
        """Verify and unpack; :class:`BadSeal` if anything is wrong."""
        if not isinstance(blob, bytes) or len(blob) < _HDR_LEN or blob[:3] != MAGIC:
            raise BadSeal("not a sealed shmcache value")
        kind = blob[_PREFIX_LEN - 1:_PREFIX_LEN]
        flags, mode, blen, exp = _FIX.unpack_from(blob, _PREFIX_LEN)
        signed = bool(mode & _MODE_SIGNED)
        if signed != self.signed:
            raise BadSeal("signed value read without a secret" if signed
                          else "unsigned value where a signature is required")
        mac_len = _MAC_LEN if signed else _SUM_LEN
        if len(blob) != _HDR_LEN + blen + mac_len or kind not in (b"V", b"T"):
            raise BadSeal("truncated or malformed value")
        data, mac = blob[:-mac_len], blob[-mac_len:]
        if not hmac.compare_digest(mac, self._mac(key, data)):
            raise BadSeal("MAC mismatch (tampered, another key or another secret)")
        try:
            stamp = int(blob[3:3 + STAMP_HEX], 16)
        except ValueError:
            raise BadSeal("malformed stamp") from None
        body = data[_HDR_LEN:]
        if mode & _MODE_ENCRYPTED:
            if self._aead is None:
                raise BadSeal("encrypted value, but encryption is not configured")
            try:
                body = self._aead.decrypt(body[:_NONCE], body[_NONCE:],
                                          len(key).to_bytes(2, "little") + key
                                          + data[:_HDR_LEN])
            except Exception as e:  # noqa: BLE001 - InvalidTag and friends
                raise BadSeal(f"decryption failed ({type(e).__name__})") from None
        tomb = kind == b"T"
        if not signed and not tomb and (flags & SER_MASK) not in _DATA_ONLY_SERIALIZERS:
            raise BadSeal("unsigned value claims a pickled body: refused")
        return Sealed(body, flags, stamp, exp or None, tomb)
