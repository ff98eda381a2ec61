"""Accepted findings: a baseline (findings recorded at one point, per image) and an allowlist
(hand-written entries, each with a reason). Suppressed findings are still stored and shown in
evidence reports with why they were suppressed; they do not count for ``--fail-on`` and are
not printed by ``scan``.

Baseline file (JSON, written by ``vmleak baseline create``)::

    {"vmleak_baseline": 1, "created": "...", "key_check": "...",
     "entries": [{"image": "/ds/vm1.raw", "detector": "pan", "fingerprint": "hmac-sha256:...",
                  "masked": "411111******1111"}, ...]}

An entry matches the same secret (detector and keyed fingerprint) in the same image; an entry
with ``"image": "*"`` matches it in any image. Fingerprints are keyed: a baseline made with
another key matches nothing, so loading one refuses a different key check value.

Allowlist file (text, one entry per line, ``#`` starts a comment; the reason is required)::

    fingerprint hmac-sha256:3f1c...  QA card planted in the golden image (ticket 123)
    pan-iin 411111               Visa test range used by the load tests
    pan-iin 400000-400099        issuer test BINs
    test-pans                    published test card numbers (details.test) are not CHD

``pan-iin`` compares the first six digits of the PAN (what a masked PAN still shows) of
``pan``, ``track1`` and ``track2`` findings with an inclusive range.
"""

from __future__ import annotations

import json
import os
import re
from dataclasses import dataclass
from datetime import datetime, timezone
from typing import Any

from scanner.findings import Finding

CARD_DETECTORS = ("pan", "track1", "track2")
_FP = re.compile(r"hmac-sha256:[0-9a-f]{64}")


def write_private(path: str, text: str) -> None:
    """Write ``text`` to ``path`` created 0600 (an existing file is replaced, keeping 0600)."""
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    os.fchmod(fd, 0o600)  # an existing file keeps its old mode through O_CREAT
    with os.fdopen(fd, "w", encoding="utf-8") as fh:
        fh.write(text)


def iin(f: Finding) -> int | None:
    """The first six PAN digits of a card finding (from its masked form), or None."""
    if f.detector not in CARD_DETECTORS:
        return None
    m = re.search(r"\d{6}", f.masked)
    return int(m.group()) if m else None


@dataclass
class Baseline:
    """Accepted (image, detector, fingerprint) triples."""

    entries: set[tuple[str, str, str]]
    key_check: str

    @classmethod
    def create(cls, findings: list[Finding], key_check: str) -> Baseline:
        return cls({(f.image, f.detector, f.fingerprint) for f in findings}, key_check)

    def save(self, path: str, masked: dict[tuple[str, str, str], str]) -> None:
        """Write the baseline (0600) with each entry's masked value for people to read."""
        doc = {
            "vmleak_baseline": 1,
            "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
            "key_check": self.key_check,
            "entries": [
                {"image": i, "detector": d, "fingerprint": fp, "masked": masked.get((i, d, fp), "")}
                for i, d, fp in sorted(self.entries)
            ],
        }
        write_private(path, json.dumps(doc, indent=1) + "\n")

    @classmethod
    def load(cls, path: str, key_check: str) -> Baseline:
        """Read a baseline file; ValueError (naming the file) if malformed or of another key."""
        try:
            with open(path, encoding="utf-8") as fh:
                doc = json.load(fh)
            if doc.get("vmleak_baseline") != 1:
                raise ValueError("not a vmleak baseline file")
            entries = {(e["image"], e["detector"], e["fingerprint"]) for e in doc["entries"]}
        except (OSError, ValueError, KeyError, TypeError, AttributeError) as exc:
            why = exc.strerror if isinstance(exc, OSError) else str(exc)
            raise ValueError(f"{path}: cannot read baseline: {why}") from None
        if doc.get("key_check") != key_check:
            raise ValueError(
                f"{path}: baseline made with another fingerprint key (check value "
                f"{doc.get('key_check')}, this key {key_check}); its entries cannot match"
            )
        return cls(entries, key_check)

    def reason(self, f: Finding) -> str | None:
        if (f.image, f.detector, f.fingerprint) in self.entries or (
            "*",
            f.detector,
            f.fingerprint,
        ) in self.entries:
            return "in baseline"
        return None


@dataclass
class AllowEntry:
    """One allowlist line: ``kind`` fingerprint | pan-iin | test-pans."""

    kind: str
    value: Any
    reason: str
    line: int


@dataclass
class Allowlist:
    entries: list[AllowEntry]

    @classmethod
    def load(cls, path: str) -> Allowlist:
        """Parse an allowlist; ValueError naming file and line for anything malformed."""
        try:
            with open(path, encoding="utf-8") as fh:
                lines = fh.read().splitlines()
        except OSError as exc:
            raise ValueError(f"{path}: cannot read allowlist: {exc.strerror}") from None
        out = []
        for n, raw in enumerate(lines, 1):
            text = raw.split("#", 1)[0].strip()
            if not text:
                continue
            parts = text.split(None, 2 if not text.startswith("test-pans") else 1)
            kind = parts[0]
            where = f"{path}: line {n}"
            if kind == "test-pans":
                if len(parts) < 2:
                    raise ValueError(f"{where}: test-pans needs a reason")
                out.append(AllowEntry(kind, None, parts[1], n))
                continue
            if len(parts) < 3:
                raise ValueError(f"{where}: expected '{kind} VALUE REASON' (a reason is required)")
            value, reason = parts[1], parts[2]
            if kind == "fingerprint":
                if not _FP.fullmatch(value):
                    raise ValueError(f"{where}: not an hmac-sha256:<64 hex> fingerprint")
                out.append(AllowEntry(kind, value, reason, n))
            elif kind == "pan-iin":
                m = re.fullmatch(r"(\d{6})(?:-(\d{6}))?", value)
                if not m or int(m.group(2) or m.group(1)) < int(m.group(1)):
                    raise ValueError(f"{where}: pan-iin wants NNNNNN or NNNNNN-NNNNNN (6 digits)")
                out.append(
                    AllowEntry(kind, (int(m.group(1)), int(m.group(2) or m.group(1))), reason, n)
                )
            else:
                raise ValueError(
                    f"{where}: unknown entry {kind!r} (fingerprint, pan-iin or test-pans)"
                )
        return cls(out)

    def reason(self, f: Finding) -> str | None:
        for e in self.entries:
            if e.kind == "fingerprint" and f.fingerprint == e.value:
                return f"allowlist line {e.line}: {e.reason}"
            if e.kind == "test-pans" and f.details.get("test"):
                return f"allowlist line {e.line}: {e.reason}"
            if e.kind == "pan-iin":
                v = iin(f)
                if v is not None and e.value[0] <= v <= e.value[1]:
                    return f"allowlist line {e.line}: {e.reason}"
        return None


@dataclass
class Suppression:
    """Baseline and allowlist together."""

    baseline: Baseline | None = None
    allowlist: Allowlist | None = None

    def reason(self, f: Finding) -> str | None:
        """Why ``f`` is accepted, or None when it is to be reported."""
        for src in (self.allowlist, self.baseline):
            r = src.reason(f) if src else None
            if r:
                return r
        return None
