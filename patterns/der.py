"""Private keys in DER: RSA (PKCS#1, PKCS#8) as ``rsa-key``, EC (SEC1, PKCS#8) as ``ec-key``.

Every private key structure starts ``SEQUENCE { INTEGER version, ...`` with version 0 (PKCS#1,
PKCS#8) or 1 (SEC1, PKCS#8 v2), so stage 1 is the bytes ``02 01``, an anchor of the shared
anchor pass of patterns/scratch.py (the text detectors' lookup pass finds it at no extra
cost); the version byte, the SEQUENCE header just before and the tag just after are checked
on the candidates as arrays. Survivors (a handful per image) are parsed strictly in Python
and verified:

- RSA: n == p*q, e*d == 1 mod lcm(p-1, q-1), the CRT values d mod (p-1), d mod (q-1) and
  q^-1 mod p; any changed byte in any of the integers breaks one of those.
- EC: the curve OID is a known curve, 1 <= d < order, the private key has the curve's size,
  and when the public point is present it equals d*G (so a changed byte anywhere in the key
  material is caught); without it only structure and OID vouch for the key (lower confidence).
  RFC 8410 keys (Ed25519 ...) in PKCS#8 are reported as ``ec-key`` with their curve name; an
  Ed25519 public key, when present, must be the one derived from the seed.

The same parsers verify the bodies of PEM blocks (patterns/pem.py).
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, field
from math import lcm
from typing import Any

import numpy as np

from patterns.base import BINARY, Chunk, Described, Detector, Hit, Hits
from patterns.known_keys import KNOWN_CONFIDENCE, known_key
from patterns.scratch import anchor_hits, gather, register_anchor, u16_hits

SEQUENCE, INTEGER, BIT_STRING, OCTET_STRING, NULL, OID = 0x30, 0x02, 0x03, 0x04, 0x05, 0x06
CTX0, CTX1 = 0xA0, 0xA1  # [0] EXPLICIT parameters / attributes, [1] EXPLICIT public key

OID_RSA = bytes.fromhex("2a864886f70d010101")  # 1.2.840.113549.1.1.1 rsaEncryption
OID_RSA_PSS = bytes.fromhex("2a864886f70d01010a")  # 1.2.840.113549.1.1.10 RSASSA-PSS
OID_EC = bytes.fromhex("2a8648ce3d0201")  # 1.2.840.10045.2.1 id-ecPublicKey
OID_DSA = bytes.fromhex("2a8648ce380401")  # 1.2.840.10040.4.1 id-dsa
#: RFC 8410 curves: OID -> name (private key is an OCTET STRING of the key size)
OID_EDWARDS = {
    bytes.fromhex("2b656e"): ("x25519", 32),
    bytes.fromhex("2b656f"): ("x448", 56),
    bytes.fromhex("2b6570"): ("ed25519", 32),
    bytes.fromhex("2b6571"): ("ed448", 57),
}

MAX_DER = 4094  # bytes: a PKCS#8 4096-bit RSA key is ~2.4 kB; 6900-bit ones still fit
MIN_RSA_BITS = 256


class DerError(ValueError):
    """Malformed or inconsistent DER."""


@dataclass(frozen=True)
class Curve:
    """A short-Weierstrass curve y^2 = x^3 + a*x + b over GF(p), base point G of order n."""

    name: str
    p: int
    a: int
    b: int
    gx: int
    gy: int
    n: int

    @property
    def size(self) -> int:
        """Bytes of a coordinate / private scalar."""
        return (self.p.bit_length() + 7) // 8

    def on_curve(self, x: int, y: int) -> bool:
        return (y * y - (x * x * x + self.a * x + self.b)) % self.p == 0

    def multiply(self, k: int) -> tuple[int, int] | None:
        """k*G in affine coordinates (None for the point at infinity); double-and-add, run
        only for the rare verified candidate."""
        p = self.p
        result: tuple[int, int] | None = None
        addend: tuple[int, int] | None = (self.gx, self.gy)
        while k:
            if k & 1:
                result = self._add(result, addend)
            addend = self._add(addend, addend)
            k >>= 1
        return None if result is None else (result[0] % p, result[1] % p)

    def _add(
        self, s: tuple[int, int] | None, t: tuple[int, int] | None
    ) -> tuple[int, int] | None:
        if s is None:
            return t
        if t is None:
            return s
        p = self.p
        (x1, y1), (x2, y2) = s, t
        if x1 == x2:
            if (y1 + y2) % p == 0:
                return None
            lam = (3 * x1 * x1 + self.a) * pow(2 * y1, -1, p) % p
        else:
            lam = (y2 - y1) * pow(x2 - x1, -1, p) % p
        x3 = (lam * lam - x1 - x2) % p
        return x3, (lam * (x1 - x3) - y1) % p


CURVES: dict[bytes, Curve] = {
    bytes.fromhex("2a8648ce3d030107"): Curve(  # 1.2.840.10045.3.1.7
        "prime256v1",
        2**256 - 2**224 + 2**192 + 2**96 - 1,
        -3,
        0x5AC635D8AA3A93E7B3EBBD55769886BC651D06B0CC53B0F63BCE3C3E27D2604B,
        0x6B17D1F2E12C4247F8BCE6E563A440F277037D812DEB33A0F4A13945D898C296,
        0x4FE342E2FE1A7F9B8EE7EB4A7C0F9E162BCE33576B315ECECBB6406837BF51F5,
        0xFFFFFFFF00000000FFFFFFFFFFFFFFFFBCE6FAADA7179E84F3B9CAC2FC632551,
    ),
    bytes.fromhex("2b81040022"): Curve(  # 1.3.132.0.34
        "secp384r1",
        2**384 - 2**128 - 2**96 + 2**32 - 1,
        -3,
        int(
            "b3312fa7e23ee7e4988e056be3f82d19181d9c6efe8141120314088f5013875a"
            "c656398d8a2ed19d2a85c8edd3ec2aef",
            16,
        ),
        int(
            "aa87ca22be8b05378eb1c71ef320ad746e1d3b628ba79b9859f741e082542a38"
            "5502f25dbf55296c3a545e3872760ab7",
            16,
        ),
        int(
            "3617de4a96262c6f5d9e98bf9292dc29f8f41dbd289a147ce9da3113b5f0b8c0"
            "0a60b1ce1d7e819d7a431d7c90ea0e5f",
            16,
        ),
        int(
            "ffffffffffffffffffffffffffffffffffffffffffffffffc7634d81f4372ddf"
            "581a0db248b0a77aecec196accc52973",
            16,
        ),
    ),
    bytes.fromhex("2b81040023"): Curve(  # 1.3.132.0.35
        "secp521r1",
        2**521 - 1,
        -3,
        int(
            "0051953eb9618e1c9a1f929a21a0b68540eea2da725b99b315f3b8b489918ef1"
            "09e156193951ec7e937b1652c0bd3bb1bf073573df883d2c34f1ef451fd46b503f00",
            16,
        ),
        int(
            "00c6858e06b70404e9cd9e3ecb662395b4429c648139053fb521f828af606b4d"
            "3dbaa14b5e77efe75928fe1dc127a2ffa8de3348b3c1856a429bf97e7e31c2e5bd66",
            16,
        ),
        int(
            "011839296a789a3bc0045c8a5fb42c7d1bd998f54449579b446817afbd17273e"
            "662c97ee72995ef42640c550b9013fad0761353c7086a272c24088be94769fd16650",
            16,
        ),
        int(
            "01ff" + "ffffffff" * 7 + "fffffffa"
            "51868783bf2f966b7fcc0148f709a5d03bb5c9b8899c47aebb6fb71e91386409",
            16,
        ),
    ),
    bytes.fromhex("2b8104000a"): Curve(  # 1.3.132.0.10
        "secp256k1",
        2**256 - 2**32 - 977,
        0,
        7,
        0x79BE667EF9DCBBAC55A06295CE870B07029BFCDB2DCE28D959F2815B16F81798,
        0x483ADA7726A3C4655DA4FBFC0E1108A8FD17B448A68554199C47D08FFB10D4B8,
        0xFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFEBAAEDCE6AF48A03BBFD25E8CD0364141,
    ),
}


# Ed25519 (RFC 8032 section 5.1): -x^2 + y^2 = 1 + d x^2 y^2 over GF(2^255 - 19), base point B
_ED_P = 2**255 - 19
_ED_D = -121665 * pow(121666, -1, _ED_P) % _ED_P
_ED_B = (
    15112221349535400772501151409588531511454012693041857206046113283949847762202,
    46316835694926478169428394003475163141307993866256225615783033603165251855960,
)


def _ed_add(s: tuple[int, ...], t: tuple[int, ...]) -> tuple[int, ...]:
    """Sum of two points in extended coordinates (X, Y, Z, T), unified formula."""
    p = _ED_P
    a = (s[1] - s[0]) * (t[1] - t[0]) % p
    b = (s[1] + s[0]) * (t[1] + t[0]) % p
    c = 2 * _ED_D * s[3] * t[3] % p
    d = 2 * s[2] * t[2] % p
    e, f, g, h = b - a, d - c, d + c, b + a
    return e * f % p, g * h % p, f * g % p, e * h % p


def ed25519_public(seed: bytes) -> bytes:
    """The Ed25519 public key of a 32-byte private seed (RFC 8032 section 5.1.5)."""
    h = hashlib.sha512(seed).digest()
    a = int.from_bytes(h[:32], "little") & ((1 << 254) - 8) | (1 << 254)
    point = (0, 1, 1, 0)
    addend = (_ED_B[0], _ED_B[1], 1, _ED_B[0] * _ED_B[1] % _ED_P)
    while a:
        if a & 1:
            point = _ed_add(point, addend)
        addend = _ed_add(addend, addend)
        a >>= 1
    zinv = pow(point[2], -1, _ED_P)
    x, y = point[0] * zinv % _ED_P, point[1] * zinv % _ED_P
    return (y | (x & 1) << 255).to_bytes(32, "little")


@dataclass
class KeyInfo:
    """A verified private key: ``kind`` (rsa, ec, dsa, or an RFC 8410 curve name via ec),
    ``value`` the normalized secret (PKCS#1 DER for RSA, the private scalar for EC/DSA: the
    same key in any container gets the same fingerprint), ``label`` e.g. ``RSA-2048`` and the
    detector details."""

    kind: str
    value: bytes
    label: str
    details: dict[str, Any] = field(default_factory=dict)
    public: bytes = b""  # shown (first/last 2 bytes) in the masked form: modulus / point
    #: (offset, length) in the parsed bytes of a wrapped key that is a valid key on its own
    #: (PKCS#1 / SEC1 with its curve inside PKCS#8): reported instead of the wrapper, so the
    #: key has one address whether or not a scan sees the wrapper (e.g. across a page seam)
    inner: tuple[int, int] | None = None


def tlv(buf: bytes, pos: int, end: int) -> tuple[int, int, int]:
    """One DER element at ``pos``: (tag, content start, content end); lengths must be minimal
    and inside ``end``."""
    if pos + 2 > end:
        raise DerError("truncated header")
    tag, ln = buf[pos], buf[pos + 1]
    pos += 2
    if ln & 0x80:
        k = ln & 0x7F
        if not 1 <= k <= 3 or pos + k > end:
            raise DerError("bad length")
        ln = int.from_bytes(buf[pos : pos + k], "big")
        pos += k
        if ln < 0x80 or ln < 1 << (8 * (k - 1)):
            raise DerError("non-minimal length")
    if pos + ln > end:
        raise DerError("length past end")
    return tag, pos, pos + ln


def children(buf: bytes, start: int, stop: int) -> list[tuple[int, int, int]]:
    """The elements filling ``[start, stop)`` exactly."""
    out = []
    while start < stop:
        t = tlv(buf, start, stop)
        out.append(t)
        start = t[2]
    return out


def _expect(item: tuple[int, int, int], tag: int) -> tuple[int, int]:
    if item[0] != tag:
        raise DerError(f"expected tag {tag:#x}, got {item[0]:#x}")
    return item[1], item[2]


def _int(buf: bytes, item: tuple[int, int, int]) -> int:
    """A non-negative INTEGER, minimally encoded."""
    s, e = _expect(item, INTEGER)
    if e == s or buf[s] & 0x80 or (e - s > 1 and buf[s] == 0 and buf[s + 1] < 0x80):
        raise DerError("bad integer")
    return int.from_bytes(buf[s:e], "big")


def _seq(buf: bytes, start: int = 0, end: int | None = None) -> list[tuple[int, int, int]]:
    """Children of the SEQUENCE that exactly fills ``buf[start:end]``."""
    end = len(buf) if end is None else end
    t = tlv(buf, start, end)
    if t[0] != SEQUENCE or t[2] != end:
        raise DerError("not one SEQUENCE")
    return children(buf, t[1], t[2])


def parse_pkcs1_rsa(buf: bytes) -> KeyInfo:
    """Verify an RSAPrivateKey (RFC 8017 A.1.2, two-prime) filling ``buf``."""
    items = _seq(buf)
    if len(items) != 9:
        raise DerError("RSAPrivateKey needs 9 fields")
    version, n, e, d, p, q, dp, dq, qinv = (_int(buf, it) for it in items)
    if version != 0 or n.bit_length() < MIN_RSA_BITS or min(p, q) < 3 or e < 3:
        raise DerError("implausible RSA values")
    if n != p * q or (e * d) % lcm(p - 1, q - 1) != 1:
        raise DerError("RSA key inconsistent")
    if dp != d % (p - 1) or dq != d % (q - 1) or (qinv * q) % p != 1:
        raise DerError("RSA CRT values inconsistent")
    bits = n.bit_length()
    modulus = n.to_bytes((bits + 7) // 8, "big")
    return KeyInfo("rsa", buf, f"RSA-{bits}", {"bits": bits, "e": e}, modulus)


def _ec_point(curve: Curve, bits: bytes) -> tuple[int, int]:
    """Decode an uncompressed SEC1 point (BIT STRING content with its unused-bits byte)."""
    size = curve.size
    if len(bits) != 2 + 2 * size or bits[0] != 0 or bits[1] != 4:
        raise DerError("public key is not an uncompressed point")
    return int.from_bytes(bits[2 : 2 + size], "big"), int.from_bytes(bits[2 + size :], "big")


def parse_sec1_ec(buf: bytes, curve_oid: bytes | None = None) -> KeyInfo:
    """Verify an ECPrivateKey (RFC 5915) filling ``buf``; ``curve_oid`` comes from a PKCS#8
    wrapper when the key itself omits its parameters."""
    items = _seq(buf)
    if len(items) < 2 or _int(buf, items[0]) != 1:
        raise DerError("ECPrivateKey version must be 1")
    ks, ke = _expect(items[1], OCTET_STRING)
    pub: bytes | None = None
    for tag, s, e in items[2:]:
        if tag == CTX0:
            inner = tlv(buf, s, e)
            if inner[2] != e:
                raise DerError("bad parameters")
            oid = buf[slice(*_expect(inner, OID))]
            if curve_oid is not None and oid != curve_oid:
                raise DerError("curve mismatch")
            curve_oid = oid
        elif tag == CTX1:
            inner = tlv(buf, s, e)
            if inner[2] != e:
                raise DerError("bad public key")
            pub = buf[slice(*_expect(inner, BIT_STRING))]
        else:
            raise DerError("unexpected field")
    curve = CURVES.get(curve_oid or b"")
    if curve is None:
        raise DerError("unknown or missing curve")
    scalar = buf[ks:ke]
    d = int.from_bytes(scalar, "big")
    if len(scalar) != curve.size or not 1 <= d < curve.n:
        raise DerError("private scalar out of range")
    details: dict[str, Any] = {"curve": curve.name, "bits": curve.n.bit_length()}
    if pub is not None:
        if curve.multiply(d) != _ec_point(curve, pub):
            raise DerError("public key does not match the private key")
        details["public_key_verified"] = True
        details["confidence"] = 1.0
    else:
        _random_looking(scalar)
        details["public_key_verified"] = False
        details["confidence"] = 0.7
    return KeyInfo("ec", scalar, f"EC-{curve.name}", details, pub[2:] if pub else scalar[:0])


def _random_looking(secret: bytes) -> None:
    """A private scalar that nothing else verifies must at least look like key material:
    n random bytes hold close to n distinct values (32 bytes: about 30, fewer than 20 with
    odds below 1e-6), while bytecode, text and tables that mimic the header do not."""
    if len(set(secret)) < len(secret) * 5 // 8:
        raise DerError("unverifiable key material that does not look random")


def dsa_sizes_ok(p: int, q: int) -> bool:
    """FIPS 186 sizes (p <= 4096 bits, q <= 512): bounds the modular exponentiations a crafted
    structure could make us do."""
    return 3 <= p and p.bit_length() <= 4096 and 2 <= q and q.bit_length() <= 512


def parse_dsa(buf: bytes) -> KeyInfo:
    """Verify an OpenSSL DSA private key SEQUENCE {0, p, q, g, y, x}: q | p-1, g^q == 1 and
    y == g^x mod p."""
    items = _seq(buf)
    if len(items) != 6:
        raise DerError("DSA key needs 6 fields")
    version, p, q, g, y, x = (_int(buf, it) for it in items)
    if version != 0 or not dsa_sizes_ok(p, q) or (p - 1) % q or not 1 < g < p or not 0 < x < q:
        raise DerError("implausible DSA values")
    if pow(g, q, p) != 1 or pow(g, x, p) != y:
        raise DerError("DSA key inconsistent")
    bits = p.bit_length()
    return KeyInfo("dsa", buf, f"DSA-{bits}", {"bits": bits}, y.to_bytes((bits + 7) // 8, "big"))


def parse_pkcs8(buf: bytes) -> KeyInfo:
    """Verify a PrivateKeyInfo / OneAsymmetricKey (RFC 5208 / 5958) filling ``buf`` and the
    key inside (RSA, EC, DSA, RFC 8410 curves)."""
    items = _seq(buf)
    if len(items) < 3:
        raise DerError("PrivateKeyInfo needs 3 fields")
    alg = children(buf, *_expect(items[1], SEQUENCE))
    ks, ke = _expect(items[2], OCTET_STRING)
    tags = [t for t, _s, _e in items[3:]]
    if tags not in ([], [CTX0], [0x81], [CTX0, 0x81]):  # [0] attributes, [1] public key
        raise DerError("unexpected field")
    # RFC 5958: version 2 (encoded 1) exactly when the public key is present
    if _int(buf, items[0]) != (1 if 0x81 in tags else 0):
        raise DerError("bad PrivateKeyInfo version")
    if not alg:
        raise DerError("empty AlgorithmIdentifier")
    oid = buf[slice(*_expect(alg[0], OID))]
    params = alg[1:]
    key = buf[ks:ke]
    if oid in (OID_RSA, OID_RSA_PSS):
        # rsaEncryption parameters are NULL (RFC 8017 A.1); PSS ones are absent or a SEQUENCE
        null = [(NULL, s, s) for _t, s, _e in params[:1]]
        if (oid == OID_RSA and params != null) or (oid == OID_RSA_PSS and len(params) > 1):
            raise DerError("bad RSA parameters")
        info = parse_pkcs1_rsa(key)
    elif oid == OID_EC:
        if len(params) != 1:
            raise DerError("EC key without curve")
        info = parse_sec1_ec(key, buf[slice(*_expect(params[0], OID))])
    elif oid in OID_EDWARDS:
        name, size = OID_EDWARDS[oid]
        inner = tlv(key, 0, len(key))
        if params or inner[2] != len(key) or inner[2] - inner[1] != size:
            raise DerError(f"bad {name} key")
        scalar = key[slice(*_expect(inner, OCTET_STRING))]
        info = KeyInfo("ec", scalar, f"EC-{name}", {"curve": name, "bits": 8 * size})
        public = [buf[s + 1 : e] for t, s, e in items[3:] if t == 0x81 and buf[s : s + 1] == b"\0"]
        verified = bool(public) and name == "ed25519" and ed25519_public(scalar) == public[0]
        if public and name == "ed25519" and not verified:
            raise DerError("Ed25519 public key does not match")
        if not verified:
            _random_looking(scalar)
        info.details.update(public_key_verified=verified, confidence=1.0 if verified else 0.7)
    elif oid == OID_DSA:
        if len(params) != 1:
            raise DerError("DSA key without parameters")
        p, q, g = (_int(buf, it) for it in children(buf, *_expect(params[0], SEQUENCE)))
        x = _int(key, tlv(key, 0, len(key)))
        if not dsa_sizes_ok(p, q) or (p - 1) % q or not 0 < x < q or pow(g, q, p) != 1:
            raise DerError("DSA key inconsistent")
        info = KeyInfo("dsa", key, f"DSA-{p.bit_length()}", {"bits": p.bit_length()})
    else:
        raise DerError("unknown key algorithm")
    info.details["container"] = "pkcs8"
    try:
        parse_pkcs1_rsa(key) if info.kind == "rsa" else parse_sec1_ec(key)
        info.inner = (ks, ke - ks)
    except DerError:
        pass  # e.g. SEC1 without its curve: only the wrapper says which
    return info


def parse_encrypted_pkcs8(buf: bytes) -> dict[str, Any]:
    """Check an EncryptedPrivateKeyInfo (RFC 5958 section 3) filling ``buf``: an
    AlgorithmIdentifier then a non-empty OCTET STRING. Returns details."""
    items = _seq(buf)
    if len(items) != 2:
        raise DerError("EncryptedPrivateKeyInfo needs 2 fields")
    alg = children(buf, *_expect(items[0], SEQUENCE))
    if not alg or alg[0][0] != OID:
        raise DerError("bad encryption AlgorithmIdentifier")
    s, e = _expect(items[1], OCTET_STRING)
    if e - s < 8 or (e - s) % 8:
        raise DerError("ciphertext is not whole cipher blocks")
    return {"encrypted": True, "bytes": e - s}


def parse_private_key(buf: bytes) -> KeyInfo:
    """Any unencrypted DER private key container: PKCS#8, PKCS#1 RSA, SEC1 EC, OpenSSL DSA."""
    for parse, container in (
        (parse_pkcs8, None),
        (parse_pkcs1_rsa, "pkcs1"),
        (parse_sec1_ec, "sec1"),
        (parse_dsa, "openssl-dsa"),
    ):
        try:
            info = parse(buf)
        except DerError:
            continue
        if container:
            info.details["container"] = container
        return info
    raise DerError("not a private key")


