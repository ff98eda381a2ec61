"""JSON Lines (``--format jsonl``): the machine contract, one object per line."""

from __future__ import annotations

import json
from collections.abc import Sequence
from typing import TYPE_CHECKING

from scanner.findings import Finding
from scanner.printers.base import FindingsPrinter

if TYPE_CHECKING:
    from scanner.state import Change


class JsonlPrinter(FindingsPrinter):
    """Findings with the contract's fields in order (``scanner.findings.FIELDS``); changes
    with ``scanner.state.CHANGE_FIELDS``."""

    def findings(self, findings: Sequence[Finding], many: bool) -> None:
        for f in findings:
            self.stream.write(json.dumps(f.to_dict(), separators=(",", ":")) + "\n")

    def changes(self, changes: Sequence[Change]) -> None:
        for c in changes:
            self.stream.write(json.dumps(c.to_dict(), separators=(",", ":")) + "\n")
