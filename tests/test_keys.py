"""rsa-key, ec-key, pem-key, ssh-key: real keys generated at test time (``cryptography``,
``ssh-keygen``) in every container form are found once with the right size/curve; truncated or
corrupted ones are not reported."""

from __future__ import annotations

import base64
import binascii
import shutil
import struct
import subprocess

import numpy as np
import pytest
from hypothesis import assume, given, settings
from hypothesis import strategies as st

from patterns.base import Chunk, Hit
from patterns.der import CURVES, EcKeyDetector, RsaKeyDetector, ed25519_public
from patterns.pem import OPENSSH_MAGIC, PemKeyDetector, SshKeyDetector, Wire

crypto = pytest.importorskip("cryptography", reason="keys are generated with cryptography",
                             exc_type=ImportError)
from cryptography.hazmat.primitives import serialization as ser  # noqa: E402
from cryptography.hazmat.primitives.asymmetric import ec, ed25519  # noqa: E402

DETECTORS = {d.name: d for d in (RsaKeyDetector(), EcKeyDetector(), PemKeyDetector(),
                                 SshKeyDetector())}
SETTINGS = settings(max_examples=30)
NOENC = ser.NoEncryption()
ENC = ser.BestAvailableEncryption(b"correct horse")
PEM, DER = ser.Encoding.PEM, ser.Encoding.DER
TRAD, PKCS8, OPENSSH = (ser.PrivateFormat.TraditionalOpenSSL, ser.PrivateFormat.PKCS8,
                        ser.PrivateFormat.OpenSSH)
EC_CURVES = {"prime256v1": ec.SECP256R1, "secp384r1": ec.SECP384R1, "secp521r1": ec.SECP521R1,
             "secp256k1": ec.SECP256K1}


def background(seed: int, size: int) -> bytearray:
    return bytearray(np.random.default_rng(seed).integers(0, 256, size, dtype=np.uint8).tobytes())


def scan(buf: bytes, name: str) -> list[tuple[int, int, str, dict]]:
    """(offset, length, masked, details) of each hit of detector ``name`` on one chunk."""
    det = DETECTORS[name]
    hits = det.find(Chunk(np.frombuffer(bytes(buf), np.uint8)))
    out = []
    tags = [0] * len(hits) if hits.tag is None else hits.tag.tolist()
    for s, n, e, tag in zip(hits.start.tolist(), hits.length.tolist(), hits.encoding.tolist(),
                            tags, strict=True):
        enc = ("ascii", "utf-16le", "binary")[e]
        d = det.describe(Hit(bytes(buf[s : s + n]), enc, b"", b"", tag))
        assert d is not None
        out.append((s, n, d.masked, d.details))
    return sorted(out)


def plant(blob: bytes, where: int, size: int = 12000, seed: int = 0) -> bytearray:
    buf = background(seed, size)
    buf[where : where + len(blob)] = blob
    return buf


# --- DER -------------------------------------------------------------------------------------

DER_CASES = [
    ("rsa1024", TRAD, "rsa-key", "pkcs1"),
    ("rsa2048", TRAD, "rsa-key", "pkcs1"),
    ("rsa1024", PKCS8, "rsa-key", "pkcs8"),
    ("rsa2048", PKCS8, "rsa-key", "pkcs8"),
    *[(c, f, "ec-key", t) for c in EC_CURVES for f, t in ((TRAD, "sec1"), (PKCS8, "pkcs8"))],
    ("ed25519", PKCS8, "ec-key", "pkcs8"),
]


def expected_span(kind: str, blob: bytes, where: int, key) -> tuple[int, int]:
    """Where a planted DER key is reported: a PKCS#8 key at its inner key when that is a
    key on its own (the traditional form found verbatim inside), else the whole blob."""
    inner = b"" if kind == "ed25519" else key(kind).private_bytes(DER, TRAD, NOENC)
    at = blob.find(inner) if inner and inner != blob else -1
    return (where + at, len(inner)) if at >= 0 else (where, len(blob))


@pytest.mark.parametrize(("kind", "fmt", "name", "container"), DER_CASES)
@pytest.mark.parametrize("where", [0, 1, 4093])
def test_der_keys_found_once(kind: str, fmt, name: str, container: str, where: int, key) -> None:
    blob = key(kind).private_bytes(DER, fmt, NOENC)
    buf = plant(blob, where)
    found = scan(buf, name)
    assert [(s, n) for s, n, _, _ in found] == [expected_span(kind, blob, where, key)]
    details = found[0][3]
    assert details["container"] == container
    if name == "rsa-key":
        assert details["bits"] == int(kind[3:])
    else:
        assert details["curve"] == kind
    other = "ec-key" if name == "rsa-key" else "rsa-key"
    assert scan(buf, other) == []


