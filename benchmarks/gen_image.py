"""Seeded generator of benchmark memory images with planted secrets and a truth file.

Two kinds of raw image (byte k of the file is guest-physical address k):

- ``M``, memory-like: zero pages, pages of real ELF binaries and shared objects, text (docs,
  licenses, man pages), locale and time-zone data, ``.pyc`` files, compressed files, random
  pages, UTF-16LE text and heap-like pages. The machine's files are read at generation time
  (sorted listings, seeded choice) and never stored in the repository.
- ``D``, dense-digit worst case: CSV rows of numbers, logs with timestamps and IDs, digit
  groups separated by spaces and dashes, long numbers and phone numbers.

Both get the same planted secrets: PANs (plain, grouped, in Track 1 / Track 2 data), SSNs,
AES key schedules (FIPS-197 and OpenSSL's byte-swapped word layout) and DER RSA private keys,
each inside plausible context, none overlapping another, none inside a longer digit run. The
truth file ``<image>.truth.jsonl`` lists exactly the planted items, one JSON object a line:
``kind``, ``offset`` (bytes, = GPA), ``length`` (bytes as stored), ``encoding``, ``value``
(digits for PAN/SSN, the track text for tracks, hex for keys) and kind-specific fields.

The same seed gives the same bytes and truth on the same machine. The image is written in
8 MiB blocks, so memory use does not grow with its size. Usage::

    python benchmarks/gen_image.py --kind M --size 1G --seed 1 -o m.img
"""

from __future__ import annotations

import argparse
import bisect
import functools
import gzip
import json
import lzma
import math
import os
import random
import struct
import sys
import time
import zlib
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

import numpy as np

PAGE = 4096
BLOCK = 8 << 20  # bytes written per step: bounded memory whatever the image size
CHUNK_EDGES = (1 << 20, 256 << 10, PAGE)  # boundaries some secrets straddle (bytes)
DIGITS = frozenset("0123456789")

# ---------------------------------------------------------------------------------------------
# Card brands as data: (name, IIN ranges as inclusive (low, high) prefixes, valid lengths,
# share of planted PANs). Lengths kept to the ones every brand table agrees on.
BRANDS: tuple[tuple[str, tuple[tuple[int, int], ...], tuple[int, ...], float], ...] = (
    ("visa", ((4, 4),), (13, 16, 19), 0.33),
    ("mastercard", ((51, 55), (2221, 2720)), (16,), 0.24),
    ("amex", ((34, 34), (37, 37)), (15,), 0.08),
    ("discover", ((6011, 6011), (644, 649), (65, 65)), (16, 19), 0.06),
    ("jcb", ((3528, 3589),), (16,), 0.05),
    ("diners", ((300, 305), (36, 36), (38, 39)), (14,), 0.04),
    ("unionpay", ((620, 621), (623, 629)), (16, 17, 18, 19), 0.06),
    ("maestro", ((5018, 5018), (5020, 5020), (5038, 5038), (5893, 5893), (6304, 6304),
                 (6759, 6759), (6761, 6763)), (13, 14, 15, 16, 17, 18, 19), 0.06),
    ("mir", ((2200, 2204),), (16,), 0.04),
    ("rupay", ((508500, 508999), (606985, 607984)), (16,), 0.04),
)
# Digit groupings used when a PAN is written with separators, by length.
GROUPINGS: dict[int, tuple[tuple[int, ...], ...]] = {
    14: ((4, 6, 4),),
    15: ((4, 6, 5),),
    16: ((4, 4, 4, 4),),
    19: ((4, 4, 4, 4, 3),),
}
# SSNs that pass the area/group/serial rules but are known invalid (advertising, Woolworth).
INVALID_SSNS = frozenset({"078051120", "219099999", "457555462", "123456789"})

# Context around planted text items: "{v}" is the secret, "{exp}" an expiry MM/YY. Every
# template starts and ends with a non-digit and never puts a digit or a separator-then-digit
# next to the secret, so no planted item lies inside a longer digit run.
PAN_KEYWORD = (
    "\nCard number: {v}  Exp: {exp}\n",
    "card_number={v}&exp={exp}&cvv=***\n",
    '{{"cardNumber":"{v}","expiry":"{exp}","holder":"J SMITH"}}',
    "<CreditCard><Number>{v}</Number><Expiry>{exp}</Expiry></CreditCard>",
    "Payment via VISA/MC, PAN: {v} exp {exp}\r\n",
    "cc_num: {v}\n",
    "credit card {v} (expires {exp})\n",
)
PAN_NEUTRAL = (
    "\nref={v};\n",
    '"data":"{v}",',
    "<td>{v}</td>",
    "| {v} | ok |\n",
    "value {v} stored\n",
    "\tfield7='{v}'\n",
)
TRACK_CONTEXT = (
    "\nTRACK:{v}\n",
    'swipe_data="{v}"\n',
    "<Track>{v}</Track>",
    "\x02{v}\x03",
    "pos reader: raw={v} len ok\n",
)
SSN_KEYWORD_BARE = (
    "\nSSN: {v}\n",
    "SSN#{v};",
    "Social Security Number: {v}\n",
    "ssn={v}&dob=**\n",
    "SS# {v} on file\n",
)
SSN_FORMATTED = (
    "\nSSN: {v}\n",
    '"ssn":"{v}",',
    "<SSN>{v}</SSN>",
    "employee {v} (tax id)\n",
    "| {v} | W-2 |\n",
    "social security {v}\n",
)
SURNAMES = ("SMITH", "GARCIA", "NGUYEN", "MULLER", "ROSSI", "KOWALSKI", "TANAKA", "OKAFOR")
GIVEN = ("JOHN", "MARIA", "WEI", "ANNA", "LUCA", "PIOTR", "YUKI", "ADA", "SAM")
SERVICE_CODES = ("101", "201", "121", "221", "120", "226", "502")


# ---------------------------------------------------------------------------------------------
# Small helpers: sizes, Luhn, AES key expansion, RSA from seeded primes.


