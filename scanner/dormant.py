"""Dormant images: saved states older than ``--dormant-days`` (default 90), which have fallen
off the patch cycle and still hold whatever was in memory when they were saved.

An image's age is measured from the guest's clock at save (``meta["guest_clock"]``,
parsers/clock.py) where the format records it, else from its file's modification time. A
dormant image carries ``meta["dormant"]`` (age in days, the time measured from, its source and
the threshold) and each of its findings ``details.dormant_days``; the summary counts such
images and the evidence report lists them.
"""

from __future__ import annotations

import os
import time
from typing import Any

from parsers import clock
from scanner.engine import ScanResult

DEFAULT_DAYS = 90
DAY = 86400.0


def file_mtime(path: str) -> str | None:
    """The file's modification time, ISO-8601 UTC (None when it cannot be read)."""
    try:
        return clock.iso(os.stat(path).st_mtime)
    except OSError:
        return None


def age(meta: dict[str, Any], path: str, now: float | None = None) -> dict[str, Any] | None:
    """How old the saved state is: ``{"age_days", "since", "source"}`` (source
    ``guest_clock`` or ``file_mtime``), or None when neither is known."""
    since, source = meta.get("guest_clock"), "guest_clock"
    if not since:
        since, source = file_mtime(path), "file_mtime"
    if not since:
        return None
    now = time.time() if now is None else now
    return {"age_days": int((now - clock.parse(since)) // DAY), "since": since, "source": source}


def mark(result: ScanResult, days: int, now: float | None = None) -> None:
    """Mark ``result`` dormant when its image is older than ``days`` days (see module
    docstring); an image that is not loses any earlier mark."""
    result.meta.pop("dormant", None)
    a = age(result.meta, result.image, now) if result.format else None
    if a is None or a["age_days"] <= days:
        for f in result.findings:
            f.details.pop("dormant_days", None)
        return
    result.meta["dormant"] = {**a, "threshold_days": days}
    for f in result.findings:
        f.details["dormant_days"] = a["age_days"]


def dormant(results: list[ScanResult]) -> list[dict[str, Any]]:
    """The dormant images of a run: image path plus its ``meta["dormant"]``, oldest first."""
    out = [{"image": r.image, **r.meta["dormant"]} for r in results if "dormant" in r.meta]
    return sorted(out, key=lambda d: -d["age_days"])


def html(listed: list[dict[str, Any]], esc: Any) -> list[str]:
    """The evidence report's section on dormant images (``esc`` escapes text for HTML)."""
    if not listed:
        return []
    out = [
        "<h2>Dormant images</h2><p>Saved more than "
        f"{listed[0]['threshold_days']} days ago (guest clock at save, else file time):</p>",
        "<table><tr><th>Image</th><th>Age (days)</th><th>Saved</th><th>From</th></tr>",
    ]
    out += [
        f"<tr><td class='mono'>{esc(d['image'])}</td><td class='n'>{d['age_days']}</td>"
        f"<td>{esc(d['since'])}</td><td>{esc(d['source'])}</td></tr>"
        for d in listed
    ]
    out.append("</table>")
    return out


def summary_part(results: list[ScanResult]) -> list[str]:
    """The summary paragraph's words on dormant images (none when there are none)."""
    listed = dormant(results)
    if not listed:
        return []
    return [f"{len(listed)} dormant image(s) (saved over {listed[0]['threshold_days']} days ago)"]
