"""Drives a scan of many inputs: finds the images, splits them into units of work, runs the
units on a process pool (or inline), merges each image's findings.

A unit is (image spec, part): ``("all",)`` scans a whole image; for big mmapped images the
main scan is split into byte ranges of one segment, ``("range", seg, lo, hi)``, plus one
``("edges",)`` unit for the seams — the same units a distributed engine would schedule.
Workers re-open the image themselves (parsing reads only headers and tables).
"""

from __future__ import annotations

import os
import sys
import time
from collections.abc import Callable
from concurrent.futures import FIRST_COMPLETED, ProcessPoolExecutor, wait
from dataclasses import dataclass, field
from typing import Any

from parsers.base import ImageError
from parsers.registry import detect, open_image, primaries
from scanner.engine import Engine, ScanConfig, ScanResult, finalize

SPLIT_MIN = 64 * 1024 * 1024  # images smaller than this are one unit


@dataclass(frozen=True)
class ImageSpec:
    """How to open one image: its path, forced format (or None), parser options."""

    path: str
    input_format: str | None = None
    options: tuple[tuple[str, Any], ...] = ()

    def open(self):
        return open_image(self.path, self.input_format, dict(self.options))


@dataclass
class RunSummary:
    """Everything a run produced, in input order."""

    results: list[ScanResult] = field(default_factory=list)
    errors: list[str] = field(default_factory=list)  # inputs that could not be scanned at all
    skipped: int = 0  # files in directories that are not memory images
    seconds: float = 0.0

    @property
    def findings(self):
        return [f for r in self.results for f in r.findings]

    @property
    def bytes_scanned(self) -> int:
        return sum(r.bytes_scanned for r in self.results)

    @property
    def failed(self) -> bool:
        return bool(self.errors) or any(r.errors for r in self.results)


def expand_inputs(paths: list[str], summary: RunSummary) -> list[str]:
    """Files named directly, and the memory images found (by content) below directories,
    companion files folded into their image (a ``.vmem`` beside its ``.vmss`` is scanned
    once, through the ``.vmss``). Non-images inside directories are skipped and counted; a
    directory with no image at all is an error naming it. Symlinks inside directories are
    not followed."""
    out: list[str] = []
    for p in paths:
        if not os.path.isdir(p):
            out.append(p)
            continue
        found: list[str] = []
        for root, dirs, files in os.walk(p):
            dirs.sort()
            for name in sorted(files):
                fp = os.path.join(root, name)
                if os.path.islink(fp):
                    continue
                try:
                    detect(fp)
                except ImageError:
                    summary.skipped += 1
                    continue
                found.append(fp)
        if not found:
            summary.errors.append(f"{p}: no memory images found in directory")
        out += found
    return primaries(out)


# --------------------------------------------------------------------------- worker side

_WORKER: dict[str, Any] = {}


def _init_worker(config: ScanConfig) -> None:
    _WORKER["engine"] = Engine(config)
    _WORKER["open"] = None


def _worker_image(spec: ImageSpec):
    cached = _WORKER.get("open")
    if cached and cached[0] == spec:
        return cached[1]
    if cached:
        cached[1].close()
    image = spec.open()
    _WORKER["open"] = (spec, image)
    return image


def run_unit(spec: ImageSpec, part: tuple) -> ScanResult:
    """Scan one unit of work in this process (see module docstring)."""
    engine: Engine = _WORKER["engine"]
    try:
        image = _worker_image(spec)
    except ImageError as err:
        return ScanResult(image=spec.path, errors=[str(err)])
    if part[0] == "all":
        return engine.scan_image(image)
    return engine.scan_part(image, part)


# --------------------------------------------------------------------------- driver side


