"""Well-known public keys (issue 11 part 4): the Linux kernel's crypto self-test keys and
libgcrypt's self-test keys, as samples/gen_known_keys.py took them from Debian's packages
(samples/known_keys), are reported with ``details.known`` below the default threshold; any
other key is not; on a real Debian guest the kernel's two keys are the known ones."""

from __future__ import annotations

import json
import lzma
import re
import shutil
import warnings
from pathlib import Path

import numpy as np
import pytest

from patterns import der
from patterns.known_keys import KNOWN_CONFIDENCE, public_id
from patterns.known_keys_table import KNOWN_KEYS

ROOT = Path(__file__).resolve().parent.parent
KEYS = ROOT / "samples" / "known_keys"
LINUX = ROOT / "samples" / "linux"
DEFAULT_MIN_CONFIDENCE = 0.3  # scanner/cli.py's default --min-confidence


def planted(blob: bytes, where: int = 12345) -> bytes:
    rng = np.random.default_rng(where)
    mem = bytearray(rng.integers(0, 256, 8 * 4096, dtype=np.uint8).tobytes())
    mem[where : where + len(blob)] = blob
    return bytes(mem)


def sexp_numbers(path: Path) -> dict[str, int]:
    """The named numbers of a libgcrypt S-expression: (name #hex#)."""
    text = path.read_bytes()
    return {n.decode(): int(re.sub(rb"\s", b"", h), 16)
            for n, h in re.findall(rb"\((\w+)\s+#([0-9a-fA-F\s]+)#", text)}


@pytest.mark.parametrize("name", ["linux-testmgr-rsa_tv_template-2.der",
                                  "linux-testmgr-pkcs1pad_rsa_tv_template-0.der"])
def test_kernel_self_test_key_is_known(name, engine_scan):
    blob = (KEYS / name).read_bytes()
    (f,) = engine_scan(planted(blob), 4096, list(range(8))[::-1], "rsa-key")
    assert f.gpa == 12345 and f.length == len(blob)
    assert f.details["known"].startswith("Linux crypto self-test RSA-2048")
    assert f.details["confidence"] == KNOWN_CONFIDENCE < DEFAULT_MIN_CONFIDENCE


def test_a_fresh_key_is_not_known(key, engine_scan):
    from cryptography.hazmat.primitives import serialization as ser

    der = key("rsa2048").private_bytes(ser.Encoding.DER, ser.PrivateFormat.TraditionalOpenSSL,
                                       ser.NoEncryption())
    (f,) = engine_scan(planted(der), 65536, None, "rsa-key")
    assert "known" not in f.details and f.details["confidence"] == 1.0


def test_libgcrypt_self_test_keys_are_known(key, engine_scan):
    """libgcrypt holds its keys as S-expressions; whatever container a program turns them into
    (here DER and PEM), the public part identifies them."""
    from cryptography.hazmat.primitives import serialization as ser
    from cryptography.hazmat.primitives.asymmetric import dsa, ec, rsa

    key("rsa1024")  # cryptography is there (the fixture skips otherwise)
    r = sexp_numbers(KEYS / "libgcrypt-rsa-2048.sexp")
    p, q, d = r["p"], r["q"], r["d"]
    rsa_key = rsa.RSAPrivateNumbers(p, q, d, d % (p - 1), d % (q - 1), pow(q, -1, p),
                                    rsa.RSAPublicNumbers(r["e"], r["n"])).private_key()
    e = sexp_numbers(KEYS / "libgcrypt-ecc-secp256r1.sexp")
    ec_key = ec.derive_private_key(e["d"], ec.SECP256R1())
    s = sexp_numbers(KEYS / "libgcrypt-dsa-2048.sexp")
    with warnings.catch_warnings():  # cryptography deprecates DSA; libgcrypt still has one
        warnings.simplefilter("ignore")
        dsa_key = dsa.DSAPrivateNumbers(s["x"], dsa.DSAPublicNumbers(
            s["y"], dsa.DSAParameterNumbers(s["p"], s["q"], s["g"]))).private_key()
    trad, none = ser.PrivateFormat.TraditionalOpenSSL, ser.NoEncryption()
    cases = [
        ("rsa-key", rsa_key.private_bytes(ser.Encoding.DER, trad, none), "RSA-2048"),
        ("ec-key", ec_key.private_bytes(ser.Encoding.DER, trad, none), "ECC secp256r1"),
        ("pem-key", dsa_key.private_bytes(ser.Encoding.PEM, trad, none), "DSA-2048"),
    ]
    for detector, blob, what in cases:
        (f,) = engine_scan(planted(blob), 65536, None, detector)
        assert f.details["known"] == f"libgcrypt self-test {what} key", detector
        assert f.details["confidence"] < DEFAULT_MIN_CONFIDENCE


@pytest.mark.parametrize(("algo", "label"), [("rsa-2048", "RSA-2048"),
                                           ("ec-prime256v1", "EC-prime256v1"),
                                           ("dsa-2048", "DSA-2048")])
