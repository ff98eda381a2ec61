"""The benchmark image generator (benchmarks/gen_image.py), the truth scorer
(benchmarks/truth.py) and the ripgrep baseline's regex (benchmarks/rg_compare.py), on small
images generated in a temporary directory."""

from __future__ import annotations

import hashlib
import importlib.util
import json
import re
import shutil
import struct
import subprocess
import sys
from pathlib import Path

import pytest

BENCH = Path(__file__).resolve().parent.parent / "benchmarks"
SIZE_M = 8 << 20
SIZE_D = 4 << 20


def _load(name: str):
    spec = importlib.util.spec_from_file_location(name, BENCH / f"{name}.py")
    mod = importlib.util.module_from_spec(spec)
    sys.modules[name] = mod  # dataclasses look their module up by name
    spec.loader.exec_module(mod)
    return mod


gen = _load("gen_image")
truth_mod = _load("truth")
rgc = _load("rg_compare")


def _sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


@pytest.fixture(scope="module")
def m_image(tmp_path_factory):
    out = tmp_path_factory.mktemp("m") / "m.img"
    res = gen.generate("M", SIZE_M, 7, str(out))
    return out, res


@pytest.fixture(scope="module")
def d_image(tmp_path_factory):
    out = tmp_path_factory.mktemp("d") / "d.img"
    res = gen.generate("D", SIZE_D, 3, str(out), gen.Counts(rsa=2))  # RSA keys are slow
    return out, res


def test_same_seed_same_bytes_and_truth(m_image, tmp_path):
    out, _ = m_image
    gen.rsa_der.cache_clear()  # regenerate the RSA keys too: they must come out the same
    again = tmp_path / "again.img"
    assert gen.main(["--kind", "M", "--size", "8M", "--seed", "7", "-q", "-o", str(again)]) == 0
    assert _sha(again) == _sha(out)
    assert (tmp_path / "again.img.truth.jsonl").read_text() == Path(
        str(out) + ".truth.jsonl").read_text()


def test_other_seed_other_image(m_image, tmp_path):
    out, res = m_image
    other = tmp_path / "other.img"
    res2 = gen.generate("M", SIZE_M, 8, str(other), gen.Counts(rsa=1))  # RSA keys are slow
    assert _sha(other) != _sha(out)
    assert [t["offset"] for t in res2.truth] != [t["offset"] for t in res.truth]


def test_size_and_counts(m_image):
    out, res = m_image
    assert out.stat().st_size == SIZE_M
    truth = truth_mod.load_truth(res.truth_path)
    assert truth == sorted(res.truth, key=lambda t: t["offset"])
    kinds = {k: sum(t["kind"] == k for t in truth) for k in truth_mod.KINDS}
    assert kinds["pan"] + kinds["track1"] + kinds["track2"] == 1000
    assert kinds["track1"] > 20 and kinds["track2"] > 20
    assert (kinds["ssn"], kinds["aes-key"], kinds["rsa-key"]) == (500, 58, 7)
    pans = [t for t in truth if t["kind"] == "pan"]
    utf16 = sum(t["encoding"] == "utf-16le" for t in truth if t["kind"] in ("pan", "track1",
                                                                              "track2"))
    assert 60 <= utf16 <= 140  # ~10%
    grouped = sum(bool(t["separator"]) for t in pans)
    assert 0.25 * len(pans) <= grouped <= 0.42 * len(pans)  # ~1/3
    assert {len(t["value"]) for t in pans} == set(range(13, 20))
    assert len({t["brand"] for t in pans}) == len(gen.BRANDS)
    for edge in gen.CHUNK_EDGES:
        assert any(t["straddles"] == edge and t["kind"] == "pan" for t in truth)


def _brand_ok(pan: str, brand: str) -> bool:
    _, ranges, lengths, _ = next(b for b in gen.BRANDS if b[0] == brand)
    return len(pan) in lengths and any(
        lo <= int(pan[: len(str(lo))]) <= hi for lo, hi in ranges)


def _luhn(digits: str) -> bool:  # independent of gen_image.luhn_ok
    s = sum(int(c) for c in digits[-1::-2])
    s += sum(sum(divmod(2 * int(c), 10)) for c in digits[-2::-2])
    return s % 10 == 0


def _ssn_ok(ssn: str) -> bool:
    area, group, serial = int(ssn[:3]), int(ssn[3:5]), int(ssn[5:])
    return (0 < area < 900 and area != 666 and group > 0 and serial > 0
            and ssn not in {"078051120", "219099999", "457555462", "123456789"})


