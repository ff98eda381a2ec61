"""The state database: change detection, new/resolved bookkeeping, key check, run lock."""

from __future__ import annotations

import os
import random
import shutil
import sqlite3
import stat
import time

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from scanner.baseline import AllowEntry, Allowlist, Baseline
from scanner.engine import ScanResult
from scanner.findings import Finding, fingerprint
from scanner.state import (
    SAMPLE_BYTES,
    StateDB,
    StateError,
    file_state,
    sample_fingerprint,
    unchanged,
)

KEY = b"k" * 32
CONFIG = '{"detectors": "test"}'


def finding(image: str, det: str, secret: bytes, gpa: int, **details) -> Finding:
    return Finding(
        image, "raw", det, gpa, image, gpa, len(secret), "ascii", "masked",
        fingerprint(KEY, det, secret), dict(details), 0, gpa,
    )  # fmt: skip


def result(image: str, findings: list[Finding], errors: list[str] | None = None) -> ScanResult:
    return ScanResult(image=image, format="raw", findings=findings, errors=errors or [])


def flip_at(path, off: int) -> None:
    """Change the byte at ``off`` (every bit inverted: it always differs from before)."""
    with open(path, "r+b") as fh:
        fh.seek(off)
        old = fh.read(1)[0]
        fh.seek(off)
        fh.write(bytes([old ^ 0xFF]))


@pytest.fixture
def big(tmp_path):
    p = tmp_path / "big.raw"
    p.write_bytes(random.Random(1).randbytes(64 * SAMPLE_BYTES))  # 4 MiB: 16 sampled blocks
    return p


def test_sample_fingerprint_sees_size_and_sampled_blocks_only(big):
    size = big.stat().st_size
    first = sample_fingerprint(str(big), size)
    flip_at(big, 10)  # first block: sampled
    assert sample_fingerprint(str(big), size) != first
    second = sample_fingerprint(str(big), size)
    flip_at(big, size - 3)  # last block: sampled
    assert sample_fingerprint(str(big), size) != second
    third = sample_fingerprint(str(big), size)
    flip_at(big, 2 * SAMPLE_BYTES + 100)  # between sampled blocks: the documented miss
    assert sample_fingerprint(str(big), size) == third
    with open(big, "ab") as fh:
        fh.write(b"\0" * 4096)
    assert sample_fingerprint(str(big), size + 4096) != third


def test_unchanged_rules(big, tmp_path):
    rec = [file_state(str(big))]
    assert unchanged(rec)
    st = big.stat()
    # A write that keeps size but moves mtime: changed, even if the sample would not see it.
    os.utime(big, ns=(st.st_atime_ns, st.st_mtime_ns + 1))
    assert not unchanged(rec)
    os.utime(big, ns=(st.st_atime_ns, st.st_mtime_ns))
    # Copied back with times preserved (new inode, new ctime): the sample decides.
    copy = tmp_path / "copy"
    shutil.copy2(big, copy)
    os.replace(copy, big)
    assert big.stat().st_ino != rec[0]["ino"] or big.stat().st_ctime_ns != rec[0]["ctime_ns"]
    assert unchanged(rec)
    flip_at(big, 5)  # in a sampled block, mtime then set back: caught by the sample
    os.utime(big, ns=(st.st_atime_ns, st.st_mtime_ns))
    assert not unchanged(rec)
    big.unlink()
    assert not unchanged(rec)


def test_new_moved_resolved_and_partial(tmp_path):
    db = StateDB(tmp_path / "s.db", KEY, writer=True)
    img = str(tmp_path / "a.raw")
    (tmp_path / "a.raw").write_bytes(b"\0" * 4096)
    run1 = db.begin_run(["t"])
    both = [finding(img, "pan", b"1", 100), finding(img, "ssn", b"2", 200)]
    ch = db.store(run1, result(img, both), [img], CONFIG, {"pan", "ssn"})
    assert sorted((c.kind, c.detector) for c in ch) == [("new", "pan"), ("new", "ssn")]
    run2 = db.begin_run(["t"])
    # The PAN moved (same value elsewhere): not new. The SSN is gone: resolved.
    ch = db.store(
        run2, result(img, [finding(img, "pan", b"1", 9000)]), [img], CONFIG, {"pan", "ssn"}
    )
    assert [(c.kind, c.detector) for c in ch] == [("resolved", "ssn")]
    assert [f.gpa for f in db.current_findings()] == [9000]
    run3 = db.begin_run(["t"])
    # An incomplete read resolves nothing; a detector not run resolves nothing.
    assert db.store(run3, result(img, [], errors=["boom"]), [img], CONFIG, {"pan"}) == []
    assert db.store(run3, result(img, [], errors=[]), [img], CONFIG, {"ssn"}) == []
    assert len(db.current_findings()) == 1
    run4 = db.begin_run(["t"])
    ch = db.store(
        run4, result(img, [finding(img, "ssn", b"2", 200)]), [img], CONFIG, {"pan", "ssn"}
    )
    assert sorted((c.kind, c.detector) for c in ch) == [("new", "ssn"), ("resolved", "pan")]
    assert [c.kind for c in db.changes(run2)] == ["resolved"]
    assert [r.status for r in db.runs()] == ["interrupted"] * 3 + ["running"]
    db.close()


