"""Score scanner findings against the truth file written by ``gen_image.py``.

A finding (a dict in the ``vmleak scan --format jsonl`` contract, or any object with the same
attributes) matches a planted item when its ``detector`` equals the item's ``kind`` and the
bytes it spans overlap the item's ``[offset, offset + length)`` (raw images: GPA = offset).
Matches that do not start exactly at the planted offset, or have another length, are listed
as ``inexact`` so an off-by-a-sentinel report stays visible. A ``pan`` finding inside a
planted Track 1 / Track 2 item is *subsumed* (the track contains the PAN): it is neither a
match nor a false positive. Everything else is *unplanted*: the benchmark's false positives.

CLI: ``python benchmarks/truth.py IMAGE.truth.jsonl FINDINGS.jsonl [--image-size BYTES]``.
"""

from __future__ import annotations

import argparse
import bisect
import json
import os
import sys
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

KINDS = ("pan", "track1", "track2", "ssn", "aes-key", "rsa-key")
#: planted kinds whose items contain a secret another detector also reports on its own
CONTAINS = {"track1": ("pan",), "track2": ("pan",)}
GIB = 1 << 30


def load_truth(path: str) -> list[dict[str, Any]]:
    """The planted items of a truth file (one JSON object a line), sorted by offset."""
    return sorted(_load_jsonl(path), key=lambda t: t["offset"])


def load_findings(path: str) -> list[dict[str, Any]]:
    """Findings from a ``vmleak scan --format jsonl`` output file."""
    return _load_jsonl(path)


def _load_jsonl(path: str) -> list[dict[str, Any]]:
    with open(path, encoding="utf-8") as fh:
        return [json.loads(line) for line in fh if line.strip()]


def _get(finding: Any, name: str) -> Any:
    """A finding's field, whether it is a dict or an object with attributes."""
    if isinstance(finding, dict):
        return finding.get(name)
    return getattr(finding, name, None)


@dataclass
class MatchReport:
    """The outcome of :func:`match`.

    ``planted`` / ``found``: items per kind, planted and matched at least once; ``missed``:
    truth items never matched; ``inexact``: (truth item, finding) pairs that matched by
    overlap only; ``duplicates``: extra findings on an already matched item; ``subsumed``:
    PAN findings inside a planted track; ``unplanted``: other findings per detector, and
    ``unplanted_findings`` the findings themselves.
    """

    planted: dict[str, int] = field(default_factory=dict)
    found: dict[str, int] = field(default_factory=dict)
    missed: list[dict[str, Any]] = field(default_factory=list)
    inexact: list[tuple[dict[str, Any], Any]] = field(default_factory=list)
    duplicates: int = 0
    subsumed: int = 0
    unplanted: dict[str, int] = field(default_factory=dict)
    unplanted_findings: list[Any] = field(default_factory=list)

    @property
    def recall(self) -> dict[str, float]:
        """Matched / planted per kind (1.0 for a kind with nothing planted)."""
        return {k: self.found.get(k, 0) / n if n else 1.0 for k, n in self.planted.items()}

    def unplanted_per_gib(self, image_bytes: int) -> dict[str, float]:
        """Unplanted findings per GiB of image, per detector."""
        return {k: n * GIB / image_bytes for k, n in self.unplanted.items()}

    def summary(self, image_bytes: int | None = None) -> str:
        """A few human-readable lines: recall per kind, then false positives."""
        lines = []
        for kind, n in self.planted.items():
            lines.append(f"{kind:8} {self.found.get(kind, 0):5}/{n:<5} recall "
                         f"{self.recall[kind]:.3f}")
        fp = ", ".join(f"{k} {n}" for k, n in sorted(self.unplanted.items())) or "none"
        lines.append(f"unplanted findings: {fp}")
        if image_bytes:
            per = self.unplanted_per_gib(image_bytes)
            lines.append("unplanted per GiB: " + (
                ", ".join(f"{k} {v:.1f}" for k, v in sorted(per.items())) or "none"))
        lines.append(f"inexact {len(self.inexact)}, duplicates {self.duplicates}, "
                     f"subsumed {self.subsumed}, missed {len(self.missed)}")
        return "\n".join(lines)


def match(findings: Iterable[Any], truth: list[dict[str, Any]]) -> MatchReport:
    """Score ``findings`` (dicts or objects with ``detector``, ``gpa`` (or ``offset``) and
    ``length`` in bytes) against ``truth`` (from :func:`load_truth`; planted items never
    overlap, so a finding meets at most a few neighbours)."""
    truth = sorted(truth, key=lambda t: t["offset"])
    starts = [t["offset"] for t in truth]
    rep = MatchReport(planted={k: 0 for k in KINDS})
    for t in truth:
        rep.planted[t["kind"]] = rep.planted.get(t["kind"], 0) + 1
    hit = [False] * len(truth)
    for f in findings:
        det = _get(f, "detector")
        gpa = _get(f, "gpa")
        if gpa is None:
            gpa = _get(f, "offset")
        length = max(1, int(_get(f, "length") or 1))
        verdict = "unplanted"
        if gpa is not None:
            end = int(gpa) + length
            i = bisect.bisect_left(starts, end) - 1  # last item starting before the end
            while i >= 0 and truth[i]["offset"] + truth[i]["length"] > gpa:
                t = truth[i]
                if t["kind"] == det:
                    verdict = "duplicate" if hit[i] else "match"
                    if not hit[i]:
                        hit[i] = True
                        if t["offset"] != gpa or t["length"] != length:
                            rep.inexact.append((t, f))
                    break
                if det in CONTAINS.get(t["kind"], ()):
                    verdict = "subsumed"
                i -= 1
        if verdict == "duplicate":
            rep.duplicates += 1
        elif verdict == "subsumed":
            rep.subsumed += 1
        elif verdict == "unplanted":
            rep.unplanted[det] = rep.unplanted.get(det, 0) + 1
            rep.unplanted_findings.append(f)
    for t, h in zip(truth, hit, strict=True):
        if h:
            rep.found[t["kind"]] = rep.found.get(t["kind"], 0) + 1
        else:
            rep.missed.append(t)
    return rep


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description="Score vmleak findings against a truth file.")
    ap.add_argument("truth", help="IMAGE.truth.jsonl written by gen_image.py")
    ap.add_argument("findings", help="output of `vmleak scan IMAGE --format jsonl`")
    ap.add_argument("--image-size", type=int,
                    help="image bytes for per-GiB rates (default: size of the truth's image)")
    ap.add_argument("--show-missed", type=int, default=10, metavar="N",
                    help="print up to N missed items (default 10)")
    args = ap.parse_args(argv)
    rep = match(load_findings(args.findings), load_truth(args.truth))
    size = args.image_size
    image = args.truth.removesuffix(".truth.jsonl")
    if size is None and os.path.exists(image):
        size = os.path.getsize(image)
    print(rep.summary(size))
    for t in rep.missed[: args.show_missed]:
        print("missed:", json.dumps({k: v for k, v in t.items() if k != "value"}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
