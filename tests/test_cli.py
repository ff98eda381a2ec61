"""The command line as a user meets it: exit statuses, outputs, bad input, evidence untouched."""

from __future__ import annotations

import json
import os
import random
import stat
from pathlib import Path

import pytest

from tests.plant import PAGE, PAN, SSN, lime, make_pan

SAMPLES = Path(__file__).resolve().parent.parent / "samples"
FIELDS = [
    "image",
    "format",
    "detector",
    "gpa",
    "file",
    "offset",
    "length",
    "encoding",
    "masked",
    "fingerprint",
    "details",
]


def put(mem: bytearray, off: int, data: bytes) -> None:
    mem[off : off + len(data)] = data


@pytest.fixture
def image(tmp_path):
    mem = bytearray(16 * PAGE)
    put(mem, 4090, f" card {PAN} ".encode())  # PAN straddles pages 0 and 1
    put(mem, 9000, f" {SSN} ".encode())
    p = tmp_path / "guest.raw"
    p.write_bytes(bytes(mem))
    return p


def test_jsonl_contract_and_exit_1(image, vmleak):
    r = vmleak("scan", "--format", "jsonl", str(image))
    assert r.returncode == 1, r.stderr
    rows = [json.loads(line) for line in r.stdout.splitlines()]
    assert [list(x) for x in rows] == [FIELDS, FIELDS]
    pan, ssn = rows
    assert (pan["detector"], pan["gpa"], pan["offset"], pan["length"]) == ("pan", 4096, 4096, 16)
    assert (ssn["detector"], ssn["gpa"], ssn["masked"]) == ("ssn", 9001, "***-**-7890")
    assert pan["masked"] == "455673******9855" and pan["fingerprint"].startswith("hmac-sha256:")
    assert PAN not in r.stdout + r.stderr and "536907890" not in r.stdout


def test_table_csv_and_clean_exit(image, tmp_path, vmleak):
    r = vmleak("scan", str(image))
    assert r.returncode == 1 and "455673******9855" in r.stdout and "GPA" in r.stdout
    r = vmleak("scan", "--format", "csv", "--detectors", "ssn", str(image))
    assert r.stdout.splitlines()[0] == ",".join(FIELDS) and len(r.stdout.splitlines()) == 2
    clean = tmp_path / "clean.raw"
    clean.write_bytes(bytes(2 * PAGE))
    assert vmleak("scan", str(clean)).returncode == 0


def test_unmask_is_explicit_and_announced(image, vmleak):
    r = vmleak("scan", "--format", "jsonl", "--unmask", str(image))
    assert "--unmask" in r.stderr and PAN in r.stdout


def test_fingerprints_are_keyed(image, vmleak):
    a = vmleak("scan", "--format", "jsonl", str(image)).stdout
    b = vmleak(
        "scan", "--format", "jsonl", str(image), env={"VMLEAK_FINGERPRINT_KEY": "11" * 32}
    ).stdout
    assert (
        json.loads(a.splitlines()[0])["fingerprint"] != json.loads(b.splitlines()[0])["fingerprint"]
    )


def test_key_file_created_0600_in_state_dir(image, tmp_path, vmleak):
    env = {"VMLEAK_FINGERPRINT_KEY": "", "XDG_STATE_HOME": str(tmp_path / "state")}
    assert vmleak("scan", "-q", str(image), env=env).returncode == 1
    key = tmp_path / "state" / "vmleak" / "fingerprint.key"
    assert stat.S_IMODE(key.stat().st_mode) == 0o600
    again = vmleak("scan", "--format", "jsonl", str(image), env=env).stdout
    first = vmleak(
        "scan", "--format", "jsonl", "--fingerprint-key-file", str(key), str(image)
    ).stdout
    assert again == first


def test_bad_inputs_one_line_errors_exit_2_rest_scanned(image, tmp_path, vmleak):
    junk = tmp_path / "junk"
    junk.mkdir()
    (junk / "notes.txt").write_text("hello")
    (junk / "bin.dat").write_bytes(bytes(range(256)) * 4)  # no magic, not whole pages
    empty = tmp_path / "empty.raw"
    empty.write_bytes(b"")
    fifo = tmp_path / "pipe"
    os.mkfifo(fifo)
    missing = tmp_path / "missing.vmem"
    r = vmleak(
        "scan", "--format", "jsonl", str(missing), str(junk), str(empty), str(fifo), str(image)
    )
    assert r.returncode == 2
    assert len(r.stdout.splitlines()) == 2  # the good image was still scanned
    errs = [
        line
        for line in r.stderr.splitlines()
        if line.startswith("vmleak: ") and "image(s)" not in line and "warning:" not in line
    ]  # (the raw image's remark that no known format was recognised is a warning)
    assert len(errs) == 4, r.stderr
    for path in (missing, junk, empty, fifo):
        assert any(str(path) in e for e in errs)
    assert "Traceback" not in r.stderr


