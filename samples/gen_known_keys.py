"""Build ``patterns/known_keys_table.py``: the well-known public keys a memory image holds
without anything having leaked (issue 11 part 4), by a hash of each public key, with its
source. Run from the repository root::

    apt-get download linux-source-6.1 linux-image-6.1.0-57-amd64 \\
        linux-image-6.1.0-57-cloud-amd64 libgcrypt20 libgnutls30
    python samples/gen_known_keys.py --linux-source linux-source-6.1_*_all.deb \\
        --kernel linux-image-6.1.0-57-amd64_*.deb linux-image-6.1.0-57-cloud-amd64_*.deb \\
        --library libgcrypt20_*.deb libgnutls30_*.deb

With the package versions the table names (``apt-get download PKG=VERSION``) it rewrites
``patterns/known_keys_table.py`` and ``samples/known_keys/`` byte for byte (``git diff`` empty);
``tests/test_known_keys.py`` checks offline that the table holds exactly the sample files' keys.

Sources, all read from the real Debian 12 packages:

- the Linux kernel's crypto self-test vectors, ``crypto/testmgr.h`` (from ``linux-source``):
  every RSA key of ``rsa_tv_template`` and ``pkcs1pad_rsa_tv_template`` (private keys as DER
  RSAPrivateKey, one public-only vector), noting which are left out of kernels built with
  ``CONFIG_CRYPTO_FIPS`` (``#ifndef CONFIG_CRYPTO_FIPS``);
- Debian kernel images (``linux-image-*.deb``): ``vmlinuz`` is decompressed and scanned with
  vmleak's own ``rsa-key`` and ``ec-key`` detectors, to record which of those keys the
  kernel really carries (and to catch any other private key in it);
- libraries mapped into every process that links them (``--library``): libgcrypt's
  self-test keys are ``(private-key ...)`` S-expressions in its read-only data (the RSA
  modulus, ECC public point or DSA public value of each is taken); any other private key in
  a library's shared objects is found by scanning them with vmleak's detectors (GnuTLS keeps
  its self-test keys as PEM blocks).

A key is identified by ``patterns.known_keys.public_id``: SHA-256 of the RSA modulus (unsigned
big-endian, no leading zeros), of the uncompressed EC point (04 || X || Y) or of the DSA/
ElGamal public value y.
"""

from __future__ import annotations

import argparse
import io
import lzma
import re
import sys
import tarfile
import textwrap
import zlib
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from patterns import der, pem  # noqa: E402
from patterns.base import Chunk  # noqa: E402
from patterns.known_keys import public_id  # noqa: E402

OUT = ROOT / "patterns" / "known_keys_table.py"
#: the keys themselves, for the tests (kernel test vectors and library self-test keys, public)
SAMPLES = ROOT / "samples" / "known_keys"
TEMPLATES = ("rsa_tv_template", "pkcs1pad_rsa_tv_template")


@dataclass
class Known:
    """One well-known key: kind (rsa, ec, dsa), size in bits, name, source, where seen."""

    kind: str
    bits: int
    name: str
    source: str
    seen: list[str] = field(default_factory=list)


# --- Debian packages ---------------------------------------------------------------------------


def deb_members(path: Path, wanted: re.Pattern[str]) -> dict[str, bytes]:
    """Files of a .deb's data archive whose names match ``wanted`` (a .deb is an ar archive
    holding data.tar.{xz,zst,gz})."""
    blob = path.read_bytes()
    if not blob.startswith(b"!<arch>\n"):
        raise SystemExit(f"{path}: not a .deb (ar) archive")
    pos, data = 8, None
    while pos + 60 <= len(blob):
        name = blob[pos : pos + 16].decode().strip().rstrip("/")
        size = int(blob[pos + 48 : pos + 58].decode().strip())
        body = blob[pos + 60 : pos + 60 + size]
        if name.startswith("data.tar"):
            data = _decompress_member(name, body)
        pos += 60 + size + (size & 1)
    if data is None:
        raise SystemExit(f"{path}: no data.tar member")
    out = {}
    with tarfile.open(fileobj=io.BytesIO(data)) as tar:
        for member in tar:
            if member.isfile() and wanted.search(member.name):
                f = tar.extractfile(member)
                assert f is not None
                out[member.name] = f.read()
    return out


def _decompress_member(name: str, body: bytes) -> bytes:
    if name.endswith(".xz"):
        return lzma.decompress(body)
    if name.endswith(".gz"):
        return zlib.decompress(body, 31)
    if name.endswith(".zst"):
        return _zstd(body)
    return body


