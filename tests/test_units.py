"""Typed units of work and one parse per image: an image is parsed once per run (by its OPEN
unit), its RANGE/EDGES units map the files from the shipped layout, the report's coverage
comes from that parse; a file changed between plan and unit is an input error."""

from __future__ import annotations

import os
import pickle
import random

import pytest

from parsers.base import ImageError
from patterns.registry import select
from scanner import runner
from scanner.engine import ScanConfig
from scanner.execute import execute
from scanner.params import ScanParams
from scanner.printers.report import ReportWriter
from scanner.units import EDGES, OPEN, RANGE, UNIT_REACH, Layout, Unit
from tests.plant import PAGE, lime, make_pan

PAN = "4556737586899855"


def big_raw(path, pages: int = 64) -> list[str]:
    mem = bytearray(random.Random(pages).randbytes(pages * PAGE))
    pans = []
    for k in range(0, pages * PAGE - 64, 4 * PAGE + 333):
        pan = make_pan(random.Random(k))
        mem[k : k + len(pan) + 2] = f" {pan} ".encode()
        pans.append(pan)
    path.write_bytes(bytes(mem))
    return pans


@pytest.fixture
def counted(monkeypatch, tmp_path):
    """Every parse appends the path to a log file (pool workers are forked: they log too)."""
    log = tmp_path / "opens.log"
    real = runner.open_image

    def open_image(path, fmt=None, options=None):
        with open(log, "a") as fh:
            fh.write(path + "\n")
        return real(path, fmt, options)

    monkeypatch.setattr(runner, "open_image", open_image)
    monkeypatch.setattr(runner, "SPLIT_MIN", 8 * PAGE)
    monkeypatch.setenv("VMLEAK_FINGERPRINT_KEY", "00" * 32)
    return log


def test_each_image_parsed_once_per_report_run(tmp_path, counted):
    ds = tmp_path / "ds"
    ds.mkdir()
    big_raw(ds / "big.raw")
    mem = bytearray(8 * PAGE)
    mem[5 * PAGE : 5 * PAGE + 18] = f" {PAN} ".encode()
    (ds / "small.lime").write_bytes(lime(bytes(mem), [0, 1, 2, 3, 5, 6]))
    p = ScanParams((str(ds),), jobs=2, progress=False, fail_on="any")
    out = execute(p, [ReportWriter(str(tmp_path / "rep"))], rescan_all=True)
    opened = sorted(os.path.basename(x) for x in counted.read_text().split())
    assert opened == ["big.raw", "small.lime"]  # planning, workers and report: one parse each
    cov = {os.path.basename(k): v for k, v in out.summary.coverage.items()}
    assert cov == {
        "big.raw": [(0, 64 * PAGE)],
        "small.lime": [(0, 4 * PAGE), (5 * PAGE, 7 * PAGE)],
    }
    assert len(out.reportable) > 10 and not out.summary.failed


def test_units_pickle_and_findings_stay_masked(tmp_path, counted):
    img = tmp_path / "big.raw"
    pans = big_raw(img)
    cfg = ScanConfig(select("cards"), key=b"k" * 32, chunk_size=16384)
    runner.install("t", cfg)
    spec = runner.ImageSpec(str(img))
    opened = runner.open_task("t", spec, 4)
    assert opened.result is None and opened.layout is not None
    kinds = [u.kind for u in opened.units]
    assert kinds.count(RANGE) == 4 and kinds[-1] == EDGES and OPEN not in kinds
    found = []
    for u in opened.units:
        shipped = pickle.loads(pickle.dumps((opened.layout.for_unit(u), u)))
        res = runner.unit_task("t", *shipped)
        wire = pickle.dumps(res)
        assert not any(p.encode() in wire for p in pans)  # only masked values travel
        found += res.findings
    whole = runner.open_task("t", spec, 1).result
    assert {(f.gpa, f.fingerprint) for f in found} == {
        (f.gpa, f.fingerprint) for f in whole.findings
    }
    assert len(whole.findings) > len(pans) // 2
    runner.uninstall("t")


def test_range_unit_ships_its_extents_and_their_guest_neighbours(tmp_path):
    img = tmp_path / "l.lime"
    order = list(range(0, 64, 2)) + list(range(1, 64, 2))  # 64 separate extents
    img.write_bytes(lime(bytes(64 * PAGE), order))
    spec = runner.ImageSpec(str(img))
    with spec.open() as image:
        layout = Layout.of(image)
    assert layout is not None and len(layout.segments[0].extents) == 64
    size = layout.segments[0].length
    part = layout.for_unit(Unit(RANGE, 0, 0, size // 4))  # even pages 0 .. 30
    ext = part.segments[0].extents
    own = ext.addr[ext.buf_offset < size // 4]
    assert 15 <= own.size <= 17
    reach = UNIT_REACH // PAGE
    want = {p for a in own.tolist() for p in range(a // PAGE - reach, a // PAGE + reach + 1)}
    assert set((ext.addr // PAGE).tolist()) == want & set(range(64))  # neighbours, no more
    assert layout.for_unit(Unit(EDGES)) is layout


def test_file_changed_after_planning_is_an_input_error(tmp_path):
    img = tmp_path / "big.raw"
    big_raw(img)
    with runner.ImageSpec(str(img)).open() as image:
        layout = Layout.of(image)
    assert layout is not None
    with open(img, "ab") as fh:
        fh.write(bytes(PAGE))
    with pytest.raises(ImageError, match="changed while it was being scanned"):
        layout.open()


def test_worker_that_cannot_read_a_path_returns_an_input_error(tmp_path):
    runner.install("t2", ScanConfig(select("cards"), key=b"k" * 32))
    opened = runner.open_task("t2", runner.ImageSpec(str(tmp_path / "gone.raw")), 4)
    runner.uninstall("t2")
    assert opened.result is not None and opened.layout is None
    (err,) = opened.result.errors
    assert err.startswith(str(tmp_path / "gone.raw")) and "No such file" in err
