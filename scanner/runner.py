"""Drives a scan of many inputs: finds the images, splits them into units of work, runs the
units on a process pool (or inline), merges each image's findings.

A unit is (image spec, part): ``("all",)`` scans a whole image; for big mmapped images the
main scan is split into byte ranges of one segment, ``("range", seg, lo, hi)``, plus one
``("edges",)`` unit for the seams — the same units a distributed engine would schedule.
Workers re-open the image themselves (parsing reads only headers and tables).
"""

from __future__ import annotations

import fnmatch
import os
import stat
import sys
import time
from collections import Counter
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
    skips: Counter = field(default_factory=Counter)  # files passed over in directories, by why
    unreadable: list[str] = field(default_factory=list)  # files in directories we could not read
    files: dict[str, list[str]] = field(default_factory=dict)  # image -> every file it used
    empty_dirs: list[str] = field(default_factory=list)  # directories given that held no image
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


SKIP_NOT_IMAGE = "non-image files"
SKIP_EXCLUDED = "excluded by --include/--exclude"
SKIP_SYMLINK_OUT = "symlinks leading out of the tree"
SKIP_BROKEN_LINK = "broken symlinks"
SKIP_SPECIAL = "FIFOs, sockets and devices"
SKIP_DUPLICATE = "second names of the same file"
SKIP_UNREADABLE = "unreadable files"


@dataclass(frozen=True)
class WalkOptions:
    """How directories are walked. Glob patterns containing ``/`` are matched against the path
    relative to the directory named on the command line, others against the file name alone;
    an ``exclude`` matching a directory prunes it; with ``include`` given, only files matching
    one of them are considered. Symlinks are followed only while they stay inside the tree,
    unless ``follow_symlinks``."""

    include: tuple[str, ...] = ()
    exclude: tuple[str, ...] = ()
    follow_symlinks: bool = False

    def _match(self, patterns: tuple[str, ...], rel: str) -> bool:
        name = rel.rsplit("/", 1)[-1]
        return any(fnmatch.fnmatchcase(rel if "/" in p else name, p) for p in patterns)

    def excluded(self, rel: str) -> bool:
        return self._match(self.exclude, rel)

    def selected(self, rel: str) -> bool:
        return not self.excluded(rel) and (not self.include or self._match(self.include, rel))


def expand_inputs(
    paths: list[str],
    summary: RunSummary,
    walk: WalkOptions | None = None,
    known: dict[str, tuple[int, int, int, int]] | None = None,
) -> list[str]:
    """Files named directly, and the memory images found (by content) below directories,
    companion files folded into their image (a ``.vmem`` beside its ``.vmss`` is scanned
    once, through the ``.vmss``). Inside directories, files that are not images are skipped
    and counted by reason in ``summary.skips`` (unreadable ones also listed); a directory with
    no image at all is an error naming it. See :class:`WalkOptions` for globs and symlinks.
    ``known`` maps image files recorded by the state database to their (size, mtime_ns,
    ctime_ns, inode): such a file with the same stat is taken as an image without reading it
    (an unchanged nightly run then reads nothing)."""
    walk = walk or WalkOptions()
    out: list[str] = []
    for p in paths:
        if not os.path.isdir(p):
            out.append(p)
            continue
        found = _walk_tree(p, walk, summary, known or {})
        if not found:
            summary.errors.append(f"{p}: no memory images found in directory")
            summary.empty_dirs.append(p)
        out += found
    return primaries(out)


def inside(path: str, roots: list[str] | tuple[str, ...]) -> bool:
    """True when ``path`` is one of ``roots`` or lies below one (compared as absolute paths,
    symlinks not resolved)."""
    p = os.path.abspath(path)
    for r in roots:
        r = os.path.abspath(r)
        if p == r or p.startswith(r.rstrip(os.sep) + os.sep):
            return True
    return False