def _pyaes_schedule(key: bytes) -> bytes:
    pyaes = pytest.importorskip("pyaes", reason="pyaes cross-checks the AES key expansion",
                                exc_type=ImportError)
    # pyaes leaves stray high bits in some 256-bit schedule words: keep the low 32
    words = [w & 0xFFFFFFFF for rk in pyaes.AES(key)._Ke for w in rk]
    return struct.pack(f">{len(words)}I", *words)


def _check_items(path: Path, truth: list[dict]) -> None:
    """Every truth item is in the image at its offset, valid, isolated, and none overlap."""
    from cryptography.hazmat.primitives.serialization import load_der_private_key

    data = path.read_bytes()
    prev_end = 0
    for t in truth:
        off, n = t["offset"], t["length"]
        assert off >= prev_end, f"overlap at {off}"
        prev_end = off + n
        raw = data[off: off + n]
        if t["kind"] == "aes-key":
            sched = _pyaes_schedule(bytes.fromhex(t["value"]))
            assert n == len(sched) == {128: 176, 192: 208, 256: 240}[t["bits"]]
            if t["layout"] == "openssl-bswap":
                sched = b"".join(sched[i: i + 4][::-1] for i in range(0, n, 4))
            assert raw == sched
            continue
        if t["kind"] == "rsa-key":
            assert raw.hex() == t["value"]
            assert load_der_private_key(raw, None).key_size == t["bits"]
            continue
        width = 2 if t["encoding"] == "utf-16le" else 1
        text = raw.decode("utf-16-le" if width == 2 else "ascii")
        # isolation: no digit (or separator then digit) right before or after
        before = data[max(0, off - 2 * width): off].decode("latin-1")[::width]
        after = data[off + n: off + n + 2 * width].decode("latin-1")[::width]
        for ctx in (before[::-1], after):
            assert not ctx[:1].isdigit(), (t, ctx)
            assert not (ctx[:1] in " -" and ctx[1:2].isdigit()), (t, ctx)
        if t["kind"] in ("track1", "track2"):
            assert text == t["value"]
            pat = (r"%B(\d{13,19})\^[A-Z /]{2,26}\^\d{7}\d*\?" if t["kind"] == "track1"
                   else r";(\d{13,19})=\d{7}\d*\?")
            m = re.fullmatch(pat, text)
            assert m and m.group(1) == t["pan"], text
            assert len(text) <= (78 if t["kind"] == "track1" else 39)  # 79 / 40 with LRC
            pan_raw = data[t["pan_offset"]: t["pan_offset"] + t["pan_length"]]
            assert pan_raw.decode("utf-16-le" if width == 2 else "ascii") == t["pan"]
            assert _luhn(t["pan"]) and _brand_ok(t["pan"], t["brand"])
        elif t["kind"] == "pan":
            digits = text.replace(t["separator"], "") if t["separator"] else text
            assert digits == t["value"] and digits.isdigit()
            assert _luhn(digits) and _brand_ok(digits, t["brand"])
            if t["separator"]:
                groups = [len(g) for g in text.split(t["separator"])]
                assert groups in ([4, 4, 4, 4], [4, 4, 4, 4, 3], [4, 6, 5], [4, 6, 4])
        else:
            assert t["kind"] == "ssn"
            assert re.sub("[- ]", "", text) == t["value"] and _ssn_ok(t["value"])
            if t["format"] == "bare":
                assert text.isdigit() and len(text) == 9
            else:
                assert re.fullmatch(r"\d{3}([- ])\d{2}\1\d{4}", text), text
        if t["straddles"]:
            edge = t["straddles"]
            assert off // edge != (off + n - 1) // edge, f"{t} does not straddle {edge}"


def test_m_items_present_valid_isolated(m_image):
    out, res = m_image
    _check_items(out, res.truth)


def test_d_items_present_valid_isolated(d_image):
    out, res = d_image
    assert out.stat().st_size == SIZE_D
    _check_items(out, res.truth)
    # a dense-digit image: most bytes are digits
    data = out.read_bytes()
    assert sum(data.count(bytes([c])) for c in b"0123456789") > 0.5 * len(data)


def test_m_page_mix(tmp_path):
    # few planted items, so that they do not hide the page mix
    out = tmp_path / "mix.img"
    res = gen.generate("M", SIZE_M, 5, str(out), gen.Counts(pans=10, ssns=5, aes=2, rsa=0))
    assert len(res.truth) == 17
    assert sum(res.pages.values()) == SIZE_M // 4096
    data = out.read_bytes()
    pages = [data[i: i + 4096] for i in range(0, len(data), 4096)]
    zero = sum(p.count(0) == 4096 for p in pages)
    assert abs(zero - res.pages["zero"]) <= 17 and 0.33 < zero / len(pages) < 0.45  # ~39%
    utf16 = sum(bool(re.search(rb"(?:[ -~]\x00){12}", p)) for p in pages)
    assert utf16 >= res.pages["utf16"]
    assert len(res.pages) == len(gen.M_KINDS)


