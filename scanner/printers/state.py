"""The state database as a printer: a run is begun, each image recorded (in its own
transaction) as soon as it is complete, and the run closed with its counts."""

from __future__ import annotations

from scanner.engine import ScanResult
from scanner.outcome import Outcome
from scanner.printers.base import Printer
from scanner.state import Change, StateDB


class StateWriter(Printer):
    """Records a run in an open writer ``db``: ``signature`` is the scan configuration the
    images are recorded with, ``detectors`` the detectors that ran. ``changes`` collects the
    new/resolved changes of the images stored."""

    def __init__(self, db: StateDB, signature: str, detectors: set[str]) -> None:
        self.db = db
        self.signature = signature
        self.detectors = detectors
        self.changes: list[Change] = []
        self.out: Outcome | None = None

    def begin(self, out: Outcome) -> None:
        self.out = out
        out.run_id = self.db.begin_run(out.argv)

    def image(self, result: ScanResult) -> None:
        assert self.out is not None and self.out.run_id is not None, "begin first"
        if not result.format and self.db.image_row(result.image) is None:
            return  # never opened and never known: nothing to remember
        files = self.out.summary.files.get(result.image, [result.image])
        self.changes += self.db.store(
            self.out.run_id, result, files, self.signature, self.detectors
        )

    def finish(self, out: Outcome) -> None:
        assert out.run_id is not None, "begin first"
        self.db.finish_run(out.run_id, out.stats(), complete=not out.summary.not_scanned)
