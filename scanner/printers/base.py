"""The interface every output of a run implements (after ripgrep's printer crates: one sink
interface, one small implementation per output).

A run calls, on each of its printers: ``begin(outcome)`` once before scanning; ``image(result)``
once per image as soon as all its units are back (completion order; images the state database
shows unchanged are not passed: they were not scanned); ``finish(outcome)`` once the outcome is
complete (results in input order, changes, exit status). The state database writer
(``printers.state``) and the evidence report (``printers.report``) are printers too.

Printers of findings (``--format``) implement :class:`FindingsPrinter`: ``findings`` for the
findings a run reports, ``changes`` for the new/resolved changes of ``--since-last`` and
``vmleak diff``.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Sequence
from typing import TYPE_CHECKING, TextIO

from scanner.engine import ScanResult
from scanner.findings import Finding

if TYPE_CHECKING:
    from scanner.outcome import Outcome
    from scanner.state import Change


class Printer:
    """One output of a run (module docstring). Every method does nothing by default."""

    def begin(self, out: Outcome) -> None:
        """Before the scan: ``out`` holds the configuration, not yet any result."""

    def image(self, result: ScanResult) -> None:
        """One image, complete (all its units back), as soon as it is."""

    def finish(self, out: Outcome) -> None:
        """After the run, with the whole outcome."""


class FindingsPrinter(Printer, ABC):
    """A ``--format`` of findings on a text stream. At ``finish`` it writes the reportable
    findings, or (``changes_only``, ``--since-last``) the changes shown, then flushes."""

    def __init__(self, stream: TextIO, changes_only: bool = False) -> None:
        self.stream = stream
        self.changes_only = changes_only

    def finish(self, out: Outcome) -> None:
        if self.changes_only:
            self.changes(out.shown_changes)
        else:
            self.findings(out.reportable, many=len(out.summary.results) > 1)
        self.stream.flush()

    @abstractmethod
    def findings(self, findings: Sequence[Finding], many: bool) -> None:
        """Write findings; ``many``: they may come from several images."""

    @abstractmethod
    def changes(self, changes: Sequence[Change]) -> None:
        """Write new/resolved changes (``scanner.state.Change``)."""


def aligned(head: list[str], rows: list[list[str]], stream: TextIO) -> None:
    """Write ``head`` and ``rows`` as left-aligned columns (nothing when there is no row)."""
    if not rows:
        return
    widths = [max(len(str(x)) for x in col) for col in zip(head, *rows, strict=True)]
    for r in [head, *rows]:
        stream.write("  ".join(str(x).ljust(w) for x, w in zip(r, widths, strict=True)).rstrip())
        stream.write("\n")
