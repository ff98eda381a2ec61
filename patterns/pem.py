"""Private key blocks in text and the binary OpenSSH format: ``pem-key`` and ``ssh-key``.

- ``pem-key``: ``-----BEGIN (RSA|EC|DSA|ENCRYPTED )?PRIVATE KEY-----`` blocks. The body is
  base64-decoded and verified with the DER parsers (patterns/der.py): RSA/EC/DSA math for
  plain keys, EncryptedPrivateKeyInfo structure for PKCS#8 ENCRYPTED, and for legacy
  OpenSSL encryption (``Proc-Type: 4,ENCRYPTED`` + ``DEK-Info``) whole cipher blocks.
- ``ssh-key``: ``-----BEGIN OPENSSH PRIVATE KEY-----`` blocks, PuTTY ``.ppk`` files (v2, v3)
  and the binary ``openssh-key-v1`` structure (as ssh-agent and ssh-keygen hold it in
  memory). Verified by decoding: the SSH wire structure, the two check words and the padding
  of OpenSSH, and the key math (n == p*q, Ed25519 public key derived from the seed, EC point
  d*G) when not encrypted.

Text forms are found in ASCII and UTF-16LE through the shared anchor pass of
patterns/scratch.py (one table lookup per 2 bytes of the chunk for every detector's anchors),
with the anchors ``--`` (PEM), ``TY`` (``PuTTY-``) and ``y-`` (``openssh-key-v1``); only
candidates where the whole literal is present are parsed, from the chunk itself. Blocks
longer than MAX_CHARS characters are not looked at.
"""

from __future__ import annotations

import base64
import binascii
import re
import struct
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from patterns import der
from patterns.base import ASCII, BINARY, Chunk, Described, Detector, Hit, Hits
from patterns.scratch import (
    gather,
    literal_hits,
    register_anchor,
    texty_near_middle,
    u16_hits,
    utf16_clean,
)

MAX_CHARS = 4095  # longest block we parse (a 4096-bit RSA key in any of our forms is < 3.5k)

PEM_RE = re.compile(
    rb"-----BEGIN ((?:RSA |EC |DSA |ENCRYPTED |OPENSSH )?PRIVATE KEY)-----[ \t]*\r?\n"
    rb"((?:[A-Za-z-]+: [^\r\n]*\r?\n)*\r?\n)?"  # RFC 1421 headers (legacy encryption)
    rb"([A-Za-z0-9+/=\r\n \t]+)"
    rb"-----END \1-----"
)
PPK_RE = re.compile(
    rb"PuTTY-User-Key-File-([23]): ([a-z0-9@.-]+)\r?\n"
    rb"Encryption: ([a-z0-9-]+)\r?\n"
    rb"Comment: [^\r\n]*\r?\n"
    rb"Public-Lines: (\d{1,3})\r?\n((?:[A-Za-z0-9+/=]+\r?\n)+?)"
    rb"(?:(?:Key-Derivation|Argon2-[A-Za-z]+): [^\r\n]*\r?\n)*"
    rb"Private-Lines: (\d{1,3})\r?\n((?:[A-Za-z0-9+/=]+\r?\n)+?)"
    rb"Private-MAC: ([0-9a-f]{64}|[0-9a-f]{40})"  # HMAC-SHA-256 (v3) / HMAC-SHA-1 (v2)
)
OPENSSH_MAGIC = b"openssh-key-v1\x00"
#: OpenSSH / PuTTY ECDSA curve names -> patterns.der curve OIDs
SSH_CURVES = {
    b"nistp256": bytes.fromhex("2a8648ce3d030107"),
    b"nistp384": bytes.fromhex("2b81040022"),
    b"nistp521": bytes.fromhex("2b81040023"),
}
MAX_OPENSSH_BINARY = 8190  # bytes of a binary openssh-key-v1 blob we look at (max_len)


class SshError(ValueError):
    """Malformed SSH key structure."""