def test_gnutls_self_test_keys_are_known(algo, label, engine_scan):
    """GnuTLS keeps its self-test keys as PEM blocks in its read-only data (found there by
    scanning Debian's libgnutls30 with vmleak)."""
    blob = (KEYS / f"libgnutls30-{algo}.pem").read_bytes()
    (f,) = engine_scan(planted(blob), 65536, list(range(8)), "pem-key")
    assert f.details["known"] == f"libgnutls30 self-test {label} key"
    assert f.details["confidence"] < DEFAULT_MIN_CONFIDENCE


def test_table_entries_name_their_source():
    assert len(KNOWN_KEYS) >= 11
    for pid, (kind, bits, name, source, _seen) in KNOWN_KEYS.items():
        assert re.fullmatch(r"[0-9a-f]{64}", pid) and kind in ("rsa", "ec", "dsa") and bits
        assert name and (".deb" in source)
    # the kernel's keys in Debian 12's kernels were confirmed there by vmleak's own detector
    seen = [name for _k, _b, name, _s, seen in KNOWN_KEYS.values() if seen]
    assert sorted(seen) == ["Linux crypto self-test RSA-2048 (pkcs1pad_rsa_tv_template[0])",
                            "Linux crypto self-test RSA-2048 (rsa_tv_template[2])"]
    # each test vector file is in the table
    for path in KEYS.glob("linux-testmgr-*.der"):
        blob = path.read_bytes()
        items = der._seq(blob)
        n = int.from_bytes(blob[items[1][1] : items[1][2]], "big")
        assert public_id("rsa", n.to_bytes((n.bit_length() + 7) // 8, "big")) in KNOWN_KEYS


def test_real_debian_guest_kernel_keys_are_known(tmp_path, scan):
    """A real Debian 12 guest (samples/linux): besides the key the guest's program planted,
    its memory holds two verified RSA keys — the kernel's crypto self-test keys — which are
    reported as known, below the default threshold."""
    manifest = json.loads((LINUX / "manifest.json").read_text())
    name = next(iter(manifest["fixtures"]))
    save = tmp_path / name.removesuffix(".xz")
    with lzma.open(LINUX / name) as fin, open(save, "wb") as fout:
        shutil.copyfileobj(fin, fout, 1 << 20)
    found = scan(str(save), "keys")
    known = sorted(f.details["known"] for f in found if "known" in f.details)
    assert known == ["Linux crypto self-test RSA-2048 (pkcs1pad_rsa_tv_template[0])",
                     "Linux crypto self-test RSA-2048 (rsa_tv_template[2])"]
    alerting = [f for f in found if f.details["confidence"] >= DEFAULT_MIN_CONFIDENCE]
    assert [(f.detector, f.details.get("label")) for f in alerting] == [
        ("pem-key", manifest["key_pem_first_line"].strip("-").removeprefix("BEGIN "))]


def _sample_public_ids() -> dict[str, str]:
    """Public id of each key in samples/known_keys, read from the file itself: DER and PEM
    through vmleak's parser (no verification: testmgr.h's small vectors need not verify),
    libgcrypt's S-expressions by their public number."""
    from patterns import pem

    ids = {}
    for path in sorted(KEYS.iterdir()):
        blob = path.read_bytes()
        if path.suffix == ".sexp":
            nums = sexp_numbers(path)
            kind, num = {"rsa": ("rsa", "n"), "dsa": ("dsa", "y"), "ecc": ("ec", "q")}[
                path.stem.split("-")[1]]
            ids[path.name] = public_id(kind, nums[num].to_bytes(
                (nums[num].bit_length() + 7) // 8, "big"))
            continue
        m = pem.PEM_RE.match(blob)
        info = der.parse_private_key(pem._b64(m.group(3)) if m else blob)
        public = b"\x04" + info.public if info.kind == "ec" else info.public
        ids[path.name] = public_id(info.kind, public)
    return ids


def test_table_and_sample_keys_agree():
    """The table holds exactly the keys samples/known_keys holds (both written by one run of
    samples/gen_known_keys.py), so a key's file and its table entry cannot drift apart."""
    ids = _sample_public_ids()
    assert len(ids) == len(set(ids.values())) == 11
    assert set(ids.values()) == set(KNOWN_KEYS)


def test_known_key_hidden_by_default_shown_with_min_confidence_0(tmp_path, vmleak):
    """From the command line: a kernel self-test key planted in a raw image alerts on nothing
    (exit 0, no line) by default, and is listed with details.known at --min-confidence 0."""
    blob = (KEYS / "linux-testmgr-rsa_tv_template-2.der").read_bytes()
    img = tmp_path / "guest.raw"
    img.write_bytes(planted(blob))
    r = vmleak("scan", "--format", "jsonl", "--detectors", "keys", str(img))
    assert (r.returncode, r.stdout) == (0, ""), r.stderr
    r = vmleak("scan", "--format", "jsonl", "--detectors", "keys", "--min-confidence", "0",
               str(img))
    (f,) = [json.loads(line) for line in r.stdout.splitlines()]
    assert (f["detector"], f["gpa"], f["length"]) == ("rsa-key", 12345, len(blob))
    assert f["details"]["known"] == "Linux crypto self-test RSA-2048 (rsa_tv_template[2])"
    assert f["details"]["confidence"] == KNOWN_CONFIDENCE
