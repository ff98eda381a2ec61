"""The evidence report as a printer: ``report.json`` and ``report.html`` written into a
directory once the run is complete (``scanner.report``)."""

from __future__ import annotations

from scanner import report
from scanner.outcome import Outcome
from scanner.printers.base import Printer


class ReportWriter(Printer):
    """Writes the report of a run into ``out_dir`` (created 0700, files 0600)."""

    def __init__(self, out_dir: str) -> None:
        self.out_dir = out_dir

    def finish(self, out: Outcome) -> None:
        report.write(self.out_dir, report.build(out, out.argv, out.status))