def parse_size(text: str) -> int:
    """Bytes from ``'64M'``, ``'1G'``, ``'512K'``, ``'8MiB'`` or a plain integer."""
    t = text.strip().upper().removesuffix("IB").removesuffix("B")
    mult = {"K": 1 << 10, "M": 1 << 20, "G": 1 << 30, "T": 1 << 40}.get(t[-1:], 1)
    num = t[:-1] if mult > 1 else t
    try:
        return int(float(num) * mult)
    except ValueError:
        raise ValueError(f"not a size: {text!r} (use e.g. 64M, 1G, 4096)") from None


def luhn_ok(digits: str) -> bool:
    """True when ``digits`` passes the Luhn (mod 10) check."""
    total = 0
    for i, ch in enumerate(reversed(digits)):
        d = int(ch) * (2 if i % 2 else 1)
        total += d - 9 if d > 9 else d
    return total % 10 == 0


def luhn_complete(body: str) -> str:
    """``body`` with the Luhn check digit appended."""
    for check in "0123456789":
        if luhn_ok(body + check):
            return body + check
    raise AssertionError("unreachable: one check digit always fits")


def _aes_sbox() -> bytes:
    """The AES S-box, computed (multiplicative inverse in GF(2^8), then the affine map)."""
    def mul(a: int, b: int) -> int:
        r = 0
        while b:
            if b & 1:
                r ^= a
            a = ((a << 1) ^ 0x11B) if a & 0x80 else a << 1
            b >>= 1
        return r

    inv = [0] * 256
    for a in range(1, 256):
        for b in range(1, 256):
            if mul(a, b) == 1:
                inv[a] = b
                break
    box = bytearray(256)
    for a in range(256):
        x = inv[a]
        rot = x
        for _ in range(4):
            rot = ((rot << 1) | (rot >> 7)) & 0xFF
            x ^= rot
        box[a] = x ^ 0x63
    return bytes(box)


AES_SBOX = _aes_sbox()


def aes_expand(key: bytes) -> bytes:
    """FIPS-197 key expansion: the encryption schedule of a 16/24/32-byte key as bytes
    (176/208/240 bytes, words in standard byte order)."""
    nk = len(key) // 4
    if len(key) not in (16, 24, 32):
        raise ValueError("AES keys are 16, 24 or 32 bytes")
    total = 4 * (nk + 7)  # words: 4 * (rounds + 1), rounds = nk + 6
    w = [key[4 * i: 4 * i + 4] for i in range(nk)]
    rcon = 1
    for i in range(nk, total):
        t = w[i - 1]
        if i % nk == 0:
            t = bytes(AES_SBOX[b] for b in t[1:] + t[:1])
            t = bytes([t[0] ^ rcon]) + t[1:]
            rcon = ((rcon << 1) ^ 0x11B) if rcon & 0x80 else rcon << 1
        elif nk > 6 and i % nk == 4:
            t = bytes(AES_SBOX[b] for b in t)
        w.append(bytes(a ^ b for a, b in zip(w[i - nk], t, strict=True)))
    return b"".join(w)


def openssl_layout(schedule: bytes) -> bytes:
    """The schedule as OpenSSL's AES_KEY holds it on a little-endian machine: each 32-bit
    word was loaded big-endian (GETU32) and stored natively, i.e. its 4 bytes reversed."""
    return np.frombuffer(schedule, ">u4").astype("<u4").tobytes()


_SMALL_PRIMES = [p for p in range(3, 2000) if all(p % q for q in range(2, int(p**0.5) + 1))]
_SMALL_PRODUCT = math.prod(_SMALL_PRIMES)


def _probable_prime(n: int, rnd: random.Random, rounds: int = 6) -> bool:
    """Miller-Rabin with ``rounds`` seeded bases (ample for random candidates of >= 512
    bits, FIPS 186-4 table C.2)."""
    d, s = n - 1, 0
    while d % 2 == 0:
        d //= 2
        s += 1
    for _ in range(rounds):
        x = pow(rnd.randrange(2, n - 2), d, n)
        if x in (1, n - 1):
            continue
        for _ in range(s - 1):
            x = x * x % n
            if x == n - 1:
                break
        else:
            return False
    return True


def _seeded_prime(bits: int, rnd: random.Random) -> int:
    """A ``bits``-bit prime with its two top bits set (so p*q has exactly 2*bits bits)."""
    while True:
        c = rnd.getrandbits(bits) | (3 << (bits - 2)) | 1
        if math.gcd(c, _SMALL_PRODUCT) == 1 and _probable_prime(c, rnd):
            return c