# --- the binary detectors --------------------------------------------------------------------


VERSION = b"\x02\x01"  # INTEGER of length 1: the version
register_anchor(VERSION, text=False)


def _headers(d: np.ndarray, v: np.ndarray) -> tuple[np.ndarray, ...]:
    """(start, total length) of every byte run of ``d`` that opens like a private key:
    ``SEQUENCE`` header, ``INTEGER`` version 0 or 1 (``v``: sorted offsets of VERSION), then
    the tag a key has next; lengths in bytes, not checked against the end of ``d``."""
    none = np.zeros(0, np.int64)
    v = v[(v >= 2) & (v + 4 < d.size)]
    if v.size == 0:
        return none, none
    w = gather(d, v - 4, 8)  # 4 bytes of SEQUENCE header room, 02 01 ver, next tag
    ver, nxt = w[:, 6], w[:, 7]
    ok = ((ver == 0) & ((nxt == INTEGER) | (nxt == SEQUENCE))) | (
        (ver == 1) & ((nxt == OCTET_STRING) | (nxt == SEQUENCE))
    )
    # SEQUENCE header right before: 30 82 hh ll / 30 81 ll / 30 ll
    h4 = (w[:, 0] == SEQUENCE) & (w[:, 1] == 0x82) & (v >= 4)
    h3 = (w[:, 1] == SEQUENCE) & (w[:, 2] == 0x81) & (v >= 3)
    h2 = (w[:, 2] == SEQUENCE) & (w[:, 3] < 0x80)
    hl = np.where(h4, 4, np.where(h3, 3, 2))
    body = np.where(h4, w[:, 2].astype(np.int64) * 256 + w[:, 3], w[:, 3])
    ok &= (h4 | h3 | h2) & (hl + body <= MAX_DER)
    return (v - hl)[ok], (hl + body)[ok]