def test_ed25519_public_matches_cryptography() -> None:
    for _ in range(3):
        k = ed25519.Ed25519PrivateKey.generate()
        seed = k.private_bytes(ser.Encoding.Raw, ser.PrivateFormat.Raw, NOENC)
        public = k.public_key().public_bytes(ser.Encoding.Raw, ser.PublicFormat.Raw)
        assert ed25519_public(seed) == public


def test_curve_constants_are_consistent() -> None:
    for curve in CURVES.values():
        assert curve.on_curve(curve.gx, curve.gy)
        assert curve.multiply(curve.n) is None  # n*G is the point at infinity


@SETTINGS
@given(index=st.integers(0, 10**6), delta=st.integers(1, 255),
       case=st.sampled_from(["rsa1024-1", "rsa1024-8", "prime256v1-1", "secp384r1-8"]))
def test_der_one_changed_byte_not_reported(index: int, delta: int, case: str, key) -> None:
    kind, fmt = case.split("-")
    blob = bytearray(key(kind).private_bytes(DER, TRAD if fmt == "1" else PKCS8, NOENC))
    i = index % len(blob)
    blob[i] ^= delta
    where = 100
    buf = plant(bytes(blob), where, size=4096)
    for name in ("rsa-key", "ec-key"):
        for s, n, _, _ in scan(buf, name):
            # a PKCS#8 key damaged in its wrapper still holds an intact inner key; what may
            # be reported is that intact part, never bytes including the change
            assert not s <= where + i < s + n