def test_aes_known_answer():
    # FIPS-197 Appendix A.1: the last round-key word of 2b7e1516 28aed2a6 abf71588 09cf4f3c
    sched = gen.aes_expand(bytes.fromhex("2b7e151628aed2a6abf7158809cf4f3c"))
    assert len(sched) == 176 and sched[-4:].hex() == "b6630ca6"
    assert gen.openssl_layout(sched)[-4:].hex() == "a60c63b6"
    # Appendix A.3 (256-bit): w59
    key = "603deb1015ca71be2b73aef0857d77811f352c073b6108d72d9810a30914dff4"
    assert gen.aes_expand(bytes.fromhex(key))[-4:].hex() == "706c631e"


def test_parse_size():
    assert gen.parse_size("64M") == 64 << 20
    assert gen.parse_size("1G") == 1 << 30
    assert gen.parse_size("8MiB") == 8 << 20
    assert gen.parse_size("4096") == 4096
    with pytest.raises(ValueError):
        gen.parse_size("lots")


def test_bad_sizes_refused(tmp_path):
    for size in (SIZE_M + 1, 4096):
        with pytest.raises(ValueError):
            gen.generate("M", size, 1, str(tmp_path / "x.img"))
    assert gen.main(["--size", "100", "-q", "-o", str(tmp_path / "y.img")]) == 2


def test_match_scores_findings():
    truth = [
        {"kind": "pan", "offset": 100, "length": 16, "value": "x"},
        {"kind": "track2", "offset": 200, "length": 30, "value": "y", "pan_offset": 201},
        {"kind": "ssn", "offset": 400, "length": 11, "value": "z"},
        {"kind": "aes-key", "offset": 1000, "length": 176, "value": "k"},
    ]
    findings = [
        {"detector": "pan", "gpa": 100, "length": 16},
        {"detector": "pan", "gpa": 100, "length": 16},  # the same secret twice
        {"detector": "track2", "gpa": 201, "length": 28},  # found without its sentinels
        {"detector": "pan", "gpa": 201, "length": 16},  # the PAN inside the track
        {"detector": "pan", "gpa": 5000, "length": 16},  # not planted
        {"detector": "ssn", "gpa": 1010, "length": 11},  # inside a key: not planted as ssn
    ]
    rep = truth_mod.match(findings, truth)
    assert rep.found == {"pan": 1, "track2": 1}
    assert [t["kind"] for t in rep.missed] == ["ssn", "aes-key"]
    assert rep.duplicates == 1 and rep.subsumed == 1
    assert rep.unplanted == {"pan": 1, "ssn": 1}
    assert [t["kind"] for t, _ in rep.inexact] == ["track2"]
    assert rep.recall["pan"] == 1.0 and rep.recall["ssn"] == 0.0
    assert rep.unplanted_per_gib(1 << 29) == {"pan": 2.0, "ssn": 2.0}
    assert "ssn" in rep.summary(1 << 30)


def test_truth_cli_scores_perfect_findings(m_image, tmp_path, capsys):
    _, res = m_image
    findings = tmp_path / "f.jsonl"
    findings.write_text("".join(
        json.dumps({"detector": t["kind"], "gpa": t["offset"], "length": t["length"]}) + "\n"
        for t in res.truth))
    assert truth_mod.main([res.truth_path, str(findings)]) == 0
    out = capsys.readouterr().out
    assert "missed 0" in out and "unplanted findings: none" in out


def test_rg_regex_counts_card_shapes(tmp_path):
    if not shutil.which("rg"):
        pytest.skip("ripgrep (rg) not installed; rg_compare installs it for benchmarks only")
    sample = tmp_path / "s.bin"
    sample.write_bytes(
        b"\x00a 4111111111111111 b\n"  # plain 16
        b"4111 1111 1111 1111\x00"  # grouped 4-4-4-4
        b"=3782-822463-10005 "  # 4-6-5
        b"4111 1111-1111 1111 "  # inconsistent separators: not a card shape
        b"12345678901234567890 "  # 20 digits: too long
        b"123456789012 ")  # 12 digits: too short
    assert rgc.rg_count(str(sample)) == 3
    res = rgc.rg_throughput(str(sample), runs=2)
    assert res.matches == 3 and len(res.seconds) == 2 and res.mb_per_s > 0
    version = subprocess.run(["rg", "--version"], capture_output=True, text=True).stdout
    assert res.version == version.split("\n")[0]
