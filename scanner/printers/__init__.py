"""The outputs of a run: one :class:`~scanner.printers.base.Printer` each (see ``base``).

``FINDINGS`` maps each ``--format`` name to its printer class; a new format is one module here
and one line below. The state database writer (``printers.state``) and the evidence report
(``printers.report``) are imported where used (they load SQLite and the report code).
"""

from __future__ import annotations

from scanner.printers.base import FindingsPrinter, Printer
from scanner.printers.csv import CsvPrinter
from scanner.printers.jsonl import JsonlPrinter
from scanner.printers.table import TablePrinter

FINDINGS: dict[str, type[FindingsPrinter]] = {
    "table": TablePrinter,
    "jsonl": JsonlPrinter,
    "csv": CsvPrinter,
}
FORMATS = tuple(FINDINGS)

__all__ = ["FINDINGS", "FORMATS", "FindingsPrinter", "Printer"]