def _zstd(body: bytes) -> bytes:
    try:
        from compression import zstd  # type: ignore[import-not-found]
    except ImportError:
        from backports import zstd  # type: ignore[import-not-found,no-redef]
    return zstd.decompress(body)


# --- crypto/testmgr.h --------------------------------------------------------------------------

_TEMPLATE = re.compile(r"static const struct akcipher_testvec (\w+)\[\] = \{(.*?)\n\};", re.S)
_STRING = re.compile(r'"((?:[^"\\]|\\.)*)"')


def c_bytes(literals: str) -> bytes:
    """The bytes of adjacent C string literals (\\xHH escapes, plain characters)."""
    out = bytearray()
    for m in _STRING.finditer(literals):
        s, i = m.group(1), 0
        while i < len(s):
            if s.startswith("\\x", i):
                j = i + 2
                while j < len(s) and j < i + 4 and s[j] in "0123456789abcdefABCDEF":
                    j += 1
                out.append(int(s[i + 2 : j], 16))
                i = j
            else:
                out.append(ord(s[i]))
                i += 1
    return bytes(out)


def testmgr_keys(text: str, label: str, blobs: dict[str, bytes]) -> dict[str, Known]:
    """Every RSA key of the RSA templates of ``testmgr.h``: {public id: Known}; the private
    keys' DER goes into ``blobs`` ({file name: bytes}) for the tests."""
    out: dict[str, Known] = {}
    for m in _TEMPLATE.finditer(text):
        if m.group(1) not in TEMPLATES:
            continue
        fips_out = False
        entries, current = [], ""
        for line in m.group(2).splitlines():
            stripped = line.strip()
            if stripped.startswith("#ifndef CONFIG_CRYPTO_FIPS"):
                fips_out = True
            elif stripped.startswith("#endif"):
                fips_out = False
            elif stripped.startswith("}, {"):
                entries.append(current)
                current = ""
                continue
            if ".key =" in stripped:
                current += f"/*FIPS:{'out' if fips_out else 'in'}*/"
            current += line + "\n"
        entries.append(current)
        for k, entry in enumerate(entries):
            key = re.search(r"\.key =(.*?),\s*\n\s*\.", entry, re.S)
            if key is None:
                continue
            blob = c_bytes(key.group(1))
            # the vectors' integers need not be minimally encoded (the kernel's parser does
            # not care): read them as plain unsigned numbers
            items = der._seq(blob)
            ints = [int.from_bytes(blob[s:e], "big") for _t, s, e in items]
            n = ints[1] if len(ints) >= 9 else ints[0]  # RSAPrivateKey / RSAPublicKey
            public = ".public_key_vec = true" in entry
            if not public:
                blobs[f"linux-testmgr-{m.group(1)}-{k}.der"] = blob
            fips = "in FIPS builds too" if "/*FIPS:in*/" in entry else "not in FIPS builds"
            name = f"Linux crypto self-test RSA-{n.bit_length()} ({m.group(1)}[{k}])"
            what = "public key" if public else "private key"
            source = f"{label} crypto/testmgr.h {m.group(1)}[{k}], {what}, {fips}"
            pid = public_id("rsa", n.to_bytes((n.bit_length() + 7) // 8, "big"))
            if pid in out:  # the same key in another vector: one entry, both sources
                out[pid].source += f"; also {m.group(1)}[{k}] ({what})"
            else:
                out[pid] = Known("rsa", n.bit_length(), name, source)
    return out


# --- kernel images -----------------------------------------------------------------------------

LZ4_LEGACY = b"\x02\x21\x4c\x18"  # the kernel's lz4 -l format: 8 MiB blocks
LZ4_BLOCK = 8 << 20


def _lz4_legacy(b: bytes) -> bytes:
    """An lz4 legacy stream (magic, then blocks: 32-bit size, LZ4 block of up to 8 MiB), as
    Debian's cloud kernels are compressed; needs cramjam (``pip install -e '.[codecs]'``).
    A block's output is read into 8 MiB (zeros after the last block's end do no harm)."""
    import cramjam

    out, pos = bytearray(), len(LZ4_LEGACY)
    while pos + 4 <= len(b):
        n = int.from_bytes(b[pos : pos + 4], "little")
        if n == 0 or n > LZ4_BLOCK or pos + 4 + n > len(b):
            break
        out += bytes(cramjam.lz4.decompress_block(b[pos + 4 : pos + 4 + n],
                                                  output_len=LZ4_BLOCK))
        pos += 4 + n
    return bytes(out)


_PAYLOADS = (
    (b"\xfd7zXZ\x00", lambda b: lzma.LZMADecompressor().decompress(b)),
    (b"\x28\xb5\x2f\xfd", lambda b: _zstd_prefix(b)),
    (b"\x1f\x8b\x08\x00", lambda b: zlib.decompressobj(31).decompress(b)),
    (LZ4_LEGACY, _lz4_legacy),
)


def _zstd_prefix(b: bytes) -> bytes:
    try:
        from compression import zstd  # type: ignore[import-not-found]
    except ImportError:
        from backports import zstd  # type: ignore[import-not-found,no-redef]
    return zstd.ZstdDecompressor().decompress(b)


def vmlinux(bzimage: bytes) -> bytes:
    """The kernel inside a bzImage: the compressed payload (xz, zstd, gzip, lz4) found by its
    magic and decompressed, as the kernel's own ``scripts/extract-vmlinux`` does."""
    for magic, unpack in _PAYLOADS:
        at = bzimage.find(magic)
        while at >= 0:
            try:
                out = unpack(bzimage[at:])
            except Exception:  # noqa: BLE001 - a false magic: try the next one
                out = b""
            if out.startswith(b"\x7fELF"):
                return out
            at = bzimage.find(magic, at + 1)
    raise SystemExit("no compressed ELF kernel found in the bzImage")


def private_keys(blob: bytes) -> list[tuple[str, bytes, str, bytes, int]]:
    """(kind, public bytes, where, the key as found, bits) of every unencrypted private key
    vmleak's rsa-key, ec-key and pem-key detectors report in ``blob``."""
    data = np.frombuffer(blob, np.uint8)
    chunk = Chunk(data)
    out = []
    for det in (der.RsaKeyDetector(), der.EcKeyDetector(), pem.PemKeyDetector()):
        hits = det.find(chunk)
        for s, n in zip(hits.start.tolist(), hits.length.tolist(), strict=True):
            raw = blob[s : s + n]
            m = pem.PEM_RE.match(raw)
            try:
                info = der.parse_private_key(pem._b64(m.group(3)) if m else raw)
            except der.DerError:  # an encrypted PEM block: no public part to match
                continue
            if not info.public:  # an Ed25519 seed without its public key: nothing to match
                continue
            public = b"\x04" + info.public if info.kind == "ec" else info.public
            out.append((info.kind, public, f"{info.label} at offset {s:#x}", raw,
                        int(info.details["bits"])))
    return out


# --- libraries ---------------------------------------------------------------------------------

_SEXP = re.compile(rb"\(private-key\s*\((rsa|dsa|ecc|ecdsa|elg)\b[^\0]*")
_MPI = re.compile(rb"\((\w+)\s+#([0-9a-fA-F\s]+)#")
_CURVE = re.compile(rb'\(curve\s+"?([\w .-]+?)"?\s*\)')


def libgcrypt_keys(lib: bytes, label: str, blobs: dict[str, bytes]) -> dict[str, Known]:
    """The self-test keys of a libgcrypt shared object: its ``(private-key ...)``
    S-expression strings that hold numbers (``#hex#``; the others are format templates with
    ``%m`` placeholders), by their public part."""
    out: dict[str, Known] = {}
    total = lib.count(b"(private-key")
    for k, m in enumerate(_SEXP.finditer(lib), 1):
        algo = m.group(1).decode()
        mpis = {name.decode(): bytes.fromhex(re.sub(rb"\s", b"", h).decode())
                for name, h in _MPI.findall(m.group(0))}
        if not mpis:
            continue
        curve = _CURVE.search(m.group(0))
        if algo == "rsa":
            kind, public = "rsa", mpis["n"].lstrip(b"\0")
            bits = int.from_bytes(public, "big").bit_length()
            what = f"RSA-{bits}"
        elif algo in ("ecc", "ecdsa"):
            kind, public = "ec", mpis["q"]
            bits = 8 * (len(public) - 1) // 2 if public[:1] == b"\x04" else 8 * len(public)
            what = f"ECC {curve.group(1).decode() if curve else ''}".strip()
        else:
            kind, public = "dsa", mpis["y"].lstrip(b"\0")
            bits = 8 * len(mpis["p"].lstrip(b"\0"))
            what = f"{algo.upper()}-{bits}"
        blobs[f"libgcrypt-{what.lower().replace(' ', '-')}.sexp"] = m.group(0)
        out[public_id(kind, public)] = Known(
            kind, bits, f"libgcrypt self-test {what} key",
            f"{label}: (private-key ...) string {k} of {total} in its read-only data (the others "
            "are format templates)",
        )
    return out


# --- output ------------------------------------------------------------------------------------


def _literal(text: str, indent: str) -> str:
    """``text`` as adjacent string literals of lines that fit in 100 columns."""
    parts = textwrap.wrap(text, 88 - len(indent), drop_whitespace=False) or [""]
    return "\n".join(f"{indent}{part!r}" for part in parts)


def write_table(table: dict[str, Known], inputs: list[str]) -> None:
    lines = [
        '"""Well-known public keys: generated by samples/gen_known_keys.py (do not edit) from',
        *textwrap.wrap(", ".join(sorted(inputs)) + ".", 92),
        "",
        "public id (patterns.known_keys.public_id) -> (kind, bits, name, source, seen in)",
        '"""',
        "",
        "KNOWN_KEYS: dict[str, tuple[str, int, str, str, tuple[str, ...]]] = {",
    ]
    for pid, k in sorted(table.items(), key=lambda kv: (kv[1].name, kv[0])):
        lines += [f"    {pid!r}: (", f"        {k.kind!r},", f"        {k.bits},",
                  _literal(k.name, " " * 8) + ",", _literal(k.source, " " * 8) + ",",
                  "        (" + ("" if k.seen else ")")]
        for seen in k.seen:
            lines.append(_literal(seen, " " * 12) + ",")
        if k.seen:
            lines.append("        ),")
        else:
            lines[-1] += ","
        lines.append("    ),")
    lines.append("}")
    OUT.write_text("\n".join(lines) + "\n")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--linux-source", type=Path, required=True,
                    help="Debian linux-source-6.1 .deb (crypto/testmgr.h is read from it)")
    ap.add_argument("--kernel", type=Path, nargs="+", required=True,
                    help="Debian linux-image .deb files to confirm which keys a kernel holds")
    ap.add_argument("--library", type=Path, nargs="+", required=True,
                    help="Debian library .deb files (libgcrypt20, libgnutls30): their shared "
                         "objects' self-test keys")
    args = ap.parse_args(argv)

    src = deb_members(args.linux_source, re.compile(r"linux-source-[\d.]+\.tar\.xz$"))
    (tar_name, tar_blob), = src.items()
    with tarfile.open(fileobj=io.BytesIO(tar_blob), mode="r:xz") as tar:
        member = next(m for m in tar if m.name.endswith("/crypto/testmgr.h"))
        f = tar.extractfile(member)
        assert f is not None
        testmgr = f.read().decode()
    blobs: dict[str, bytes] = {}
    table = testmgr_keys(testmgr, args.linux_source.name, blobs)
    print(f"testmgr.h: {len(table)} RSA keys", file=sys.stderr)

    for deb in args.kernel:
        for name, bz in deb_members(deb, re.compile(r"boot/vmlinuz-")).items():
            label = f"{deb.name}:{name.lstrip('./')}"
            for kind, public, where, _raw, _bits in private_keys(vmlinux(bz)):
                pid = public_id(kind, public)
                if pid not in table:
                    table[pid] = Known(kind, 0, f"private key in {Path(name).name}",
                                       f"{label}: found by vmleak {kind}-key, not in testmgr.h")
                table[pid].seen.append(f"{label} ({where})")
                print(f"{label}: {where} -> {table[pid].name}", file=sys.stderr)

    for deb in args.library:
        for name, lib in deb_members(deb, re.compile(r"\.so[\d.]*$")).items():
            label = f"{deb.name}:{name.lstrip('./')}"
            keys = libgcrypt_keys(lib, label, blobs)
            package = deb.name.split("_")[0]
            for kind, public, where, raw, bits in private_keys(lib):
                what = where.split(" at ")[0]
                keys[public_id(kind, public)] = Known(
                    kind, bits, f"{package} self-test {what} key",
                    f"{label}: {where}, found by vmleak in the library's read-only data",
                )
                suffix = ".pem" if raw.startswith(b"-----") else ".der"
                blobs[f"{package}-{what.lower()}{suffix}"] = raw
            print(f"{label}: {len(keys)} keys", file=sys.stderr)
            table.update(keys)

    write_table(table, [args.linux_source.name, *(d.name for d in args.kernel),
                        *(d.name for d in args.library)])
    SAMPLES.mkdir(exist_ok=True)
    for name, blob in sorted(blobs.items()):
        (SAMPLES / name).write_bytes(blob)
    print(f"wrote {OUT} ({len(table)} keys) and {len(blobs)} keys into {SAMPLES}",
          file=sys.stderr)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
