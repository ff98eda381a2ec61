"""The table for people (``--format table``, the default)."""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING

from scanner.findings import Finding
from scanner.printers.base import FindingsPrinter, aligned

if TYPE_CHECKING:
    from scanner.state import Change


def _addr(f: Finding) -> str:
    if f.gpa is not None:
        return f"{f.gpa:#014x}"
    return f"{f.details.get('block', '?')}+{f.addr:#x}"


def _note(f: Finding) -> str:
    d = f.details
    bits = [str(d[k]) for k in ("brand", "format", "bits", "curve", "keyword") if k in d]
    if d.get("test"):
        bits.append("TEST")
    if d.get("encrypted"):
        bits.append("encrypted")
    if "snapshot" in d:
        bits.append(f"snapshot={d['snapshot']}")
    return " ".join(bits)


class TablePrinter(FindingsPrinter):
    """Aligned columns: where (GPA, file offset), what (detector, masked value), how sure
    (confidence) and notable details; changes grouped by image."""

    def findings(self, findings: Sequence[Finding], many: bool) -> None:
        head = ["DETECTOR", "GPA", "OFFSET", "ENC", "MASKED", "CONF", "NOTE"]
        if many:
            head.insert(0, "IMAGE")
        rows = []
        for f in findings:
            r = [
                f.detector,
                _addr(f),
                "-" if f.offset is None else f"{f.offset:#x}",
                "u16" if f.encoding == "utf-16le" else f.encoding[:3],
                f.details.get("value", f.masked),
                f"{f.confidence:.2f}",
                _note(f),
            ]
            if many:
                r.insert(0, f.image)
            rows.append(r)
        aligned(head, rows, self.stream)

    def changes(self, changes: Sequence[Change]) -> None:
        head = ["CHANGE", "IMAGE", "DETECTOR", "GPA", "MASKED", "FINGERPRINT"]
        rows = [
            [
                c.kind.upper(),
                c.image,
                c.detector,
                "-" if c.gpa is None else f"{c.gpa:#014x}",
                c.masked,
                c.fingerprint[:28] + "...",
            ]
            for c in changes
        ]
        aligned(head, rows, self.stream)