def plan(spec: ImageSpec, jobs: int) -> tuple[list[tuple], int]:
    """Units for one image and its guest bytes (for progress)."""
    with spec.open() as image:
        if image.random_access and jobs > 1:
            segs = image.fixed_segments or []
            total = sum(s.extents.total() for s in segs)
            size = sum(s.data.size for s in segs)
            if size >= SPLIT_MIN:
                units: list[tuple] = []
                for k, seg in enumerate(segs):
                    n = seg.data.size
                    pieces = max(1, min(jobs * 2, n // (SPLIT_MIN // 2)))
                    bounds = [n * i // pieces // 8 * 8 for i in range(pieces)] + [n]
                    units += [("range", k, a, b) for a, b in zip(bounds, bounds[1:], strict=False)]
                return units + [("edges",)], total
        total = sum(s.extents.total() for s in image.fixed_segments or [])
        return [("all",)], total or os.path.getsize(spec.path)


def run(
    specs: list[ImageSpec],
    config: ScanConfig,
    jobs: int,
    progress: Callable[[int, int], None] | None = None,
    summary: RunSummary | None = None,
) -> RunSummary:
    """Scan every image; results in input order. ``progress(done_bytes, total_bytes)``."""
    summary = summary or RunSummary()
    t0 = time.perf_counter()
    parts: dict[int, list[ScanResult]] = {}
    units: list[tuple[int, ImageSpec, tuple]] = []
    total = 0
    weights: dict[tuple[int, tuple], int] = {}
    for i, spec in enumerate(specs):
        try:
            image_units, size = plan(spec, jobs)
        except ImageError as err:
            parts[i] = [ScanResult(image=spec.path, errors=[str(err)])]
            continue
        total += size
        mains = [u for u in image_units if u[0] != "edges"]
        for u in image_units:
            units.append((i, spec, u))
            weights[(i, u)] = size // len(mains) if u in mains else 0
    done = 0
    _init_worker(config)
    if jobs <= 1 or len(units) <= 1:
        for i, spec, u in units:
            parts.setdefault(i, []).append(run_unit(spec, u))
            done += weights[(i, u)]
            if progress:
                progress(done, total)
            _release_worker()
    else:
        with ProcessPoolExecutor(
            max_workers=jobs, initializer=_init_worker, initargs=(config,)
        ) as pool:
            futs = {pool.submit(run_unit, spec, u): (i, u) for i, spec, u in units}
            pending = set(futs)
            while pending:
                finished, pending = wait(pending, return_when=FIRST_COMPLETED)
                for fut in finished:
                    i, u = futs[fut]
                    parts.setdefault(i, []).append(fut.result())
                    done += weights[(i, u)]
                    if progress:
                        progress(done, total)
    engine = _WORKER["engine"]
    for i, spec in enumerate(specs):
        summary.results.append(merge(spec.path, parts.get(i, []), engine))
    summary.seconds = time.perf_counter() - t0
    return summary


def _release_worker() -> None:
    cached = _WORKER.get("open")
    if cached:
        cached[1].close()
        _WORKER["open"] = None


def merge(path: str, results: list[ScanResult], engine: Engine) -> ScanResult:
    """One image's result from the results of its units."""
    out = ScanResult(image=path)
    raw = []
    for r in results:
        out.format = out.format or r.format
        out.meta = out.meta or r.meta
        raw += r.findings
        out.errors += [e for e in r.errors if e not in out.errors]
        out.warnings += [w for w in r.warnings if w not in out.warnings]
        out.bytes_scanned += r.bytes_scanned
    out.findings = finalize(raw, engine.subsumes)
    return out


class Progress:
    """A one-line progress bar on stderr (only when stderr is a terminal)."""

    def __init__(self, enabled: bool) -> None:
        self.enabled = enabled and sys.stderr.isatty()
        self.t0 = time.perf_counter()

    def __call__(self, done: int, total: int) -> None:
        if not self.enabled or total <= 0:
            return
        frac = min(1.0, done / total)
        rate = done / max(time.perf_counter() - self.t0, 1e-6) / 1e6
        bar = "#" * int(frac * 30)
        sys.stderr.write(
            f"\r[{bar:<30}] {frac * 100:5.1f}%  {done / 2**20:,.0f} MiB  {rate:,.0f} MB/s"
        )
        sys.stderr.flush()

    def close(self) -> None:
        if self.enabled:
            sys.stderr.write("\r" + " " * 72 + "\r")
            sys.stderr.flush()
