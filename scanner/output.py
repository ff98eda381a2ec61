"""Writers over Finding records: human table, JSON Lines (the contract), CSV; and of the
new/resolved changes of a nightly run."""

from __future__ import annotations

import csv
import json
from collections.abc import Iterable
from typing import Any, TextIO

from scanner.findings import FIELDS, Finding

FORMATS = ("table", "jsonl", "csv")


def write_jsonl(findings: Iterable[Finding], out: TextIO) -> None:
    """One JSON object per finding per line, fields in contract order."""
    for f in findings:
        out.write(json.dumps(f.to_dict(), separators=(",", ":"), sort_keys=False) + "\n")


def write_csv(findings: Iterable[Finding], out: TextIO, header: bool = True) -> None:
    """The contract's fields as CSV columns; ``details`` as a JSON string."""
    w = csv.writer(out, lineterminator="\n")
    if header:
        w.writerow(FIELDS)
    for f in findings:
        row = f.to_dict()
        row["details"] = json.dumps(row["details"], separators=(",", ":"))
        w.writerow(["" if row[k] is None else row[k] for k in FIELDS])


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


def write_table(findings: list[Finding], out: TextIO, show_image: bool) -> None:
    """An aligned table for people: where (GPA, file offset), what (detector, masked value),
    how sure (confidence) and notable details."""
    head = ["DETECTOR", "GPA", "OFFSET", "ENC", "MASKED", "CONF", "NOTE"]
    if show_image:
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
        if show_image:
            r.insert(0, f.image)
        rows.append(r)
    if not rows:
        return
    widths = [max(len(str(x)) for x in col) for col in zip(head, *rows, strict=True)]
    for r in [head, *rows]:
        out.write("  ".join(str(x).ljust(w) for x, w in zip(r, widths, strict=True)).rstrip())
        out.write("\n")


CHANGE_FIELDS = ("change", "run", "image", "detector", "gpa", "masked", "fingerprint")


def write_changes(changes: Iterable[Any], out: TextIO, fmt: str) -> None:
    """New/resolved findings (``scanner.state.Change``): JSON Lines objects with the fields
    of ``CHANGE_FIELDS``, CSV with those columns, or a table grouped by image."""
    rows = [c.to_dict() for c in changes]
    if fmt == "jsonl":
        for r in rows:
            out.write(json.dumps(r, separators=(",", ":")) + "\n")
    elif fmt == "csv":
        w = csv.writer(out, lineterminator="\n")
        w.writerow(CHANGE_FIELDS)
        for r in rows:
            w.writerow(["" if r[k] is None else r[k] for k in CHANGE_FIELDS])
    elif rows:
        head = ["CHANGE", "IMAGE", "DETECTOR", "GPA", "MASKED", "FINGERPRINT"]
        table = [
            [
                r["change"].upper(),
                r["image"],
                r["detector"],
                "-" if r["gpa"] is None else f"{r['gpa']:#014x}",
                r["masked"],
                r["fingerprint"][:28] + "...",
            ]
            for r in rows
        ]
        widths = [max(len(str(x)) for x in col) for col in zip(head, *table, strict=True)]
        for r in [head, *table]:
            out.write("  ".join(str(x).ljust(w) for x, w in zip(r, widths, strict=True)).rstrip())
            out.write("\n")
    out.flush()