@dataclass
class Found:
    """A verified key block: ``value`` (fingerprinted), ``label`` (masked form) and details."""

    value: bytes
    label: str
    details: dict[str, Any] = field(default_factory=dict)


class Wire:
    """Reader of the SSH wire encoding (RFC 4251 section 5): uint32, string, mpint."""

    def __init__(self, buf: bytes) -> None:
        self.buf, self.pos = buf, 0

    def u32(self) -> int:
        if self.pos + 4 > len(self.buf):
            raise SshError("truncated")
        (v,) = struct.unpack_from(">I", self.buf, self.pos)
        self.pos += 4
        return v

    def string(self) -> bytes:
        n = self.u32()
        if self.pos + n > len(self.buf):
            raise SshError("string past end")
        self.pos += n
        return self.buf[self.pos - n : self.pos]

    def mpint(self) -> int:
        raw = self.string()
        if raw and raw[0] & 0x80:
            raise SshError("negative mpint")
        return int.from_bytes(raw, "big")

    def rest(self) -> bytes:
        return self.buf[self.pos :]


def _rsa_check(n: int, e: int, d: int, p: int, q: int, iqmp: int) -> dict[str, Any]:
    if n != p * q or min(p, q) < 3 or (e * d) % ((p - 1) * (q - 1) // _gcd(p - 1, q - 1)) != 1:
        raise SshError("RSA key inconsistent")
    if (iqmp * q) % p != 1:
        raise SshError("RSA iqmp inconsistent")
    return {"key_type": "ssh-rsa", "bits": n.bit_length()}


def _gcd(a: int, b: int) -> int:
    while b:
        a, b = b, a % b
    return a


def _ec_check(curve_name: bytes, q_point: bytes, d: int) -> dict[str, Any]:
    curve = der.CURVES.get(SSH_CURVES.get(curve_name, b""))
    if curve is None:
        raise SshError("unknown curve")
    size = curve.size
    if len(q_point) != 1 + 2 * size or q_point[0] != 4 or not 1 <= d < curve.n:
        raise SshError("bad EC key")
    x, y = q_point[1 : 1 + size], q_point[1 + size :]
    if curve.multiply(d) != (int.from_bytes(x, "big"), int.from_bytes(y, "big")):
        raise SshError("EC public key does not match")
    return {"key_type": "ecdsa-sha2-" + curve_name.decode(), "curve": curve.name}


def _openssh_private(key_type: bytes, w: Wire) -> tuple[bytes, dict[str, Any]]:
    """Read and verify one key of an unencrypted openssh-key-v1 private section; returns the
    private value and details."""
    if key_type == b"ssh-rsa":
        n, e, d, iqmp, p, q = (w.mpint() for _ in range(6))
        return d.to_bytes((d.bit_length() + 7) // 8, "big"), _rsa_check(n, e, d, p, q, iqmp)
    if key_type == b"ssh-ed25519":
        pub, priv = w.string(), w.string()
        if len(pub) != 32 or len(priv) != 64 or priv[32:] != pub:
            raise SshError("bad Ed25519 key")
        if der.ed25519_public(priv[:32]) != pub:
            raise SshError("Ed25519 public key does not match")
        return priv[:32], {"key_type": "ssh-ed25519", "bits": 256}
    if key_type.startswith(b"ecdsa-sha2-"):
        curve_name, q_point, d = w.string(), w.string(), w.mpint()
        if key_type != b"ecdsa-sha2-" + curve_name:
            raise SshError("curve name mismatch")
        return d.to_bytes((d.bit_length() + 7) // 8, "big"), _ec_check(curve_name, q_point, d)
    if key_type == b"ssh-dss":
        return _dsa(*(w.mpint() for _ in range(5)))
    raise SshError("unsupported key type")


def _dsa(p: int, q: int, g: int, y: int, x: int) -> tuple[bytes, dict[str, Any]]:
    """A verified DSA key (q | p-1, y = g^x mod p, sizes bounded) as (secret, details)."""
    if not der.dsa_sizes_ok(p, q) or (p - 1) % q or not 0 < x < q or pow(g, x, p) != y:
        raise SshError("DSA key inconsistent")
    return x.to_bytes((x.bit_length() + 7) // 8, "big"), {
        "key_type": "ssh-dss",
        "bits": p.bit_length(),
    }


def parse_openssh_v1(buf: bytes) -> tuple[Found, int]:
    """Verify a binary openssh-key-v1 structure at the start of ``buf`` (PROTOCOL.key);
    returns the key and the structure's length in bytes."""
    if not buf.startswith(OPENSSH_MAGIC):
        raise SshError("no magic")
    w = Wire(buf)
    w.pos = len(OPENSSH_MAGIC)
    cipher, kdf, _kdfopts = w.string(), w.string(), w.string()
    nkeys = w.u32()
    if not 1 <= nkeys <= 16:
        raise SshError("implausible key count")
    pubs = [w.string() for _ in range(nkeys)]
    private = w.string()
    end = w.pos
    key_type = Wire(pubs[0]).string()
    if not re.fullmatch(rb"[a-z0-9@.-]{3,64}", key_type):
        raise SshError("bad key type")
    details: dict[str, Any] = {"format": "openssh-key-v1", "key_type": key_type.decode()}
    if cipher != b"none":
        if kdf == b"none" or not private or len(private) % 8:
            raise SshError("bad encrypted section")
        details.update(encrypted=True, cipher=cipher.decode("ascii", "replace"), confidence=0.9)
        return Found(private, f"{key_type.decode()} (encrypted)", details), end
    if kdf != b"none" or len(private) % 8:
        raise SshError("bad private section")
    pw = Wire(private)
    if pw.u32() != pw.u32():
        raise SshError("check words differ")
    values = []
    for _ in range(nkeys):
        if pw.string() != key_type:
            raise SshError("private key type differs")
        value, info = _openssh_private(key_type, pw)
        pw.string()  # comment
        values.append(value)
    pad = pw.rest()
    if pad != bytes(range(1, len(pad) + 1)):
        raise SshError("bad padding")
    details.update(info, encrypted=False, confidence=1.0)
    return Found(b"".join(values), _label(info), details), end


def _label(info: dict[str, Any]) -> str:
    size = info.get("curve") or f"{info.get('bits')}"
    return f"{info['key_type']}-{size}"


def _b64(text: bytes) -> bytes:
    try:
        return base64.b64decode(re.sub(rb"\s+", b"", text), validate=True)
    except (binascii.Error, ValueError) as exc:
        raise SshError("bad base64") from exc


def parse_pem(text: bytes) -> tuple[Found, int, str] | None:
    """Verify the PEM private key block at the start of ``text``; returns (key, length in
    characters, detector name) or None."""
    m = PEM_RE.match(text)
    if m is None:
        return None
    label = m.group(1).decode()
    try:
        body = _b64(m.group(3))
        headers = m.group(2) or b""
        details: dict[str, Any] = {"format": "pem", "label": label}
        if label == "OPENSSH PRIVATE KEY":
            found, end = parse_openssh_v1(body)
            if end != len(body):
                raise SshError("trailing bytes")
            found.details.update(format="openssh-pem")
            return found, m.end(), "ssh-key"
        if b"ENCRYPTED" in headers:
            if b"DEK-Info:" not in headers or not body or len(body) % 8:
                return None
            details.update(encrypted=True, confidence=0.9)
            return Found(body, f"{label} (encrypted)", details), m.end(), "pem-key"
        if label == "ENCRYPTED PRIVATE KEY":
            details.update(der.parse_encrypted_pkcs8(body), confidence=0.9)
            return Found(body, "PKCS#8 (encrypted)", details), m.end(), "pem-key"
        parser = {
            "RSA PRIVATE KEY": der.parse_pkcs1_rsa,
            "EC PRIVATE KEY": der.parse_sec1_ec,
            "DSA PRIVATE KEY": der.parse_dsa,
            "PRIVATE KEY": der.parse_pkcs8,
        }[label]
        info = parser(body)
    except (SshError, der.DerError):
        return None
    described = der.describe_key(info)
    details.update(described.details, encrypted=False)
    return Found(info.value, described.masked, details), m.end(), "pem-key"


def _ppk_public(blob: bytes, algo: bytes) -> Wire:
    w = Wire(blob)
    if w.string() != algo:
        raise SshError("public blob algorithm differs")
    return w


def _ppk_private(algo: bytes, pub: Wire, priv: Wire) -> tuple[bytes, dict[str, Any]]:
    """Verify an unencrypted PPK private blob against its public blob (PuTTY's key formats:
    the public blob is the SSH public key, the private blob the remaining secrets)."""
    if algo == b"ssh-rsa":
        e, n = pub.mpint(), pub.mpint()
        d, p, q, iqmp = (priv.mpint() for _ in range(4))
        return d.to_bytes((d.bit_length() + 7) // 8, "big"), _rsa_check(n, e, d, p, q, iqmp)
    if algo == b"ssh-ed25519":
        public = pub.string()
        seed = priv.string()
        if len(seed) != 32 or der.ed25519_public(seed) != public:
            raise SshError("bad Ed25519 key")
        return seed, {"key_type": "ssh-ed25519", "bits": 256}
    if algo.startswith(b"ecdsa-sha2-"):
        curve_name, q_point = pub.string(), pub.string()
        d = priv.mpint()
        return d.to_bytes((d.bit_length() + 7) // 8, "big"), _ec_check(curve_name, q_point, d)
    if algo == b"ssh-dss":
        p, q, g, y = (pub.mpint() for _ in range(4))
        return _dsa(p, q, g, y, priv.mpint())
    raise SshError("unsupported key type")


def parse_ppk(text: bytes) -> tuple[Found, int] | None:
    """Verify the PuTTY private key file at the start of ``text``; (key, length) or None."""
    m = PPK_RE.match(text)
    if m is None:
        return None
    version, algo, enc = m.group(1), m.group(2), m.group(3)
    try:
        pub_lines, priv_lines = m.group(5).splitlines(), m.group(7).splitlines()
        if len(pub_lines) != int(m.group(4)) or len(priv_lines) != int(m.group(6)):
            raise SshError("line counts differ")
        pub, priv = _b64(m.group(5)), _b64(m.group(7))
        details: dict[str, Any] = {"format": f"ppk-v{version.decode()}"}
        pw = _ppk_public(pub, algo)
        if enc != b"none":
            if not priv or len(priv) % 16:
                raise SshError("bad encrypted blob")
            details.update(key_type=algo.decode(), encrypted=True, confidence=0.9)
            return Found(priv, f"{algo.decode()} (encrypted)", details), m.end()
        value, info = _ppk_private(algo, pw, Wire(priv))
    except SshError:
        return None
    details.update(info, encrypted=False, confidence=1.0)
    return Found(value, _label(info), details), m.end()


# --- detectors -------------------------------------------------------------------------------


register_anchor(b"--")  # "-----BEGIN "
register_anchor(b"TY")  # "PuTTY-User-Key-File-"
register_anchor(b"y-")  # "openssh-key-v1"


def _text_blocks(chunk: Chunk) -> list[tuple[int, int, int, str, Found]]:
    """Verified text key blocks of a chunk: (chunk offset, byte length, encoding index,
    detector name, key)."""
    d = chunk.data
    found = []
    for kind, literal, anchor in (("pem", b"-----BEGIN ", 0), ("ppk", b"PuTTY-User-Key-File-", 3)):
        for enc, step, offsets in literal_hits(chunk, literal, anchor):
            for off in offsets.tolist():
                res = _parse_text(kind, d[off : off + step * MAX_CHARS : step].tobytes())
                if res is None:
                    continue
                key, length, name = res
                if utf16_clean(d, np.array([off]), np.array([length]), step)[0]:
                    found.append((off, length * step, enc, name, key))
    return found


def _parse_text(kind: str, text: bytes) -> tuple[Found, int, str] | None:
    if kind == "pem":
        return parse_pem(text)
    res = parse_ppk(text)
    return None if res is None else (res[0], res[1], "ssh-key")


def _binary_openssh(chunk: Chunk) -> list[tuple[int, int, int, str, Found]]:
    out = []
    for enc, _step, offsets in literal_hits(chunk, OPENSSH_MAGIC, 10):
        if enc != ASCII:
            continue
        for off in offsets.tolist():
            blob = chunk.data[off : off + MAX_OPENSSH_BINARY].tobytes()
            try:
                key, length = parse_openssh_v1(blob)
            except SshError:
                continue
            out.append((off, length, BINARY, "ssh-key", key))
    return out


def _all_blocks(chunk: Chunk) -> list[tuple[int, int, int, str, Found]]:
    return _text_blocks(chunk) + _binary_openssh(chunk)


def _reparse(hit: Hit) -> Found | None:
    if hit.encoding == "binary":
        try:
            return parse_openssh_v1(hit.raw)[0]
        except SshError:
            return None
    text = hit.raw.decode("utf-16-le" if hit.encoding == "utf-16le" else "latin-1")
    raw = text.encode("latin-1", "replace")
    if raw.startswith(b"PuTTY"):
        res = parse_ppk(raw)
        return None if res is None else res[0]
    pem = parse_pem(raw)
    return None if pem is None else pem[0]


class _BlockDetector(Detector):
    group = "keys"
    stage = "anchors"  # the text detectors' anchor pass finds our anchors too
    context = 1  # none needed; >= 1 so the engine keeps matches starting at an extent edge
    max_len = max(2 * MAX_CHARS, MAX_OPENSSH_BINARY)  # UTF-16LE doubles the characters

    def find(self, chunk: Chunk) -> Hits:
        rows = [r for r in chunk.memo("pem.blocks", _all_blocks) if r[3] == self.name]
        if not rows:
            return Hits.empty()
        start, length, enc, _, _ = zip(*rows, strict=True)
        return Hits.of(list(start), list(length), list(enc))

    def describe(self, hit: Hit) -> Described | None:
        found = _reparse(hit)
        if found is None:
            return None
        details = dict(found.details)
        details.setdefault("encrypted", False)
        return Described(value=found.value, masked=found.label, details=details)


#: bytes around an engine edge where a block crossing it shows texty words: a UTF-16LE
#: header line (74 bytes) or legacy encryption headers come before the base64 body
BLOCK_REACH = 320


class PemKeyDetector(_BlockDetector):
    """``pem-key``: PEM private key blocks (RSA, EC, DSA, PKCS#8, encrypted), verified."""

    name = "pem-key"

    def may_touch(self, rows: Chunk) -> np.ndarray:
        return texty_near_middle(rows, BLOCK_REACH)


class SshKeyDetector(_BlockDetector):
    """``ssh-key``: OpenSSH private keys (PEM-armoured and binary openssh-key-v1) and PuTTY
    PPK files, verified."""

    name = "ssh-key"

    def may_touch(self, rows: Chunk) -> np.ndarray:
        """Texty words near the middle (text forms), or the binary magic before it."""
        out = texty_near_middle(rows, BLOCK_REACH).copy()
        n, width = rows.data.shape
        mid = width // 2
        lo = max(0, mid - MAX_OPENSSH_BINARY)
        hi = min(width, mid + len(OPENSSH_MAGIC))
        tails = np.ascontiguousarray(rows.data[:, lo:hi]).reshape(-1)
        pos = u16_hits(tails, OPENSSH_MAGIC[10:12]) - 10
        pos = pos[pos >= 0]
        magic = np.frombuffer(OPENSSH_MAGIC, np.uint8)
        pos = pos[(gather(tails, pos, len(OPENSSH_MAGIC)) == magic).all(axis=1)]
        row, rel = np.divmod(pos, hi - lo)
        out[row[rel <= mid - lo]] = True
        return out

