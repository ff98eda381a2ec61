"""What one scan or report run produced (:class:`Outcome`) and the exit-status rules.

Exit status (like grep and the secret scanners): 0 nothing found, 1 findings, 2 an error
(an input that could not be read, wholly or in part; what was readable is still reported).
``info`` and ``extract`` follow the same rule: 2 when part of the image is damaged (a
``parsers.base.is_damage`` problem), else 0.
``--fail-on new|any|none`` chooses what "findings" means for status 1: findings not seen by
earlier runs (state database) nor accepted (baseline/allowlist), any finding not accepted
(the default), or nothing (status 0 unless an error).
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from functools import cached_property
from typing import TYPE_CHECKING, Any

from scanner.baseline import Suppression
from scanner.engine import ScanConfig
from scanner.findings import Finding
from scanner.runner import RunSummary

if TYPE_CHECKING:  # the state database loads only when used (start-up time)
    from scanner.state import Change

EXIT_CLEAN, EXIT_FOUND, EXIT_ERROR = 0, 1, 2
#: what ``--fail-on`` may say (see module docstring)
FAIL_ON = ("new", "any", "none")


@dataclass
class Outcome:
    """What one scan invocation produced, for the printers and the exit status."""

    summary: RunSummary
    config: ScanConfig
    key: bytes
    started: str
    argv: list[str] = field(default_factory=list)  # the command line, as the user typed it
    fail_on: str = "any"  # one of FAIL_ON
    ended: str = ""
    started_ns: int = field(default_factory=time.time_ns)  # precise start, for mtime checks
    scanned: set[str] = field(default_factory=set)  # images (re)scanned this run
    changes: list[Change] | None = None  # None: no state database used
    run_id: int | None = None
    state_path: str | None = None
    suppress: Suppression = field(default_factory=Suppression)
    removed: int = 0
    #: findings of unchanged images left in the database, per detector: a nightly run that
    #: prints only changes, with nothing to suppress, needs their number, not themselves
    stored_counts: dict[str, int] = field(default_factory=dict)

    def reason(self, f: Finding) -> str | None:
        """Why ``f`` is accepted (baseline/allowlist), or None when it is reportable."""
        return self.suppress.reason(f)

    # all read after the run, several times each (summary, exit status, printers)
    @cached_property
    def reportable(self) -> list[Finding]:
        return [f for f in self.summary.findings if not self.reason(f)]

    @cached_property
    def new(self) -> list[Finding]:
        """Reportable findings that are new: vs the state when one is used, else every
        reportable one (then only a baseline/allowlist separates old from new)."""
        if self.changes is None:
            return self.reportable
        keys = {(c.image, c.detector, c.fingerprint) for c in self.changes if c.kind == "new"}
        return [f for f in self.reportable if (f.image, f.detector, f.fingerprint) in keys]

    @cached_property
    def shown_changes(self) -> list[Change]:
        """The changes a ``--since-last`` run prints: every resolved finding, and the new
        ones that are reportable (not accepted by a baseline or allowlist)."""
        reportable_new = {(f.image, f.detector, f.fingerprint) for f in self.new}
        return [
            c
            for c in self.changes or []
            if c.kind == "resolved" or (c.image, c.detector, c.fingerprint) in reportable_new
        ]

    @property
    def status(self) -> int:
        """The exit status (module docstring)."""
        if self.summary.failed:
            return EXIT_ERROR
        if self.fail_on == "none":
            return EXIT_CLEAN
        hits = self.new if self.fail_on == "new" else self.reportable or self.stored_counts
        return EXIT_FOUND if hits else EXIT_CLEAN

    @property
    def bytes_scanned(self) -> int:
        """Bytes scanned by this run, guest memory and file regions (images reused from the
        state database excluded)."""
        return sum(r.bytes_scanned for r in self.summary.results if r.image in self.scanned)

    @property
    def region_bytes(self) -> int:
        """Of :attr:`bytes_scanned`, the bytes of file regions outside guest memory."""
        return sum(r.region_bytes for r in self.summary.results if r.image in self.scanned)

    def stats(self) -> dict[str, Any]:
        """The run's counts, as the state database records them."""
        s = self.summary
        changes = self.changes or []
        return {
            "images": len(s.results),
            "scanned": len(self.scanned),
            "unchanged": len(s.results) - len(self.scanned),
            "removed": self.removed,
            "findings": len(s.findings) + sum(self.stored_counts.values()),
            "new": sum(c.kind == "new" for c in changes),
            "resolved": sum(c.kind == "resolved" for c in changes),
            "errors": len(s.errors) + sum(len(r.errors) for r in s.results),
            "skipped": dict(s.skips),
            "bytes_scanned": self.bytes_scanned,
        }
