"""In-process timing of ``Engine.scan_image`` for the format benchmarks (no interpreter
start-up: they compare two containers of the same guest memory)."""

from __future__ import annotations

import statistics
import time

from parsers import registry
from scanner.engine import Engine


def timed(
    engine: Engine, path: str, fmt: str | None, repeat: int, count_open: bool
) -> tuple[float, int, list]:
    """(median seconds of ``repeat`` runs after a warm-up run that also fills the page cache,
    guest bytes scanned, findings) of scanning ``path``; with ``count_open`` the time includes
    opening the image (a stream's record walk)."""
    times, result = [], None
    for k in range(repeat + 1):
        t0 = time.perf_counter()
        with registry.open_image(path, fmt) as image:
            if not count_open:
                t0 = time.perf_counter()
            result = engine.scan_image(image)
            if k:
                times.append(time.perf_counter() - t0)
    assert result is not None
    if result.errors:
        raise SystemExit(f"{path}: {result.errors}")
    return statistics.median(times), result.bytes_scanned, result.findings