def test_removed_images_resolve(tmp_path):
    root = tmp_path / "ds"
    root.mkdir()
    a, b = root / "a.raw", root / "b.raw"
    for p in (a, b):
        p.write_bytes(b"\0" * 4096)
    with StateDB(tmp_path / "s.db", KEY, writer=True) as db:
        r1 = db.begin_run(["t"])
        for p in (a, b):
            db.store(
                r1, result(str(p), [finding(str(p), "pan", b"v", 1)]), [str(p)], CONFIG, {"pan"}
            )
        a.unlink()
        r2 = db.begin_run(["t"])
        # b not seen (excluded by a glob, say) but still there: left alone; a is gone.
        ch = db.mark_removed(r2, [str(root)], set())
        assert [(c.image, c.kind) for c in ch] == [(str(a), "resolved")]
        assert [f.image for f in db.current_findings()] == [str(b)]
        # Images outside the scanned roots are never touched.
        b.unlink()
        assert db.mark_removed(r2, [str(tmp_path / "elsewhere")], set()) == []


def test_other_key_refused_and_values_never_stored(tmp_path):
    path = tmp_path / "s.db"
    img = str(tmp_path / "a.raw")
    with StateDB(path, KEY, writer=True) as db:
        run = db.begin_run(["t"])
        f = finding(img, "pan", b"4556737586899855", 5, value="4556737586899855")
        db.store(run, result(img, [f]), [img], CONFIG, {"pan"})
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    for name in os.listdir(tmp_path):
        assert b"4556737586899855" not in (tmp_path / name).read_bytes()
    with pytest.raises(StateError, match="another fingerprint key"):
        StateDB(path, b"x" * 32, writer=True)
    with pytest.raises(StateError, match="no state database"):
        StateDB(tmp_path / "missing.db", KEY)
    (tmp_path / "junk.db").write_bytes(b"not sqlite" * 100)
    with pytest.raises(StateError, match="not a usable"):
        StateDB(tmp_path / "junk.db", KEY, writer=True)


def test_second_writer_waits_then_fails_clearly_readers_do_not(tmp_path):
    path = tmp_path / "s.db"
    holder = StateDB(path, KEY, writer=True)
    run = holder.begin_run(["t"])
    t0 = time.monotonic()
    with pytest.raises(StateError, match=rf"another vmleak run .*pid {os.getpid()}"):
        StateDB(path, KEY, writer=True, lock_wait=0.5)
    assert time.monotonic() - t0 >= 0.5
    with StateDB(path, KEY) as reader:  # no lock needed to read
        assert [r.id for r in reader.runs()] == [run]
    holder.close()
    StateDB(path, KEY, writer=True, lock_wait=0).close()  # free again
    assert sqlite3.connect(path).execute("PRAGMA journal_mode").fetchone()[0] == "wal"


@settings(max_examples=150)
@given(text=st.text(max_size=300))
def test_allowlist_and_baseline_parsers_reject_garbage_cleanly(tmp_path, text):
    p = tmp_path / "f"
    p.write_text(text, encoding="utf-8")
    try:
        allow = Allowlist.load(str(p))
    except ValueError as err:
        assert str(p) in str(err)
    else:
        assert all(e.reason.strip() for e in allow.entries)  # every entry has its reason
    with pytest.raises(ValueError, match="baseline"):
        Baseline.load(str(p), "0" * 16)


def test_allowlist_entries_match():
    img = "/ds/a.raw"
    pan = finding(img, "pan", b"4111111111111111", 1)
    pan.masked = "411111******1111"
    test_pan = finding(img, "pan", b"4556737586899855", 2, test=True)
    test_pan.masked = "455673******9855"
    ssn = finding(img, "ssn", b"123", 3)
    ssn.masked = "***-**-0123"
    allow = Allowlist(
        [
            AllowEntry("pan-iin", (411100, 411199), "QA range", 1),
            AllowEntry("fingerprint", ssn.fingerprint, "known fixture", 2),
        ]
    )
    assert allow.reason(pan) == "allowlist line 1: QA range"
    assert allow.reason(ssn) == "allowlist line 2: known fixture"
    assert allow.reason(test_pan) is None
    assert Allowlist([AllowEntry("test-pans", None, "not CHD", 1)]).reason(test_pan)
