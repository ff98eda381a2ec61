"""The printer interface a run drives: begin once, one image() per scanned image as soon as
it is complete (so the state database holds it already), finish once with the outcome."""

from __future__ import annotations

import dataclasses
import io
import sqlite3

from scanner.engine import ScanResult
from scanner.execute import execute
from scanner.outcome import EXIT_FOUND, Outcome
from scanner.params import ScanParams
from scanner.printers import FINDINGS, Printer
from tests.plant import PAGE

PAN = "4556737586899855"


class Recorder(Printer):
    def __init__(self, db: str | None = None) -> None:
        self.calls: list[tuple[str, object]] = []
        self.db = db

    def begin(self, out: Outcome) -> None:
        self.calls.append(("begin", out.run_id))

    def image(self, result: ScanResult) -> None:
        stored = None
        if self.db:  # the state writer, first among the sinks, has committed it already
            con = sqlite3.connect(self.db)
            stored = con.execute("SELECT 1 FROM images WHERE path=?", (result.image,)).fetchone()
        self.calls.append(("image", (result.image.rsplit("/", 1)[-1], stored is not None)))

    def finish(self, out: Outcome) -> None:
        self.calls.append(("finish", out.status))


def tree(tmp_path):
    ds = tmp_path / "ds"
    ds.mkdir()
    for name, plant in (("a.raw", f" card {PAN} "), ("b.raw", "")):
        mem = bytearray(4 * PAGE)
        mem[100 : 100 + len(plant)] = plant.encode()
        (ds / name).write_bytes(bytes(mem))
    return ds


def test_run_drives_printers_in_order(tmp_path, monkeypatch):
    monkeypatch.setenv("VMLEAK_FINGERPRINT_KEY", "00" * 32)
    ds = tree(tmp_path)
    db = str(tmp_path / "state.db")
    rec = Recorder(db)
    p = ScanParams((str(ds),), jobs=1, progress=False, state_path=db, fail_on="any")
    out = execute(p, [rec])
    assert rec.calls[0] == ("begin", out.run_id) and out.run_id == 1
    assert sorted(c[1] for c in rec.calls[1:-1]) == [("a.raw", True), ("b.raw", True)]
    assert rec.calls[-1] == ("finish", EXIT_FOUND)
    rec = Recorder()  # second run: nothing rescanned, so no image() call
    out = execute(p, [rec])
    assert [c[0] for c in rec.calls] == ["begin", "finish"] and len(out.reportable) == 1


def test_every_format_prints_findings_and_changes(tmp_path, monkeypatch):
    monkeypatch.setenv("VMLEAK_FINGERPRINT_KEY", "00" * 32)
    ds = tree(tmp_path)
    for fmt, cls in FINDINGS.items():
        for changes_only in (False, True):
            db = str(tmp_path / f"{fmt}-{changes_only}.db")
            p = ScanParams((str(ds),), jobs=1, progress=False, state_path=db, fail_on="any")
            buf = io.StringIO()
            execute(dataclasses.replace(p, since_last=changes_only), [cls(buf, changes_only)])
            text = buf.getvalue()
            assert "455673******9855" in text, (fmt, changes_only)
            assert ("new" in text.lower()) == changes_only, (fmt, changes_only)