PKCS8_TAG = 1  # Hits.tag: the key was found wrapped in PKCS#8 (reported at its inner span)


def _candidates(chunk: Chunk) -> list[tuple[int, int, int, KeyInfo]]:
    """Verified DER keys in a chunk: (start, length, tag, info), each key once: a PKCS#8 key
    at the span of its inner PKCS#1 / SEC1 key when that stands alone."""
    d = chunk.data
    hits = anchor_hits(chunk, VERSION)  # bytes only: one (encoding, step, offsets) at most
    start, total = _headers(d, hits[0][2] if hits else np.zeros(0, np.int64))
    ok = start + total <= d.size
    found: dict[tuple[int, int], tuple[int, KeyInfo]] = {}
    for s, t in zip(start[ok].tolist(), total[ok].tolist(), strict=True):
        try:
            info = parse_private_key(d[s : s + t].tobytes())
        except DerError:
            continue
        if info.kind not in ("rsa", "ec"):
            continue
        wrapped = info.details.get("container") == "pkcs8"
        if info.inner is not None:
            s, t = s + info.inner[0], info.inner[1]
        if wrapped or (s, t) not in found:
            found[(s, t)] = (PKCS8_TAG if wrapped else 0, info)
    # a wrapper we could not report at its inner span still contains that key's own header
    out = []
    for (s, t), (tag, info) in sorted(found.items()):
        if not any(s2 <= s and s + t <= s2 + t2 and (s2, t2) != (s, t) for s2, t2 in found):
            out.append((s, t, tag, info))
    return out


