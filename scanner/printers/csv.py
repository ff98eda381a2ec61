"""CSV (``--format csv``): the contract's fields as columns, ``details`` as a JSON string."""

from __future__ import annotations

import csv
import json
from collections.abc import Sequence
from typing import TYPE_CHECKING

from scanner.findings import FIELDS, Finding
from scanner.printers.base import FindingsPrinter

if TYPE_CHECKING:
    from scanner.state import Change

#: columns of a change (``scanner.state.Change.to_dict``), in order
CHANGE_FIELDS = ("change", "run", "image", "detector", "gpa", "masked", "fingerprint")


class CsvPrinter(FindingsPrinter):
    """A header row, then one row per finding or change (empty cell for null)."""

    def _rows(self, fields: Sequence[str], rows: list[dict]) -> None:
        w = csv.writer(self.stream, lineterminator="\n")
        w.writerow(fields)
        for r in rows:
            w.writerow(["" if r[k] is None else r[k] for k in fields])

    def findings(self, findings: Sequence[Finding], many: bool) -> None:
        rows = [f.to_dict() for f in findings]
        for r in rows:
            r["details"] = json.dumps(r["details"], separators=(",", ":"))
        self._rows(FIELDS, rows)

    def changes(self, changes: Sequence[Change]) -> None:
        self._rows(CHANGE_FIELDS, [c.to_dict() for c in changes])