def _walk_tree(
    top: str, walk: WalkOptions, summary: RunSummary, known: dict[str, tuple[int, int, int, int]]
) -> list[str]:
    """Memory images below ``top``, depth first in name order. Every directory and file is
    visited once (by device and inode), so symlink loops and hard links cost nothing."""
    root_real = os.path.realpath(top)
    seen: set[tuple[int, int]] = set()
    found: list[str] = []
    stack = [top]
    while stack:
        d = stack.pop()
        try:
            st = os.stat(d)
            if (st.st_dev, st.st_ino) in seen:
                continue
            seen.add((st.st_dev, st.st_ino))
            entries = sorted(os.scandir(d), key=lambda e: e.name)
        except OSError as exc:
            summary.skips[SKIP_UNREADABLE] += 1
            summary.unreadable.append(f"{d}: {exc.strerror or exc}")
            continue
        subdirs = []
        for e in entries:
            rel = os.path.relpath(e.path, top).replace(os.sep, "/")
            try:
                if e.is_symlink():
                    target = os.path.realpath(e.path)
                    if not walk.follow_symlinks and not inside(target, [root_real]):
                        summary.skips[SKIP_SYMLINK_OUT] += 1
                        continue
                    if not os.path.exists(target):
                        summary.skips[SKIP_BROKEN_LINK] += 1
                        continue
                    est = os.stat(e.path)
                else:
                    est = e.stat(follow_symlinks=False)
            except OSError as exc:
                summary.skips[SKIP_UNREADABLE] += 1
                summary.unreadable.append(f"{e.path}: {exc.strerror or exc}")
                continue
            if stat.S_ISDIR(est.st_mode):
                if walk.excluded(rel):
                    summary.skips[SKIP_EXCLUDED] += 1
                else:
                    subdirs.append(e.path)
            elif not stat.S_ISREG(est.st_mode):
                summary.skips[SKIP_SPECIAL] += 1
            elif not walk.selected(rel):
                summary.skips[SKIP_EXCLUDED] += 1
            elif (est.st_dev, est.st_ino) in seen:
                summary.skips[SKIP_DUPLICATE] += 1
            else:
                seen.add((est.st_dev, est.st_ino))
                stamp = (est.st_size, est.st_mtime_ns, est.st_ctime_ns, est.st_ino)
                if known.get(os.path.abspath(e.path)) == stamp:
                    found.append(e.path)  # recorded as an image, untouched since
                else:
                    _classify(e.path, summary, found)
        stack += reversed(subdirs)
    return found


def _classify(path: str, summary: RunSummary, found: list[str]) -> None:
    """Add ``path`` to ``found`` if its content is a memory image; count it otherwise."""
    try:
        with open(path, "rb"):
            pass  # an unreadable file is not "not an image": it is listed, not just counted
    except OSError as exc:
        summary.skips[SKIP_UNREADABLE] += 1
        summary.unreadable.append(f"{path}: {exc.strerror or exc}")
        return
    try:
        detect(path)
    except ImageError:
        summary.skips[SKIP_NOT_IMAGE] += 1
        return
    found.append(path)


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


def plan(spec: ImageSpec, jobs: int) -> tuple[list[tuple], int, list[str]]:
    """Units for one image, its guest bytes (for progress) and every file it uses."""
    with spec.open() as image:
        files = list(image.files) or [spec.path]
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
                return units + [("edges",)], total, files
        total = sum(s.extents.total() for s in image.fixed_segments or [])
        return [("all",)], total or os.path.getsize(spec.path), files


def run(
    specs: list[ImageSpec],
    config: ScanConfig,
    jobs: int,
    progress: Callable[[int, int], None] | None = None,
    summary: RunSummary | None = None,
    on_result: Callable[[ScanResult], None] | None = None,
) -> RunSummary:
    """Scan every image; results in input order. ``progress(done_bytes, total_bytes)``;
    ``on_result(result)`` is called as soon as each image is complete (so a caller can store
    it before the next one finishes), in completion order."""
    summary = summary or RunSummary()
    t0 = time.perf_counter()
    parts: dict[int, list[ScanResult]] = {}
    merged: dict[int, ScanResult] = {}
    units: list[tuple[int, ImageSpec, tuple]] = []
    left: dict[int, int] = {}  # units of each image still to finish
    total = 0
    weights: dict[tuple[int, tuple], int] = {}
    _init_worker(config)
    engine = _WORKER["engine"]

    def finish(i: int) -> None:
        merged[i] = merge(specs[i].path, parts.get(i, []), engine)
        if on_result:
            on_result(merged[i])

    for i, spec in enumerate(specs):
        try:
            image_units, size, files = plan(spec, jobs)
        except ImageError as err:
            parts[i] = [ScanResult(image=spec.path, errors=[str(err)])]
            finish(i)
            continue
        summary.files[spec.path] = files
        total += size
        mains = [u for u in image_units if u[0] != "edges"]
        left[i] = len(image_units)
        for u in image_units:
            units.append((i, spec, u))
            weights[(i, u)] = size // len(mains) if u in mains else 0
    done = 0

    def collect(i: int, u: tuple, result: ScanResult) -> None:
        nonlocal done
        parts.setdefault(i, []).append(result)
        done += weights[(i, u)]
        if progress:
            progress(done, total)
        left[i] -= 1
        if not left[i]:
            finish(i)

    if jobs <= 1 or len(units) <= 1:
        for i, spec, u in units:
            result = run_unit(spec, u)
            _release_worker()
            collect(i, u, result)
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
                    collect(i, u, fut.result())
    summary.results += [merged[i] for i in range(len(specs))]
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