def describe_key(info: KeyInfo) -> Described:
    """Masked form and details of a verified key (shared with the PEM detector): the key type
    and size and the first/last 2 bytes of its public part (modulus or point), never the
    private material. A well-known key (patterns/known_keys.py) says so in ``details.known``,
    below the default confidence threshold."""
    pub = info.public
    tail = f" {pub[:2].hex()}...{pub[-2:].hex()}" if len(pub) >= 4 else ""
    details = dict(info.details)
    details.setdefault("confidence", 1.0)
    known = known_key(info.kind, pub)
    if known is not None:
        details.update(known=known, confidence=KNOWN_CONFIDENCE)
    return Described(value=info.value, masked=f"{info.label}{tail}", details=details)


class _DerDetector(Detector):
    group = "keys"
    stage = "anchors"  # the text detectors' anchor pass finds our VERSION too
    max_len = MAX_DER
    context = 1  # none needed; >= 1 so the engine keeps matches starting at an extent edge
    kind: str

    def may_touch(self, rows: Chunk) -> np.ndarray:
        """Rows (engine seam windows) where a key header before the middle declares a
        structure reaching past it."""
        n, width = rows.data.shape
        mid = width // 2
        lo = max(0, mid - MAX_DER)
        hi = min(width, mid + 16)  # a header (8 bytes read) may itself straddle the middle
        tails = np.ascontiguousarray(rows.data[:, lo:hi]).reshape(-1)
        start, total = _headers(tails, u16_hits(tails, VERSION))
        row, rel = np.divmod(start, hi - lo)
        join = mid - lo
        out = np.zeros(n, np.bool_)
        out[row[(rel <= join) & (rel + total >= join)]] = True  # as the engine's context of 1
        return out

    def find(self, chunk: Chunk) -> Hits:
        keys = chunk.memo("der.keys", _candidates)
        found = [(s, t, tag) for s, t, tag, info in keys if info.kind == self.kind]
        if not found:
            return Hits.empty()
        s, t, tag = zip(*found, strict=True)
        return Hits.of(list(s), list(t), BINARY, list(tag))

    def describe(self, hit: Hit) -> Described | None:
        try:
            info = parse_private_key(hit.raw)
        except DerError:
            return None
        if hit.tag == PKCS8_TAG:
            info.details["container"] = "pkcs8"
        return describe_key(info)


class RsaKeyDetector(_DerDetector):
    """``rsa-key``: DER RSA private keys (PKCS#1, PKCS#8), verified n == p*q etc."""

    name = "rsa-key"
    kind = "rsa"


class EcKeyDetector(_DerDetector):
    """``ec-key``: DER EC private keys (SEC1, PKCS#8; P-256/384/521, secp256k1, and the RFC
    8410 curves in PKCS#8), verified by structure, curve OID and public point."""

    name = "ec-key"
    kind = "ec"