@functools.lru_cache(maxsize=64)
def rsa_der(bits: int, seed: int, index: int) -> bytes:
    """A PKCS#1 DER RSA private key of ``bits`` bits, deterministic in (seed, index): the
    primes come from a seeded generator and ``cryptography`` builds and encodes the key
    (its own key generation cannot be seeded). Cached: primes cost ~0.2 s each."""
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric import rsa

    rnd = random.Random(f"rsa:{seed}:{index}:{bits}")
    e = 65537
    while True:
        p, q = _seeded_prime(bits // 2, rnd), _seeded_prime(bits // 2, rnd)
        phi = (p - 1) * (q - 1)
        if p != q and math.gcd(e, phi) == 1:
            break
    d = pow(e, -1, phi)
    numbers = rsa.RSAPrivateNumbers(
        p, q, d, rsa.rsa_crt_dmp1(d, p), rsa.rsa_crt_dmq1(d, q), rsa.rsa_crt_iqmp(p, q),
        rsa.RSAPublicNumbers(e, p * q),
    )
    return numbers.private_key().private_bytes(
        serialization.Encoding.DER,
        serialization.PrivateFormat.TraditionalOpenSSL,
        serialization.NoEncryption(),
    )


# ---------------------------------------------------------------------------------------------
# Planted items.


@dataclass
class Plant:
    """One planted secret inside its context record.

    ``record`` is the bytes written at ``start`` (file offset = GPA); the secret is
    ``record[secret_off : secret_off + secret_len]``. ``truth`` is its truth-file object
    (offset filled in once placed). ``straddle`` is a boundary size (bytes) the secret must
    cross, or 0; ``hosts`` the page kinds it may be placed in; ``align`` its start alignment.
    """

    record: bytes
    secret_off: int
    secret_len: int
    truth: dict[str, Any]
    straddle: int = 0
    hosts: str = "text"
    align: int = 1
    start: int = -1

    @property
    def end(self) -> int:
        return self.start + len(self.record)


def _check_isolated(text: str, i: int, j: int) -> None:
    """Fail loudly if a template would glue the secret text[i:j] to other digits."""
    for k, step in ((i - 1, -1), (j, 1)):
        if k < 0 or k >= len(text):
            raise ValueError(f"secret at the edge of its record: {text!r}")
        c = text[k]
        nxt = text[k + step] if 0 <= k + step < len(text) else ""
        if c in DIGITS or (c in " -" and nxt in DIGITS):
            raise ValueError(f"secret not isolated from digits in {text!r}")
    if text[0] in DIGITS or text[-1] in DIGITS:
        raise ValueError(f"record starts or ends with a digit: {text!r}")


def _text_plant(template: str, secret: str, encoding: str, truth: dict[str, Any],
                **fmt: str) -> Plant:
    """A text record from ``template`` with ``secret`` at ``{v}``, in ascii or utf-16le."""
    head, tail = template.split("{v}")
    head, tail = head.format(**fmt), tail.format(**fmt)
    text = head + secret + tail
    _check_isolated(text, len(head), len(head) + len(secret))
    codec = "utf-16-le" if encoding == "utf-16le" else "ascii"
    width = 2 if encoding == "utf-16le" else 1
    truth = {**truth, "encoding": encoding, "length": len(secret) * width}
    return Plant(text.encode(codec), len(head) * width, len(secret) * width, truth,
                 hosts="utf16" if encoding == "utf-16le" else "text")


def _draw_pan(r: random.Random, used: set[str]) -> tuple[str, str]:
    """A fresh Luhn-valid PAN (digits) of a random brand and valid length; returns
    (brand, digits). Well-known test numbers are avoided by drawing random bodies."""
    names = [b[0] for b in BRANDS]
    weights = [b[3] for b in BRANDS]
    while True:
        name = r.choices(names, weights)[0]
        _, ranges, lengths, _ = BRANDS[names.index(name)]
        lo, hi = r.choice(ranges)
        prefix = str(r.randint(lo, hi))
        length = r.choice(lengths)
        body = prefix + "".join(r.choice("0123456789") for _ in range(length - 1 - len(prefix)))
        pan = luhn_complete(body)
        if pan not in used and len(set(pan)) > 2:
            used.add(pan)
            return name, pan


def _grouped(pan: str, r: random.Random) -> tuple[str, str]:
    """``pan`` written with a consistent space or dash in its length's grouping."""
    sep = r.choice(" -")
    groups = r.choice(GROUPINGS[len(pan)])
    parts, k = [], 0
    for g in groups:
        parts.append(pan[k:k + g])
        k += g
    return sep.join(parts), sep


def _expiry(r: random.Random) -> tuple[str, str]:
    """An expiry as (``MM/YY``, ``YYMM``)."""
    yy, mm = r.randint(26, 31), r.randint(1, 12)
    return f"{mm:02d}/{yy:02d}", f"{yy:02d}{mm:02d}"


def _pan_plants(r: random.Random, n: int) -> list[Plant]:
    """``n`` planted PANs: ~6% in Track 1, ~6% in Track 2, of the rest ~1/3 grouped; 10% of
    all in UTF-16LE; ~40% of the plain ones near a card keyword."""
    used: set[str] = set()
    plants = []
    for _ in range(n):
        brand, pan = _draw_pan(r, used)
        enc = "utf-16le" if r.random() < 0.10 else "ascii"
        exp, yymm = _expiry(r)
        role = r.random()
        if role < 0.06:
            name = f"{r.choice(SURNAMES)}/{r.choice(GIVEN)}"
            disc = "".join(r.choice("0123456789") for _ in range(r.randint(8, 20)))
            track = f"%B{pan}^{name}^{yymm}{r.choice(SERVICE_CODES)}{disc}?"
            kind = "track1"
        elif role < 0.12:
            # ISO/IEC 7813: Track 2 holds at most 40 characters with its sentinels and LRC
            room = 39 - (len(pan) + 10)
            disc = "".join(r.choice("0123456789") for _ in range(r.randint(0, room)))
            track = f";{pan}={yymm}{r.choice(SERVICE_CODES)}{disc}?"
            kind = "track2"
        else:
            kind = "pan"
        if kind != "pan":
            width = 2 if enc == "utf-16le" else 1
            # where the PAN sits inside the track (bytes): after "%B" or ";"
            truth = {"kind": kind, "value": track, "pan": pan, "brand": brand,
                     "pan_delta": (2 if kind == "track1" else 1) * width,
                     "pan_length": len(pan) * width}
            plants.append(_text_plant(r.choice(TRACK_CONTEXT), track, enc, truth))
            continue
        text, sep = pan, ""
        if len(pan) in GROUPINGS and r.random() < 0.42:
            text, sep = _grouped(pan, r)
        keyword = r.random() < 0.4
        template = r.choice(PAN_KEYWORD if keyword else PAN_NEUTRAL)
        truth = {"kind": "pan", "value": pan, "brand": brand, "separator": sep,
                 "keyword": keyword}
        plants.append(_text_plant(template, text, enc, truth, exp=exp))
    return plants


def _draw_ssn(r: random.Random, used: set[str]) -> str:
    """Nine digits valid by the SSA rules: area 001-899 but not 666, group 01-99, serial
    0001-9999, not a known-invalid number."""
    while True:
        area = r.randint(1, 899)
        ssn = f"{area:03d}{r.randint(1, 99):02d}{r.randint(1, 9999):04d}"
        if area != 666 and ssn not in INVALID_SSNS and ssn not in used:
            used.add(ssn)
            return ssn


def _ssn_plants(r: random.Random, n: int) -> list[Plant]:
    """``n`` SSNs: ~45% ``ddd-dd-dddd``, ~25% ``ddd dd dddd``, ~30% bare after a keyword;
    10% in UTF-16LE."""
    used: set[str] = set()
    plants = []
    for _ in range(n):
        ssn = _draw_ssn(r, used)
        enc = "utf-16le" if r.random() < 0.10 else "ascii"
        style = r.random()
        if style < 0.30:
            text, template, fmt = ssn, r.choice(SSN_KEYWORD_BARE), "bare"
        else:
            sep = "-" if style < 0.75 else " "
            text = sep.join((ssn[:3], ssn[3:5], ssn[5:]))
            template, fmt = r.choice(SSN_FORMATTED), "dashed" if sep == "-" else "spaced"
        truth = {"kind": "ssn", "value": ssn, "format": fmt}
        plants.append(_text_plant(template, text, enc, truth))
    return plants


def _malloc_header(r: random.Random, payload: int) -> bytes:
    """A glibc-like 16-byte chunk header (prev_size, size | PREV_INUSE) for ``payload``."""
    size = (payload + 16 + 15) & ~15
    return struct.pack("<QQ", 0, size | 1) if r.random() < 0.8 else struct.pack(
        "<QQ", r.randrange(0x20, 0x400, 16), size)


def _aes_plants(r: random.Random, n: int) -> list[Plant]:
    """``n`` AES encryption schedules (128/192/256 bits), ~1/3 in OpenSSL's AES_KEY layout
    (byte-swapped words, 240-byte rd_key then ``int rounds``), the rest in FIPS byte order as
    in Linux's crypto_aes_ctx (key_enc, key_dec, key_length). Most start 16-byte aligned."""
    plants = []
    for i in range(n):
        bits = (128, 192, 256)[i % 3] if i % 5 else 128
        key = r.randbytes(bits // 8)
        sched = aes_expand(key)
        openssl = r.random() < 0.34
        stored = openssl_layout(sched) if openssl else sched
        rounds = bits // 32 + 6
        if openssl:
            body = stored + bytes(240 - len(stored)) + struct.pack("<i", rounds)
        else:
            body = stored + bytes(240 - len(stored)) + r.randbytes(240) + struct.pack(
                "<I", bits // 8)
        pad = r.choice((0, 0, 0, 4, 8, 1, 3))  # struct field offset inside the allocation
        head = _malloc_header(r, len(body) + pad) + r.randbytes(pad)
        truth = {"kind": "aes-key", "value": key.hex(), "bits": bits, "encoding": "binary",
                 "length": len(stored), "layout": "openssl-bswap" if openssl else "fips"}
        plants.append(Plant(head + body + bytes(8), len(head), len(stored), truth,
                            hosts="binary", align=16))
    return plants


def _rsa_plants(seed: int, r: random.Random, n: int) -> list[Plant]:
    """``n`` PKCS#1 DER RSA private keys (2048-bit, the second one 1024-bit)."""
    sizes = [2048] * n
    if n >= 2:
        sizes[1] = 1024
    plants = []
    for i, bits in enumerate(sizes):
        der = rsa_der(bits, seed, i)
        head = _malloc_header(r, len(der))
        truth = {"kind": "rsa-key", "value": der.hex(), "bits": bits, "encoding": "binary",
                 "length": len(der)}
        plants.append(Plant(head + der + bytes(16), len(head), len(der), truth,
                            hosts="binary", align=16))
    return plants


@dataclass
class Counts:
    """How many secrets to plant (defaults from the benchmark definition)."""

    pans: int = 1000
    ssns: int = 500
    aes: int = 58
    rsa: int = 7


def make_plants(seed: int, counts: Counts) -> list[Plant]:
    """All planted items for ``seed``, not yet placed; some are marked to straddle a 1 MiB,
    256 KiB or 4 KiB boundary (~13% of PANs and tracks, ~11% of SSNs, a few AES)."""
    r = random.Random(f"plants:{seed}")
    pans = _pan_plants(r, counts.pans)
    ssns = _ssn_plants(r, counts.ssns)
    aes = _aes_plants(r, counts.aes)
    for group, quotas in ((pans, (20, 30, 80)), (ssns, (5, 10, 40)), (aes, (0, 0, 4))):
        order = r.sample(range(len(group)), len(group))
        k = 0
        for edge, quota in zip(CHUNK_EDGES, quotas, strict=True):
            for idx in order[k:k + quota]:
                group[idx].straddle = edge
            k += quota
    rsa = _rsa_plants(seed, r, counts.rsa)
    return pans + ssns + aes + rsa


class _Occupied:
    """Sorted, non-overlapping [start, end) intervals of placed records (bytes)."""

    def __init__(self) -> None:
        self.starts: list[int] = []
        self.ends: list[int] = []

    def free(self, start: int, end: int, gap: int = 8) -> bool:
        i = bisect.bisect_left(self.starts, start)
        if i < len(self.starts) and self.starts[i] < end + gap:
            return False
        return not (i > 0 and self.ends[i - 1] + gap > start)

    def add(self, start: int, end: int) -> None:
        i = bisect.bisect_left(self.starts, start)
        self.starts.insert(i, start)
        self.ends.insert(i, end)


def place(plants: list[Plant], size: int, page_kinds: np.ndarray,
          host_pages: dict[str, tuple[int, ...]], rng: np.random.Generator) -> None:
    """Give every plant a ``start`` (bytes) inside an image of ``size`` bytes, without
    overlap: straddlers across a boundary of their class (each boundary used once; when the
    image has too few, the plant is placed freely and its truth says so), the others inside
    one page whose kind is in ``host_pages[plant.hosts]``."""
    occ = _Occupied()
    npages = size // PAGE
    spare: dict[int, list[int]] = {}
    for edge in CHUNK_EDGES:
        bounds = np.arange(edge, size, edge, dtype=np.int64)
        for bigger in CHUNK_EDGES:
            if bigger > edge:
                bounds = bounds[bounds % bigger != 0]
        spare[edge] = list(rng.permutation(bounds))
    candidates = {
        name: np.flatnonzero(np.isin(page_kinds, kinds)) for name, kinds in host_pages.items()
    }
    for p in sorted(plants, key=lambda p: -p.straddle):
        placed = False
        while p.straddle and spare[p.straddle] and not placed:
            edge = int(spare[p.straddle].pop())
            before = int(rng.integers(1, p.secret_len))  # secret bytes before the edge
            start = edge - before - p.secret_off
            start -= start % p.align
            if (start >= 0 and start + len(p.record) <= size
                    and start + p.secret_off < edge < start + p.secret_off + p.secret_len
                    and occ.free(start, start + len(p.record))):
                placed = True
        if not placed:
            p.straddle = 0
            pages = candidates[p.hosts]
            if pages.size == 0:
                pages = np.arange(npages)
            for _ in range(1000):
                page = int(pages[rng.integers(pages.size)])
                room = PAGE - len(p.record)
                off = int(rng.integers(0, room + 1)) if room >= 0 else 0
                start = page * PAGE + off - off % p.align
                if start + len(p.record) <= size and occ.free(start, start + len(p.record)):
                    placed = True
                    break
            if not placed:
                raise ValueError(
                    f"image of {size} bytes too small for {len(plants)} planted items")
        p.start = start
        occ.add(start, p.end)
        p.truth["offset"] = start + p.secret_off
        p.truth["straddles"] = p.straddle
        if "pan_delta" in p.truth:
            p.truth["pan_offset"] = p.truth["offset"] + p.truth.pop("pan_delta")


# ---------------------------------------------------------------------------------------------
# Background content: pools of real pages read from this machine, and generated pages.


def _walk(roots: tuple[str, ...], keep: Callable[[str], bool]) -> list[str]:
    """Regular files (no symlinks) under ``roots`` whose path passes ``keep``, sorted."""
    out = []
    for root in roots:
        for dirpath, dirnames, filenames in os.walk(root):
            dirnames.sort()
            for name in filenames:
                path = os.path.join(dirpath, name)
                if keep(path) and os.path.isfile(path) and not os.path.islink(path):
                    out.append(path)
    return sorted(out)


def _read(path: str, limit: int, decompress: bool = False) -> bytes:
    """Up to ``limit`` bytes of ``path`` (decompressed if asked), b"" if unreadable."""
    try:
        if decompress:
            opener = gzip.open if path.endswith(".gz") else open
            with opener(path, "rb") as fh:
                return fh.read(limit)
        with open(path, "rb") as fh:
            return fh.read(limit)
    except (OSError, EOFError, zlib.error):
        return b""


def _pages(blobs: list[bytes]) -> np.ndarray:
    """Blobs laid out as page-cache pages (each padded with zeros to whole pages), as an
    (n, PAGE) uint8 array; zero pages are dropped (those are their own page kind)."""
    data = b"".join(b + bytes(-len(b) % PAGE) for b in blobs if b)
    arr = np.frombuffer(data, np.uint8).reshape(-1, PAGE)
    return arr[arr.any(axis=1)] if arr.size else arr


def _file_pool(paths: list[str], rng: np.random.Generator, cap: int, per_file: int,
               want: Callable[[bytes], bool] = lambda b: True,
               decompress: bool = False) -> list[bytes]:
    """Seeded choice of files from the sorted ``paths``, read until ``cap`` bytes."""
    blobs, total = [], 0
    for i in rng.permutation(len(paths)):
        if total >= cap:
            break
        data = _read(paths[int(i)], per_file, decompress)
        if data and want(data):
            blobs.append(data)
            total += len(data)
    return blobs


def _words(text_blobs: list[bytes]) -> list[str]:
    """Distinct alphabetic words of the text pool, sorted (for strings in heap pages)."""
    words: set[str] = set()
    for blob in text_blobs[:64]:
        for w in blob.decode("utf-8", "ignore").split():
            if w.isalpha() and 2 < len(w) < 16:
                words.add(w)
    return sorted(words) or ["alpha", "beta", "session", "buffer", "config", "request"]


def _heap_payload(r: random.Random, words: list[str]) -> bytes:
    """One heap allocation's contents: pointers, small ints, a string, a hex dump line, a
    UUID, a decimal ID or a timestamp, the way they sit in a process heap."""
    k = r.random()
    if k < 0.30:  # pointers into the heap / libraries, and NULLs
        vals = [r.choice((0x555555550000 + (r.getrandbits(24) << 4),
                          0x7F0000000000 + (r.getrandbits(36) << 3), 0))
                for _ in range(r.randint(2, 16))]
        return struct.pack(f"<{len(vals)}Q", *vals)
    if k < 0.46:  # small integers: counts, flags, lengths, fds
        vals = [r.choice((r.randint(0, 64), r.randint(0, 4096), 1 << r.randint(0, 30)))
                for _ in range(r.randint(2, 16))]
        return struct.pack(f"<{len(vals)}I", *vals)
    if k < 0.74:
        return " ".join(r.choices(words, k=r.randint(1, 8))).encode() + b"\0"
    if k < 0.83:  # hex dump line, ``hexdump -C`` or ``xxd`` style
        raw = r.randbytes(16)
        asc = "".join(chr(b) if 32 <= b < 127 else "." for b in raw)
        addr = r.getrandbits(28) << 4
        if r.random() < 0.5:
            line = f"{addr:08x}  " + " ".join(f"{b:02x}" for b in raw) + f"  |{asc}|\n"
        else:
            line = f"{addr:08x}: " + " ".join(raw[i:i + 2].hex() for i in range(0, 16, 2))
            line += f"  {asc}\n"
        return line.encode() + b"\0"
    if k < 0.90:
        u = r.getrandbits(128)
        h = f"{u:032x}"
        return f"{h[:8]}-{h[8:12]}-4{h[13:16]}-a{h[17:20]}-{h[20:]}".encode() + b"\0"
    if k < 0.94:
        # decimal numbers: snowflake IDs (18-19 digits), database keys, hashCodes, random
        # 64-bit trace IDs and double reprs (17 significant digits). The last two are where
        # accidental Luhn-valid, IIN-valid 13-19 digit runs come from, as in real heaps.
        ts = r.randint(1_300_000_000_000, 1_800_000_000_000) - 1_288_834_974_657
        ident = r.choices((
            f"id={(ts << 22) | r.getrandbits(22)}",
            f"user_id={r.randint(1, 10**9)}",
            f"order {r.randint(10**5, 10**8)}",
            f"hash={r.randint(-2**31, 2**31 - 1)}",
            f"trace_id={r.getrandbits(64)}",
            f'"score":{r.random()!r}',
        ), (30, 25, 15, 15, 3, 12))[0]
        return ident.encode() + b"\0"
    # timestamps: epoch seconds / milliseconds, ISO 8601, HTTP dates
    s = r.randint(1_600_000_000, 1_800_000_000)
    stamp = r.choices((
        f"ts={s}",
        f"ts_ms={s}{r.randint(0, 999):03d}",
        time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(s)) + f".{r.randint(0, 999999):06d}Z",
        time.strftime("Date: %a, %d %b %Y %H:%M:%S GMT", time.gmtime(s)),
    ), (35, 10, 35, 20))[0]
    return stamp.encode() + b"\0"


def _heap_pages(r: random.Random, words: list[str], npages: int) -> np.ndarray:
    """``npages`` heap-like pages: runs of malloc chunks (header + payload)."""
    out = bytearray()
    for _ in range(npages):
        page = bytearray()
        while len(page) < PAGE:
            payload = _heap_payload(r, words)
            page += _malloc_header(r, len(payload))
            page += payload + bytes(-len(payload) % 16)
        out += page[:PAGE]
    return np.frombuffer(bytes(out), np.uint8).reshape(npages, PAGE)


WIN_STRINGS = (
    "C:\\Windows\\System32\\{w}.dll", "C:\\Users\\{W}\\AppData\\Local\\{W}\\{w}.dat",
    "HKEY_LOCAL_MACHINE\\SOFTWARE\\Microsoft\\{W}\\{W}", "{W}={w};{w}", "\\Device\\{W}{n}",
    "%SystemRoot%\\{w}\\{w}.exe", "{W} {w} {w} {w}.",
)


def _utf16_pages(r: random.Random, lines: list[str], words: list[str],
                 npages: int) -> np.ndarray:
    """``npages`` pages of NUL-terminated UTF-16LE strings: real text lines and
    Windows-style paths, registry keys and environment strings."""
    out = bytearray()
    for _ in range(npages):
        page = bytearray()
        while len(page) < PAGE:
            if r.random() < 0.6 and lines:
                s = r.choice(lines)
            else:
                s = r.choice(WIN_STRINGS).format(
                    w=r.choice(words), W=r.choice(words).capitalize(), n=r.randint(0, 9))
            page += (s + "\0").encode("utf-16-le", "replace")
        out += page[:PAGE]
    return np.frombuffer(bytes(out), np.uint8).reshape(npages, PAGE)


# Page kinds of image M: (name, share of pages). Order = numeric code.
M_KINDS: tuple[tuple[str, float], ...] = (
    ("zero", 0.39), ("elf", 0.20), ("text", 0.09), ("locale", 0.03), ("pyc", 0.04),
    ("compressed", 0.06), ("random", 0.05), ("utf16", 0.06), ("heap", 0.08),
)
# Page kinds of image D.
D_KINDS: tuple[tuple[str, float], ...] = (
    ("csv", 0.35), ("log", 0.25), ("groups", 0.20), ("long", 0.10), ("phone", 0.10),
)
HOSTS_M = {"text": ("text", "heap", "zero"), "utf16": ("utf16", "heap", "zero"),
           "binary": ("heap", "zero")}

ELF_ROOTS = ("/usr/bin", "/usr/lib/x86_64-linux-gnu")
TEXT_ROOTS = ("/usr/share/doc", "/usr/share/common-licenses", "/usr/share/man")
LOCALE_ROOTS = ("/usr/share/i18n/locales", "/usr/share/zoneinfo", "/usr/lib/locale")
PYC_ROOTS = ("/usr/lib/python3", "/usr/local/lib")
COMPRESSED_ROOTS = ("/usr/share",)


def _pool_caps(size: int) -> Callable[[str], int]:
    """Bytes of distinct pages to gather per kind: about a quarter of the pages that kind
    fills (pages repeat, as shared pages do in real memory), within [64 KiB, 32 MiB]."""
    shares = dict(M_KINDS)
    return lambda kind: int(min(32 << 20, max(64 << 10, shares[kind] * size / 4)))


def _m_pools(seed: int, size: int, log: Callable[[str], None]) -> dict[str, np.ndarray]:
    """The page pools of image M, keyed by page kind (random and zero pages need none)."""
    rng = np.random.default_rng([seed, 0x9001])
    r = random.Random(f"pools:{seed}")
    cap = _pool_caps(size)
    elf = _file_pool(_walk(ELF_ROOTS, lambda p: True), rng, cap("elf"), 2 << 20,
                     want=lambda b: b[:4] == b"\x7fELF")
    text = _file_pool(_walk(TEXT_ROOTS, lambda p: True), rng, cap("text"), 1 << 20,
                      want=lambda b: b"\0" not in b[:4096], decompress=True)
    locale = _file_pool(_walk(LOCALE_ROOTS, lambda p: True), rng, cap("locale"), 1 << 20)
    pyc = _file_pool(_walk(PYC_ROOTS, lambda p: p.endswith(".pyc")), rng, cap("pyc"), 1 << 20)
    comp = _file_pool(_walk(COMPRESSED_ROOTS, lambda p: p.endswith((".gz", ".xz", ".bz2"))),
                      rng, cap("compressed") * 3 // 4, 1 << 20)
    # xz data is rare in /usr/share: add some, compressed here from the text pool.
    comp.append(lzma.compress(b"".join(text)[: cap("compressed") // 2], preset=1))
    words = _words(text)
    lines = [ln for blob in text[:32] for ln in blob.decode("utf-8", "ignore").splitlines()
             if len(ln.strip()) > 8]
    pools = {
        "elf": _pages(elf), "text": _pages(text), "locale": _pages(locale),
        "pyc": _pages(pyc), "compressed": _pages(comp),
        "utf16": _utf16_pages(r, lines, words, max(16, cap("utf16") // PAGE)),
        "heap": _heap_pages(r, words, max(16, cap("heap") // PAGE)),
    }
    for kind, pool in pools.items():
        log(f"pool {kind}: {len(pool)} pages")
    return pools


# --- image D generators: vectorized digit soups and pools of generated lines ---------------


def _table(values: bytes | np.ndarray, weights: tuple[int, ...]) -> np.ndarray:
    """A lookup table drawing ``values`` with integer ``weights`` from one uniform uint8
    index (much faster than ``Generator.choice`` with probabilities)."""
    vals = np.frombuffer(values, np.uint8) if isinstance(values, bytes) else values
    table = np.repeat(vals, weights)
    if table.size > 256:
        raise ValueError("weights must sum to at most 256")
    return table


def _digit_fields(rng: np.random.Generator, n: int, lengths: np.ndarray,
                  seps: np.ndarray) -> np.ndarray:
    """``n`` bytes of random digit fields with lengths drawn from the table ``lengths``, each
    followed by one separator drawn from the table ``seps`` (tables from :func:`_table`)."""
    out = rng.integers(48, 58, n, dtype=np.uint8)
    nf = n // int(lengths.min()) + 1  # enough fields to cover n bytes
    lens = lengths[rng.integers(0, lengths.size, nf, dtype=np.uint8)].astype(np.int64) + 1
    ends = np.cumsum(lens) - 1
    ends = ends[ends < n]
    out[ends] = seps[rng.integers(0, seps.size, ends.size, dtype=np.uint8)]
    return out


CSV_LENGTHS = _table(np.arange(1, 20, dtype=np.uint8),
                     (6, 8, 10, 10, 9, 8, 7, 6, 0, 6, 0, 5, 0, 2, 0, 2, 0, 0, 1))
CSV_SEPS = _table(b",\n;", (41, 7, 2))
GROUP_LENGTHS = _table(np.arange(2, 7, dtype=np.uint8), (15, 25, 40, 10, 10))
GROUP_SEPS = _table(b" -\n/", (11, 6, 2, 1))
LONG_LENGTHS = np.arange(10, 41, dtype=np.uint8)
LONG_SEPS = _table(b" \n", (3, 2))


def _csv_bytes(rng: np.random.Generator, n: int) -> np.ndarray:
    """CSV rows of numbers: counts, prices with decimals, IDs, the odd long number."""
    out = _digit_fields(rng, n, CSV_LENGTHS, CSV_SEPS)
    dots = rng.integers(0, n, n // 40)  # decimal points inside some fields
    out[dots[out[dots] >= 48]] = ord(".")
    return out


def _groups_bytes(rng: np.random.Generator, n: int) -> np.ndarray:
    """Digit groups (2-6 digits) separated by spaces, dashes and newlines."""
    return _digit_fields(rng, n, GROUP_LENGTHS, GROUP_SEPS)


def _long_bytes(rng: np.random.Generator, n: int) -> np.ndarray:
    """Long numbers, 10-40 digits, one per space or line."""
    return _digit_fields(rng, n, LONG_LENGTHS, LONG_SEPS)


def _log_line(r: random.Random) -> str:
    s = r.randint(1_700_000_000, 1_800_000_000)
    iso = time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(s))
    clf = time.strftime("%d/%b/%Y:%H:%M:%S +0000", time.gmtime(s))
    ip = ".".join(str(r.randint(1, 254)) for _ in range(4))
    return r.choice((
        f"{iso}.{r.randint(0, 999):03d}Z INFO [worker-{r.randint(1, 64)}] req={r.getrandbits(40)}"
        f" user={r.randint(1, 10**7)} latency_ms={r.randint(1, 9999)} status=200\n",
        f'{ip} - - [{clf}] "GET /api/v1/orders/{r.randint(10**6, 10**10)}?page={r.randint(1, 99)}'
        f' HTTP/1.1" {r.choice((200, 304, 404, 500))} {r.randint(100, 10**6)}\n',
        f"{s}.{r.randint(0, 999999):06d} kernel: [{r.uniform(0, 10**6):14.6f}] eth0: rx "
        f"{r.randint(0, 10**9)} tx {r.randint(0, 10**9)}\n",
        f"txn {r.randint(10**11, 10**20)} amount={r.randint(0, 99999)}.{r.randint(0, 99):02d}"
        f" ts={s}{r.randint(0, 999):03d} seq={r.randint(0, 10**9)}\n",
        f"{iso} audit: pid={r.randint(1, 4 * 10**6)} uid={r.randint(0, 65535)} "
        f"ses={r.randint(1, 10**5)} msg=audit({s}.{r.randint(0, 999):03d}:{r.randint(1, 10**6)})\n",
    ))


def _phone_line(r: random.Random) -> str:
    def d(k: int) -> str:
        return f"{r.randrange(10**k):0{k}d}"

    return r.choice((
        f"+1 ({r.randint(201, 989)}) {d(3)}-{d(4)}", f"({r.randint(201, 989)}) {d(3)}-{d(4)}",
        f"{r.randint(201, 989)}-{d(3)}-{d(4)}", f"+44 20 {d(4)} {d(4)}", f"+49 30 {d(7)}",
        f"+33 1 {d(2)} {d(2)} {d(2)} {d(2)}", f"+91 {d(5)} {d(5)}", f"tel:+{d(11)}",
    )) + r.choice((",", "\n", "; ", " | "))


def _line_pool(r: random.Random, make: Callable[[random.Random], str], nbytes: int) -> np.ndarray:
    """At least ``nbytes`` of generated lines, as a flat uint8 array."""
    parts, total = [], 0
    while total < nbytes:
        s = make(r)
        parts.append(s)
        total += len(s)
    return np.frombuffer("".join(parts).encode(), np.uint8)


def _d_pools(seed: int, size: int) -> dict[str, np.ndarray]:
    """Flat line pools of image D (log and phone lines); pages are cut at random offsets."""
    r = random.Random(f"dpools:{seed}")
    cap = int(min(4 << 20, max(256 << 10, size // 64)))
    return {"log": _line_pool(r, _log_line, cap), "phone": _line_pool(r, _phone_line, cap // 2)}


def _cut(pool: np.ndarray, rng: np.random.Generator, k: int) -> np.ndarray:
    """``k`` pages cut from the flat ``pool`` at random offsets, as a (k, PAGE) array."""
    windows = np.lib.stride_tricks.sliding_window_view(pool, PAGE)
    return windows[rng.integers(0, windows.shape[0], k)]


# ---------------------------------------------------------------------------------------------
# Writing.


@dataclass
class Result:
    """What :func:`generate` wrote: paths, size (bytes), seconds taken, truth items, and
    the number of pages of each background kind (before planting)."""

    path: str
    truth_path: str
    size: int
    seconds: float
    truth: list[dict[str, Any]] = field(default_factory=list)
    pages: dict[str, int] = field(default_factory=dict)


def _page_kinds(rng: np.random.Generator, npages: int,
                kinds: tuple[tuple[str, float], ...]) -> np.ndarray:
    """A kind code per page, i.i.d. by share."""
    p = np.array([s for _, s in kinds])
    return rng.choice(len(kinds), size=npages, p=p / p.sum()).astype(np.uint8)


def _fillers(kind: str, seed: int, size: int,
             log: Callable[[str], None]) -> dict[int, Callable[[np.random.Generator, int],
                                                              np.ndarray]]:
    """Page fillers by kind code: each returns ``k`` pages as a (k, PAGE) uint8 array."""
    def from_pool(pool: np.ndarray) -> Callable[[np.random.Generator, int], np.ndarray]:
        return lambda g, k: pool[g.integers(0, len(pool), k)]

    def gen(make: Callable[[np.random.Generator, int], np.ndarray]):
        return lambda g, k: make(g, k * PAGE).reshape(k, PAGE)

    def random_pages(g: np.random.Generator, k: int) -> np.ndarray:
        return np.frombuffer(g.bytes(k * PAGE), np.uint8).reshape(k, PAGE)

    if kind == "M":
        pools = _m_pools(seed, size, log)
        out = {}
        for code, (name, _) in enumerate(M_KINDS):
            if name == "random":
                out[code] = random_pages
            elif name != "zero":
                pool = pools[name]
                if len(pool) == 0:  # nothing of this kind on this machine: heap instead
                    log(f"no {name} files found; using heap-like pages instead")
                    pool = pools["heap"]
                out[code] = from_pool(pool)
        return out
    pools = _d_pools(seed, size)
    makers = {"csv": gen(_csv_bytes), "groups": gen(_groups_bytes), "long": gen(_long_bytes),
              "log": lambda g, k: _cut(pools["log"], g, k),
              "phone": lambda g, k: _cut(pools["phone"], g, k)}
    return {code: makers[name] for code, (name, _) in enumerate(D_KINDS)}


def _blocks(size: int, seed: int, page_kinds: np.ndarray,
            fillers: dict[int, Callable[[np.random.Generator, int], np.ndarray]],
            plants: list[Plant]) -> Iterator[np.ndarray]:
    """The image as consecutive blocks of at most BLOCK bytes, planted records overlaid."""
    plants = sorted(plants, key=lambda p: p.start)
    starts = [p.start for p in plants]
    for b, base in enumerate(range(0, size, BLOCK)):
        n = min(BLOCK, size - base)
        buf = np.zeros(n, np.uint8)
        pages = buf.reshape(-1, PAGE)
        kinds = page_kinds[base // PAGE: (base + n) // PAGE]
        g = np.random.default_rng([seed, 0xB10C, b])  # per block: same bytes, any order
        for code, fill in fillers.items():
            idx = np.flatnonzero(kinds == code)
            if idx.size:
                pages[idx] = fill(g, idx.size)
        # records that start before this block may reach into it: start one earlier
        i = max(0, bisect.bisect_left(starts, base) - 1)
        while i < len(plants) and plants[i].start < base + n:
            p = plants[i]
            lo, hi = max(p.start, base), min(p.end, base + n)
            if lo < hi:
                buf[lo - base: hi - base] = np.frombuffer(
                    p.record[lo - p.start: hi - p.start], np.uint8)
            i += 1
        yield buf


def generate(kind: str, size: int, seed: int, out: str, counts: Counts | None = None,
             log: Callable[[str], None] = lambda s: None) -> Result:
    """Write image ``kind`` ('M' or 'D') of ``size`` bytes (a multiple of 4096, >= 1 MiB) to
    ``out`` and its truth to ``out + '.truth.jsonl'``; same seed, same bytes and truth."""
    if kind not in ("M", "D"):
        raise ValueError("kind must be M or D")
    if size % PAGE or size < (1 << 20):
        raise ValueError("size must be a multiple of 4096 bytes and at least 1 MiB")
    t0 = time.perf_counter()
    counts = counts or Counts()
    kinds = M_KINDS if kind == "M" else D_KINDS
    npages = size // PAGE
    rng = np.random.default_rng([seed, 0x1A7E])
    page_kinds = _page_kinds(rng, npages, kinds)
    names = [k for k, _ in kinds]
    hosts = ({h: tuple(names.index(k) for k in ks) for h, ks in HOSTS_M.items()}
             if kind == "M" else {h: tuple(range(len(kinds))) for h in HOSTS_M})
    plants = make_plants(seed, counts)
    place(plants, size, page_kinds, hosts, rng)
    fillers = _fillers(kind, seed, size, log)
    with open(out, "wb") as fh:
        for buf in _blocks(size, seed, page_kinds, fillers, plants):
            fh.write(buf)
    truth = sorted((p.truth for p in plants), key=lambda t: t["offset"])
    truth_path = out + ".truth.jsonl"
    with open(truth_path, "w") as fh:
        for t in truth:
            fh.write(json.dumps(t, sort_keys=True) + "\n")
    pages = {name: int(np.count_nonzero(page_kinds == code))
             for code, (name, _) in enumerate(kinds)}
    return Result(out, truth_path, size, time.perf_counter() - t0, truth, pages)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--kind", choices=("M", "D"), default="M",
                    help="M: memory-like (default); D: dense-digit worst case")
    ap.add_argument("--size", help="image size, e.g. 64M, 1G (default 1G for M, 256M for D)")
    ap.add_argument("--seed", type=int, default=1)
    ap.add_argument("-o", "--output", required=True, help="image path; truth goes beside it")
    ap.add_argument("--pans", type=int, default=Counts.pans, help="PANs incl. tracks")
    ap.add_argument("--ssns", type=int, default=Counts.ssns)
    ap.add_argument("--aes", type=int, default=Counts.aes)
    ap.add_argument("--rsa", type=int, default=Counts.rsa)
    ap.add_argument("-q", "--quiet", action="store_true")
    args = ap.parse_args(argv)

    def log(msg: str) -> None:
        if not args.quiet:
            print(msg, file=sys.stderr)

    try:
        size = parse_size(args.size or ("1G" if args.kind == "M" else "256M"))
        res = generate(args.kind, size, args.seed, args.output,
                       Counts(args.pans, args.ssns, args.aes, args.rsa), log)
    except (ValueError, OSError) as exc:
        print(f"gen_image: {exc}", file=sys.stderr)
        return 2
    by_kind: dict[str, int] = {}
    for t in res.truth:
        by_kind[t["kind"]] = by_kind.get(t["kind"], 0) + 1
    log(f"wrote {res.path} ({res.size / 2**20:.0f} MiB) in {res.seconds:.1f} s; pages: "
        f"{res.pages}; truth {res.truth_path}: {by_kind}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