@pytest.mark.skipif(os.geteuid() == 0, reason="running as root: file permissions do not stop reads")
def test_unreadable_file(image, vmleak):
    image.chmod(0)
    r = vmleak("scan", str(image))
    assert r.returncode == 2 and str(image) in r.stderr and "Traceback" not in r.stderr


def test_evidence_unchanged(image, vmleak):
    before = (image.read_bytes(), image.stat().st_mtime_ns)
    vmleak("scan", str(image))
    vmleak("info", str(image))
    assert (image.read_bytes(), image.stat().st_mtime_ns) == before


def test_detector_selection(image, vmleak):
    r = vmleak("scan", "--format", "jsonl", "--detectors", "pii", str(image))
    assert {json.loads(x)["detector"] for x in r.stdout.splitlines()} == {"ssn"}
    r = vmleak("scan", "--detectors", "nonsense", str(image))
    assert r.returncode == 2 and "nonsense" in r.stderr


def test_min_confidence_filters(image, vmleak):
    r = vmleak("scan", "--format", "jsonl", "--min-confidence", "0.75", str(image))
    dets = [json.loads(x)["detector"] for x in r.stdout.splitlines()]
    assert dets == ["pan"]  # the card keyword lifts the PAN; the bare-context SSN stays below


def test_lime_out_of_order_info_and_extract(tmp_path, vmleak):
    rng = random.Random(5)
    mem = bytearray(8 * PAGE)
    pan = make_pan(rng, row=10)  # visa
    put(mem, 3 * PAGE - 5, f" {pan} ".encode())
    order = [5, 2, 7, 3, 0, 1, 6, 4]
    img = tmp_path / "dump.lime"
    img.write_bytes(lime(bytes(mem), order))
    r = vmleak("scan", "--format", "jsonl", "--input-format", "lime", str(img))
    (f,) = [json.loads(x) for x in r.stdout.splitlines()]
    assert (f["format"], f["gpa"]) == ("lime", 3 * PAGE - 4)
    assert f["offset"] == order.index(2) * (PAGE + 32) + 32 + PAGE - 4  # first byte's file offset
    out = vmleak("info", str(img)).stdout
    assert "format:   lime" in out and "8 extents" in out and "1 ranges" in out
    raw = tmp_path / "flat.raw"
    assert vmleak("extract", str(img), "-o", str(raw)).returncode == 0
    assert raw.read_bytes() == bytes(mem)
    assert (
        vmleak("extract", str(img), "-o", str(img), "--force").returncode == 2
    )  # never over evidence


def test_jobs_split_matches_single_process(tmp_path, monkeypatch):
    from parsers.registry import open_image  # noqa: F401  (import check only)
    from patterns.registry import select
    from scanner import runner
    from scanner.engine import ScanConfig

    mem = bytearray(random.Random(64).randbytes(64 * PAGE))
    for k in range(0, 64 * PAGE, 4 * PAGE + 333):
        put(mem, k, f" {make_pan(random.Random(k))} ".encode())
    p = tmp_path / "big.raw"
    p.write_bytes(bytes(mem))
    monkeypatch.setattr(runner, "SPLIT_MIN", 8 * PAGE)
    cfg = ScanConfig(select("cards"), key=b"k" * 32, chunk_size=16384)
    spec = runner.ImageSpec(str(p))
    one = runner.run([spec], cfg, jobs=1).findings
    with spec.open() as img:
        units = runner.plan(img, 4)
    assert len(units) > 2  # really split
    two = runner.run([spec], cfg, jobs=2).findings
    assert [(f.gpa, f.fingerprint) for f in one] == [(f.gpa, f.fingerprint) for f in two]
    assert one


def test_qcow2_snapshots_are_kept_apart(tmp_path, vmleak):
    import lzma

    disk = tmp_path / "disk.qcow2"
    disk.write_bytes(lzma.decompress((SAMPLES / "qemu" / "savevm.qcow2.xz").read_bytes()))
    r = vmleak("scan", "--format", "jsonl", str(disk))
    rows = [json.loads(x) for x in r.stdout.splitlines()]
    by_snap: dict[str, set] = {}
    for f in rows:
        by_snap.setdefault(f["details"]["snapshot"], set()).add((f["gpa"], f["fingerprint"]))
    assert set(by_snap) == {"first", "second"}
    # the same card at the same address in both snapshots is reported once per snapshot
    assert by_snap["first"] & {(g, fp) for g, fp in by_snap["second"]}
    one = vmleak("scan", "--format", "jsonl", "--snapshot", "second", str(disk)).stdout
    rows = [json.loads(x) for x in one.splitlines()]
    assert {f["details"]["snapshot"] for f in rows if f["gpa"] is not None} == {"second"}
    # the first snapshot's VM state clusters are still scanned, as plain file bytes
    assert {f["details"]["region"] for f in rows if f["gpa"] is None} == {"vmstate"}
