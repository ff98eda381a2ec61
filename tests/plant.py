"""Test helpers: generate valid and invalid secrets, and build images with them planted."""

from __future__ import annotations

import random
import struct

import numpy as np

from parsers.base import Extents, MemoryImage, Segment
from patterns.pan import IIN_TABLE

PAGE = 4096
LIME_MAGIC = 0x4C694D45


def luhn_digit(body: str) -> str:
    """The check digit that makes ``body + digit`` Luhn-valid."""
    total = 0
    for i, ch in enumerate(reversed(body)):
        v = int(ch)
        if i % 2 == 0:
            v = v * 2 - 9 if v > 4 else v * 2
        total += v
    return str((10 - total % 10) % 10)


def make_pan(rng: random.Random, row: int | None = None, length: int | None = None) -> str:
    """A Luhn-valid PAN from IIN table row ``row`` (random if None) at a valid length."""
    brand, lo, hi, plen, lengths = IIN_TABLE[rng.randrange(len(IIN_TABLE)) if row is None else row]
    n = length or rng.choice(lengths)
    prefix = str(rng.randint(lo, hi)).zfill(plen)
    body = prefix + "".join(rng.choice("0123456789") for _ in range(n - 1 - len(prefix)))
    return body + luhn_digit(body)


def first_brand(pan: str) -> str | None:
    """The brand of the first IIN table row that issues ``pan`` (the table's rule, in Python)."""
    for brand, lo, hi, digits, lengths in IIN_TABLE:
        if len(pan) in lengths and lo <= int(pan[:digits]) <= hi:
            return brand
    return None


def group(pan: str, sep: str) -> str:
    """The PAN in a grouping the detector accepts (4-4-4-4..., or 4-6-5 / 4-6-4)."""
    if len(pan) in (14, 15) and sep:
        parts = [pan[:4], pan[4:10], pan[10:]]
    else:
        parts = [pan[i : i + 4] for i in range(0, len(pan), 4)]
    return sep.join(parts)


def make_ssn(rng: random.Random) -> str:
    while True:
        area = rng.randint(1, 899)
        if area == 666:
            continue
        s = f"{area:03d}{rng.randint(1, 99):02d}{rng.randint(1, 9999):04d}"
        if s not in ("078051120", "219099999", "457555462", "123456789"):
            return s


def encode(text: str, encoding: str) -> bytes:
    return text.encode("utf-16-le" if encoding == "utf-16le" else "ascii")


def lime(memory: bytes, order: list[int]) -> bytes:
    """A LiME file holding ``memory`` page by page, pages stored in ``order``."""
    out = bytearray()
    for pg in order:
        start = pg * PAGE
        out += struct.pack("<IIQQ8x", LIME_MAGIC, 1, start, start + PAGE - 1)
        out += memory[start : start + PAGE]
    return bytes(out)


# Values the command-line tests plant: a published test Visa number and an SSN the SSA rules
# accept that is not a well-known placeholder (docs/detectors.md).
PAN = "4556737586899855"
SSN = "536-90-7890"


def raw_with(path, plants: dict[int, str], pages: int = 8) -> None:
    """Write a raw image of ``pages`` zero pages with each text of ``plants`` (offset -> text)
    at its offset, a space on either side."""
    mem = bytearray(pages * PAGE)
    for off, text in plants.items():
        mem[off : off + len(text) + 2] = f" {text} ".encode()
    path.write_bytes(bytes(mem))


def memory_image(memory: bytes, order: list[int] | None = None, junk: int = 0xA5) -> MemoryImage:
    """``memory`` as a MemoryImage from GPA 0: one extent, or (``order``) its 4 KiB pages
    stored in that order with 8 ``junk`` bytes after each, so GPA-adjacent pages are never
    buffer-adjacent (seams for the engine to stitch, as in a QEMU stream)."""
    data = np.frombuffer(bytes(memory), np.uint8)
    if order is None:
        seg = Segment(data, Extents.build([0], [0], [data.size]), "mem")
    else:
        stride = PAGE + 8
        buf = np.full(len(order) * stride, junk, np.uint8)
        for k, pg in enumerate(order):
            buf[k * stride : k * stride + PAGE] = data[pg * PAGE : (pg + 1) * PAGE]
        ext = Extents.build([k * stride for k in range(len(order))],
                            [pg * PAGE for pg in order], [PAGE] * len(order))
        seg = Segment(buf, ext, "mem")
    return MemoryImage(path="mem", format="test", files=["mem"], fixed_segments=[seg])


def family_secrets(rng: random.Random, rsa, aes_bytes: int = 16, end: str = "") -> list[bytes]:
    """One secret of each kind the detector families look for, text and binary: a binary EMV
    Track 2 Equivalent Data record, a grouped card number, a UTF-16LE SSN, a Track 2, an AWS
    key id, an AES key schedule (``aes_bytes``: 16 or 32 bytes of key), ``rsa`` (a
    cryptography RSA private key) as DER
    and PEM. ``end`` follows each text secret."""
    from cryptography.hazmat.primitives import serialization as ser

    from patterns.aes import expand_keys

    der = rsa.private_bytes(ser.Encoding.DER, ser.PrivateFormat.TraditionalOpenSSL,
                            ser.NoEncryption())
    pem = rsa.private_bytes(ser.Encoding.PEM, ser.PrivateFormat.PKCS8, ser.NoEncryption())
    aes = expand_keys(np.frombuffer(rng.randbytes(aes_bytes), np.uint8)[None, :])[0].tobytes()
    pan, ssn = make_pan(rng), make_ssn(rng)
    track2 = f"{pan}D2512101"  # EMV tag 57: PAN, separator, YYMM, service code, F pad
    track2 += "F" * (len(track2) % 2)
    return [
        bytes.fromhex(f"57{len(track2) // 2:02X}{track2}"),
        f" card {group(pan, ' ')}{end}".encode(),
        encode(f" SSN {ssn[:3]}-{ssn[3:5]}-{ssn[5:]}{end}", "utf-16le"),
        f" ;{pan}=2512101123400001?{end}".encode(),
        b" AKIA" + bytes(rng.choice(b"ABCDEFGHIJKLMNOPQRSTUVWXYZ234567") for _ in range(16)),
        aes, der, pem,
    ]


def mixed_pages(rng: random.Random, seed: int, npages: int, text: bytes,
                text_above: float) -> np.ndarray:
    """``npages`` pages, each random bytes (3 in 10), characters of ``text`` (a draw above
    ``text_above``) or zero."""
    gen = np.random.default_rng(seed)
    mem = np.zeros(npages * PAGE, np.uint8)
    chars = np.frombuffer(text, np.uint8)
    for p in range(npages):
        kind = rng.random()
        if kind > 0.7:
            mem[p * PAGE : (p + 1) * PAGE] = gen.integers(0, 256, PAGE, dtype=np.uint8)
        elif kind > text_above:
            mem[p * PAGE : (p + 1) * PAGE] = gen.choice(chars, PAGE)
    return mem
