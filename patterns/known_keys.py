"""Well-known public keys: private keys that every memory image of a kind holds without
anything having leaked — the Linux kernel's crypto self-test keys (``crypto/testmgr.h``, in
the read-only data of every kernel built with the self-tests), libgcrypt's self-test keys
(mapped into every process that links it). A key verified by ``rsa-key``, ``ec-key`` or
``pem-key`` whose public part is in the table is reported with ``details.known`` naming it
and confidence KNOWN_CONFIDENCE, below the default ``--min-confidence`` (0.3): visible with
``--min-confidence 0``, the way published test card numbers carry ``details.test``.

The table (``patterns/known_keys_table.py``) is generated from the real sources by
``samples/gen_known_keys.py``; each entry names its source.
"""

from __future__ import annotations

import hashlib

from patterns.known_keys_table import KNOWN_KEYS

KNOWN_CONFIDENCE = 0.1


def public_id(kind: str, public: bytes) -> str:
    """A key's identity in the table: SHA-256 (hex) of its public part — the RSA modulus or
    DSA public value as unsigned big-endian without leading zeros, an EC point uncompressed
    (04 || X || Y)."""
    if kind in ("rsa", "dsa"):
        public = public.lstrip(b"\0")
    return hashlib.sha256(public).hexdigest()


def known_key(kind: str, public: bytes) -> str | None:
    """The name of a well-known key with this public part (``public``: an RSA modulus, DSA
    public value, or EC point X || Y as ``patterns.der.KeyInfo.public`` holds them), else
    None."""
    if not public:
        return None
    if kind == "ec":
        public = b"\x04" + public
    entry = KNOWN_KEYS.get(public_id(kind, public))
    return None if entry is None else entry[2]
