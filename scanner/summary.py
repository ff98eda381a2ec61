"""What a run says on stderr: its errors and warnings, then one summary paragraph."""

from __future__ import annotations

from parsers.base import mib
from scanner import dormant
from scanner.engine import ScanResult
from scanner.execute import warn
from scanner.outcome import Outcome


def diagnostics(out: Outcome, quiet: bool) -> int:
    """Errors and warnings, then (unless ``quiet``) the summary paragraph, on stderr; returns
    the exit status."""
    s = out.summary
    for msg in s.errors:
        warn(msg)
    for r in s.results:
        for msg in r.errors:
            warn(msg)
        for msg in r.warnings:
            warn(f"warning: {msg}")
    for msg in s.unreadable:
        warn(f"warning: cannot read {msg}")
    status = out.status
    if not quiet:
        warn(paragraph(out, status))
    return status


def paragraph(out: Outcome, status: int) -> str:
    """Findings per detector, the run's counts (with a state database), what was accepted,
    bytes and speed, what was skipped, inputs with errors, the exit status."""
    s = out.summary
    n = len(s.results)
    reportable = out.reportable
    by_det = dict(out.stored_counts)
    for f in reportable:
        by_det[f.detector] = by_det.get(f.detector, 0) + 1
    what = ", ".join(f"{k} {d}" for d, k in sorted(by_det.items())) or "no findings"
    parts = [f"{what} in {n} image(s)"]
    if out.changes is not None:
        new = len(out.new)
        resolved = sum(c.kind == "resolved" for c in out.changes)
        parts.append(
            f"run {out.run_id}: {len(out.scanned)} scanned, {n - len(out.scanned)} unchanged "
            f"(not rescanned), {out.removed} removed; {new} new, {resolved} resolved since the "
            "last run"
        )
    parts += dormant.summary_part(s.results)
    held = len(s.findings) - len(reportable)
    if held:
        parts.append(f"{held} accepted by baseline/allowlist")
    mb, region = out.bytes_scanned / 1e6, out.region_bytes / 1e6
    rate = mb / s.seconds if s.seconds else 0.0
    other = f" and {region:,.1f} MB of file regions outside it" if out.region_bytes else ""
    parts.append(f"{mb - region:,.1f} MB of guest memory{other} in {s.seconds:.2f} s "
                 f"({rate:,.0f} MB/s)")
    if s.skips:
        parts.append("skipped " + ", ".join(f"{k} {why}" for why, k in sorted(s.skips.items())))
    parts += coverage_parts(s.results)
    errors = len(s.errors) + sum(1 for r in s.results if r.errors)
    if errors:
        parts.append(f"{errors} input(s) with errors")
    parts.append(f"exit {status} (--fail-on {out.fail_on})")
    return "; ".join(parts) + "."


def coverage_parts(results: list[ScanResult]) -> list[str]:
    """What the summary says of guest memory the formats leave out on purpose (kdump
    filtering, filtered ELF dumps) and of files scanned as raw because nothing recognised
    them (their addresses are file offsets)."""
    parts = []
    excluded = [r.meta["coverage"].get("excluded", 0) for r in results if "coverage" in r.meta]
    if any(excluded):
        parts.append(f"{mib(sum(excluded))} of guest memory excluded on purpose by the dump "
                     f"format in {sum(map(bool, excluded))} image(s) (see vmleak info)")
    raw = sum(1 for r in results if r.meta.get("unrecognised"))
    if raw:
        parts.append(f"{raw} image(s) scanned as raw only because no known format recognised "
                     "them (addresses are file offsets)")
    return parts