@pytest.mark.parametrize("kind", ["rsa2048", "prime256v1"])
def test_der_truncated_not_reported(kind: str, key) -> None:
    blob = key(kind).private_bytes(DER, TRAD, NOENC)
    for cut in (1, 2, len(blob) // 2):
        buf = background(2, 6000)
        buf[200 : 200 + len(blob) - cut] = blob[:-cut]
        # what follows the cut is other memory: anything but the key's own bytes
        buf[200 + len(blob) - cut : 200 + len(blob)] = bytes(b ^ 0xFF for b in blob[-cut:])
        assert scan(buf, "rsa-key") == [] and scan(buf, "ec-key") == []


# --- PEM -------------------------------------------------------------------------------------

PEM_CASES = [
    ("rsa2048", TRAD, NOENC, "RSA PRIVATE KEY", False),
    ("rsa2048", PKCS8, NOENC, "PRIVATE KEY", False),
    ("rsa2048", TRAD, ENC, "RSA PRIVATE KEY", True),  # legacy Proc-Type/DEK-Info
    ("rsa2048", PKCS8, ENC, "ENCRYPTED PRIVATE KEY", True),
    ("prime256v1", TRAD, NOENC, "EC PRIVATE KEY", False),
    ("secp384r1", PKCS8, NOENC, "PRIVATE KEY", False),
    ("prime256v1", TRAD, ENC, "EC PRIVATE KEY", True),
    ("dsa", TRAD, NOENC, "DSA PRIVATE KEY", False),
    ("dsa", PKCS8, NOENC, "PRIVATE KEY", False),
    ("ed25519", PKCS8, NOENC, "PRIVATE KEY", False),
    ("ed25519", PKCS8, ENC, "ENCRYPTED PRIVATE KEY", True),
]


def encode(text: bytes, encoding: str) -> bytes:
    return text if encoding == "ascii" else text.decode("ascii").encode("utf-16-le")


@pytest.mark.parametrize(("kind", "fmt", "enc", "label", "encrypted"), PEM_CASES)
@pytest.mark.parametrize(("encoding", "where"), [("ascii", 0), ("ascii", 777), ("utf-16le", 778),
                                                 ("utf-16le", 1001)])
def test_pem_found_once(kind, fmt, enc, label, encrypted, encoding, where, key) -> None:
    pem = key(kind).private_bytes(PEM, fmt, enc)
    assert pem.startswith(f"-----BEGIN {label}-----".encode())
    blob = encode(pem.rstrip(b"\n"), encoding)
    buf = plant(blob, where)
    found = scan(buf, "pem-key")
    assert [(s, n) for s, n, _, _ in found] == [(where, len(blob))]
    details = found[0][3]
    assert details["label"] == label and details["encrypted"] is encrypted
    if not encrypted and kind.startswith("rsa"):
        assert details["bits"] == 2048
    assert scan(buf, "ssh-key") == []


@SETTINGS
@given(pos=st.integers(0, 10**6), char=st.sampled_from("AQgw+/019"),
       case=st.sampled_from(["rsa1024", "prime256v1", "dsa"]))
def test_pem_changed_body_not_reported(pos: int, char: str, case: str, key) -> None:
    pem = key(case).private_bytes(PEM, TRAD, NOENC)
    lines = pem.split(b"\n")
    body = b"".join(lines[1:-2])
    i = pos % len(body)
    assume(body[i : i + 1] != char.encode())
    changed = body[:i] + char.encode() + body[i + 1 :]
    try:
        decoded = base64.b64decode(changed, validate=True)
    except binascii.Error:
        decoded = None  # not base64 any more: must not be reported either
    assume(decoded != base64.b64decode(body))  # (a change in ignored trailing bits is none)
    text = lines[0] + b"\n" + changed + b"\n" + lines[-2]
    assert scan(plant(text, 50, size=4096), "pem-key") == []


def test_pem_truncated_not_reported(key) -> None:
    pem = key("rsa1024").private_bytes(PEM, TRAD, NOENC)
    for cut in (5, 30, 100, len(pem) // 2):
        assert scan(plant(pem[:-cut], 10, size=4096), "pem-key") == []


# --- OpenSSH, binary openssh-key-v1, PuTTY ---------------------------------------------------


def openssh_pem(kind: str, passphrase: str, tmp_path) -> bytes:
    if shutil.which("ssh-keygen") is None:
        pytest.skip("ssh-keygen not installed (Debian: openssh-client)")
    path = tmp_path / kind
    bits = ["-b", "2048"] if kind == "rsa" else []
    subprocess.run(["ssh-keygen", "-q", "-t", kind, *bits, "-N", passphrase, "-C", "t@h",
                    "-f", str(path)], check=True)
    return path.read_bytes()


@pytest.mark.parametrize("kind", ["rsa", "ecdsa", "ed25519"])
@pytest.mark.parametrize("passphrase", ["", "sesame"])
def test_ssh_keygen_keys_every_form(kind: str, passphrase: str, tmp_path) -> None:
    pem = openssh_pem(kind, passphrase, tmp_path).rstrip(b"\n")
    assert pem.startswith(b"-----BEGIN OPENSSH PRIVATE KEY-----")
    binary = base64.b64decode(b"".join(pem.split(b"\n")[1:-1]))
    for blob, enc in ((pem, "ascii"), (encode(pem, "utf-16le"), "utf-16le"), (binary, "binary")):
        for where in (3, 2048):
            found = scan(plant(blob, where), "ssh-key")
            assert [(s, n) for s, n, _, _ in found] == [(where, len(blob))], enc
            details = found[0][3]
            assert details["encrypted"] is bool(passphrase)
            assert details["key_type"].startswith({"rsa": "ssh-rsa", "ecdsa": "ecdsa-sha2",
                                                   "ed25519": "ssh-ed25519"}[kind])
    if not passphrase:
        # a changed byte in the check words or in the key numbers is caught (the comment
        # and padding at the end are no key material)
        w = Wire(binary)
        w.pos = len(OPENSSH_MAGIC)
        for _ in range(3):  # cipher, kdf, kdf options
            w.string()
        for _ in range(w.u32()):  # public keys
            w.string()
        size = w.u32()
        start = w.pos
        spots = list(range(start, start + 8)) + list(range(start + 40, start + size - 40, 7))
        for i in spots:
            bad = bytearray(binary)
            bad[i] ^= 0x40
            assert scan(plant(bytes(bad), 64), "ssh-key") == [], i - start


def test_openssh_from_cryptography_is_found(key) -> None:
    pem = key("ed25519").private_bytes(PEM, OPENSSH, NOENC).rstrip(b"\n")
    found = scan(plant(pem, 99), "ssh-key")
    assert [(s, n, d["key_type"]) for s, n, _, d in found] == [(99, len(pem), "ssh-ed25519")]


def _wire(*parts: bytes | int) -> bytes:
    """SSH wire encoding of strings (bytes) and mpints (ints)."""
    out = b""
    for p in parts:
        if isinstance(p, int):
            p = p.to_bytes(p.bit_length() // 8 + 1, "big")
        out += struct.pack(">I", len(p)) + p
    return out


def ppk(key, version: int, kind: str, encryption: str = "none") -> bytes:
    """A PuTTY key file as PuTTY writes it (public blob from cryptography's OpenSSH public key;
    private blob per the PPK format: RSA d, p, q, iqmp / ECDSA d / Ed25519 seed). The MAC is
    not checked by the detector and is random here."""
    k = key(kind)
    pub_line = k.public_key().public_bytes(ser.Encoding.OpenSSH, ser.PublicFormat.OpenSSH)
    algo, pub_b64 = pub_line.split(b" ")[:2]
    if kind.startswith("rsa"):
        n = k.private_numbers()
        priv = _wire(n.d, n.p, n.q, n.iqmp)
    elif kind == "ed25519":
        priv = _wire(k.private_bytes(ser.Encoding.Raw, ser.PrivateFormat.Raw, NOENC))
    else:
        priv = _wire(k.private_numbers().private_value)
    if encryption != "none":
        priv = bytes(np.random.default_rng(1).integers(0, 256, 16 * 20, dtype=np.uint8))
    priv_b64 = base64.b64encode(priv)

    def lines(b: bytes) -> list[bytes]:
        return [b[i : i + 64] for i in range(0, len(b), 64)]

    out = [b"PuTTY-User-Key-File-%d: %s" % (version, algo), b"Encryption: " + encryption.encode(),
           b"Comment: test key", b"Public-Lines: %d" % len(lines(pub_b64)), *lines(pub_b64)]
    if version == 3 and encryption != "none":
        out += [b"Key-Derivation: Argon2id", b"Argon2-Memory: 8192", b"Argon2-Passes: 13",
                b"Argon2-Parallelism: 1", b"Argon2-Salt: 0011223344556677"]
    out += [b"Private-Lines: %d" % len(lines(priv_b64)), *lines(priv_b64),
            b"Private-MAC: " + b"ab" * (32 if version == 3 else 20)]
    return b"\r\n".join(out) if version == 2 else b"\n".join(out)


@pytest.mark.parametrize("version", [2, 3])
@pytest.mark.parametrize("kind", ["rsa2048", "prime256v1", "ed25519"])
@pytest.mark.parametrize("encoding", ["ascii", "utf-16le"])
def test_putty_ppk(key, version: int, kind: str, encoding: str) -> None:
    for encryption in ("none", "aes256-cbc"):
        blob = encode(ppk(key, version, kind, encryption), encoding)
        found = scan(plant(blob, 501), "ssh-key")
        assert [(s, n) for s, n, _, _ in found] == [(501, len(blob))]
        details = found[0][3]
        assert details["format"] == f"ppk-v{version}"
        assert details["encrypted"] is (encryption != "none")


@pytest.mark.parametrize(("kind", "other_kind"), [("rsa2048", "rsa1024"),
                                                  ("prime256v1", "secp384r1")])
def test_putty_ppk_wrong_private_part_not_reported(kind: str, other_kind: str, key) -> None:
    good = ppk(key, 2, kind).split(b"\r\n")
    other = ppk(key, 2, other_kind).split(b"\r\n")
    # one key's public lines with another's private lines: the key math fails
    n_pub = int(good[3].split(b": ")[1])
    mixed = good[: 4 + n_pub] + other[4 + int(other[3].split(b": ")[1]) :]
    assert scan(plant(b"\r\n".join(mixed), 10), "ssh-key") == []


# --- through the engine -----------------------------------------------------------------------


@settings(max_examples=15)
@given(where=st.integers(0, 40000), chunk=st.sampled_from([4096, 5000, 65536]),
       form=st.sampled_from(["der", "pem", "pem16", "ppk", "openssh-bin"]),
       shuffle=st.integers(0, 2**32 - 1))
def test_engine_any_offset_any_chunking(where: int, chunk: int, form: str, shuffle: int,
                                        engine_scan, key) -> None:
    """Found once at its GPA, in one extent or with the pages stored out of order (so the
    key straddles page seams the engine stitches)."""
    blob, name = {
        "der": (key("rsa2048").private_bytes(DER, PKCS8, NOENC), "rsa-key"),
        "pem": (key("prime256v1").private_bytes(PEM, TRAD, NOENC).rstrip(b"\n"), "pem-key"),
        "pem16": (encode(key("rsa1024").private_bytes(PEM, PKCS8, ENC).rstrip(b"\n"),
                         "utf-16le"), "pem-key"),
        "ppk": (ppk(key, 3, "ed25519"), "ssh-key"),
        "openssh-bin": (base64.b64decode(b"".join(
            key("ed25519").private_bytes(PEM, OPENSSH, NOENC).split(b"\n")[1:-2])), "ssh-key"),
    }[form]
    buf = plant(blob, where, size=48 * 1024, seed=where)
    order = list(range(12))
    np.random.default_rng(shuffle).shuffle(order)
    at, length = expected_span("rsa2048", blob, where, key) if form == "der" else (where, len(blob))
    for layout in (None, order):
        found = engine_scan(bytes(buf), chunk, layout, "keys")
        assert [(f.detector, f.gpa, f.length) for f in found] == [(name, at, length)]
        assert found[0].fingerprint.startswith("hmac-sha256:")


def test_pkcs8_v2_ed25519_public_key_checked() -> None:
    """RFC 8410 OneAsymmetricKey v2 (version 1, [1] public key): the public key is derived
    from the seed and compared; a changed seed byte is not reported."""
    k = ed25519.Ed25519PrivateKey.generate()
    seed = k.private_bytes(ser.Encoding.Raw, ser.PrivateFormat.Raw, NOENC)
    public = k.public_key().public_bytes(ser.Encoding.Raw, ser.PublicFormat.Raw)
    body = (b"\x02\x01\x01" + b"\x30\x05\x06\x03\x2b\x65\x70" + b"\x04\x22\x04\x20" + seed
            + b"\x81\x21\x00" + public)
    blob = b"\x30" + bytes([len(body)]) + body
    found = scan(plant(blob, 40), "ec-key")
    assert [(s, n, d["public_key_verified"]) for s, n, _, d in found] == [(40, len(blob), True)]
    bad = bytearray(blob)
    bad[20] ^= 1  # inside the seed
    assert scan(plant(bytes(bad), 40), "ec-key") == []


@settings(max_examples=60)
@given(data=st.data(), form=st.sampled_from(["der1", "der8", "sec1", "pem", "dsa", "ppk", "ssh"]))
def test_damaged_input_never_raises(data, form: str, key) -> None:
    """Flipped, cut and random bytes: parsers answer 'not a key', never another exception."""
    from patterns import der as dermod
    from patterns import pem as pemmod

    blob = {
        "der1": lambda: key("rsa1024").private_bytes(DER, TRAD, NOENC),
        "der8": lambda: key("rsa1024").private_bytes(DER, PKCS8, NOENC),
        "sec1": lambda: key("secp384r1").private_bytes(DER, TRAD, NOENC),
        "pem": lambda: key("prime256v1").private_bytes(PEM, PKCS8, NOENC),
        "dsa": lambda: key("dsa").private_bytes(PEM, TRAD, NOENC),
        "ppk": lambda: ppk(key, 3, "rsa1024"),
        "ssh": lambda: key("ed25519").private_bytes(PEM, OPENSSH, NOENC),
    }[form]()
    buf = bytearray(blob)
    for _ in range(data.draw(st.integers(0, 4))):
        i = data.draw(st.integers(0, len(buf) - 1))
        buf[i] = data.draw(st.integers(0, 255))
    buf = buf[: data.draw(st.integers(0, len(buf)))] + data.draw(st.binary(max_size=64))
    raw = bytes(buf)
    try:
        dermod.parse_private_key(raw)
    except dermod.DerError:
        pass
    pemmod.parse_pem(raw)
    pemmod.parse_ppk(raw)
    try:
        pemmod.parse_openssh_v1(raw)
    except pemmod.SshError:
        pass
    for det in DETECTORS.values():
        hits = det.find(Chunk(np.frombuffer(raw, np.uint8)))
        for s, n, e in zip(hits.start.tolist(), hits.length.tolist(), hits.encoding.tolist(),
                           strict=True):
            det.describe(Hit(raw[s : s + n], ("ascii", "utf-16le", "binary")[e], b"", b""))


def test_unverifiable_scalar_must_look_random() -> None:
    """An X25519 PKCS#8 header followed by bytecode-like bytes (a .pyc holding the header as a
    constant) is not a key; the same header around random bytes is reported."""
    header = bytes.fromhex("302e020100300506032b656e04220420")
    rng = np.random.default_rng(5)
    pyc_like = bytes.fromhex("e9300000007202000000e91000000029") * 2
    keyish = rng.integers(0, 256, 32, dtype=np.uint8).tobytes()
    det = EcKeyDetector()
    for body, expected in ((pyc_like, 0), (keyish, 1)):
        buf = np.frombuffer(b"\x00" * 64 + header + body + b"\x00" * 64, np.uint8)
        hits = det.find(Chunk(buf))
        described = [
            det.describe(Hit(buf[s : s + n].tobytes(), "binary", b"", b""))
            for s, n in zip(hits.start.tolist(), hits.length.tolist(), strict=True)
        ]
        assert len([d for d in described if d is not None]) == expected
