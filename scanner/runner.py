"""Drives a scan of many inputs: finds the images, runs their units of work
(``scanner.units``) on a backend — inline, a local process pool, or a Dask cluster
(``scanner.fleet``) — and merges each image's findings as soon as its units are back.

Each image is parsed once, by the worker that runs its OPEN unit; that worker scans it whole
or returns the layout and units of a large random-access image (``scanner.units``), which the
driver then submits. The fingerprint key and detectors reach each worker process once
(``install``), never with each unit.
"""

from __future__ import annotations

import fnmatch
import os
import stat
import sys
import threading
import time
import uuid
from collections import Counter
from collections.abc import Callable, Iterator
from concurrent.futures import Future
from dataclasses import dataclass, field
from typing import Any, Protocol

from parsers.base import ImageError, MemoryImage
from parsers.registry import detect, open_image, primaries
from scanner.engine import Engine, ScanConfig, ScanResult, finalize
from scanner.pool import Pool, WorkerDied
from scanner.units import EDGES, OPEN, RANGE, Layout, Unit, gpa_ranges

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
    #: image -> guest-physical ranges [start, end) it holds (None: streamed, or not opened)
    coverage: dict[str, list[tuple[int, int]] | None] = field(default_factory=dict)
    not_scanned: int = 0  # images left out because the backend was lost (run cut short)
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

_CONFIGS: dict[str, ScanConfig] = {}  # run token -> configuration, installed once per process
_ENGINES = threading.local()  # per thread: run token -> Engine (an Engine is not thread-safe)


def install(token: str, config: ScanConfig) -> None:
    """Make run ``token``'s configuration (detectors, fingerprint key) known to this process."""
    _CONFIGS[token] = config


def uninstall(token: str) -> None:
    """Forget run ``token`` in this process."""
    _CONFIGS.pop(token, None)
    getattr(_ENGINES, "by_token", {}).pop(token, None)


def _engine(token: str) -> Engine:
    engines = _ENGINES.__dict__.setdefault("by_token", {})
    if token not in engines:
        engines[token] = Engine(_CONFIGS[token])
    return engines[token]


@dataclass
class Opened:
    """What an OPEN unit gives back: the image's files, its guest bytes (file bytes for a
    stream), its guest-physical coverage, and either its ``result`` (scanned whole) or the
    ``layout`` and ``units`` still to run."""

    files: list[str]
    total: int
    coverage: list[tuple[int, int]] | None = None
    result: ScanResult | None = None
    layout: Layout | None = None
    units: list[Unit] = field(default_factory=list)


def plan(image: MemoryImage, pieces: int) -> list[Unit]:
    """The RANGE and EDGES units of a random-access image of at least SPLIT_MIN buffer bytes,
    each segment cut into at most ``pieces`` ranges; [] when it is better scanned whole."""
    segs = image.fixed_segments or []
    if pieces < 2 or not image.random_access or sum(s.data.size for s in segs) < SPLIT_MIN:
        return []
    units: list[Unit] = []
    for k, seg in enumerate(segs):
        n = seg.data.size
        cuts = max(1, min(pieces, n // (SPLIT_MIN // 2)))
        bounds = [n * i // cuts // 8 * 8 for i in range(cuts)] + [n]
        units += [Unit(RANGE, k, a, b) for a, b in zip(bounds, bounds[1:], strict=False)]
    return [*units, Unit(EDGES)]


def open_task(token: str, spec: ImageSpec, pieces: int) -> Opened:
    """Run an image's OPEN unit here: parse it, then scan it whole or plan its units (split
    into at most ``pieces`` ranges per segment). An image that cannot be opened comes back as
    a result holding the error."""
    try:
        image = spec.open()
    except ImageError as err:
        return Opened([spec.path], 0, result=ScanResult(image=spec.path, errors=[str(err)]))
    with image:
        files = list(image.files) or [spec.path]
        total = sum(s.extents.total() for s in image.fixed_segments or [])
        opened = Opened(files, total or os.path.getsize(spec.path))
        units = plan(image, pieces)
        layout = Layout.of(image) if units else None
        if layout is None:
            opened.result = _engine(token).scan_image(image)
        else:
            opened.layout, opened.units = layout, units
        # after the scan: a stream's ranges (one per run of stored pages) are not held
        # through it, so they do not add to its peak RSS
        opened.coverage = gpa_ranges(image)
    return opened


def unit_task(token: str, layout: Layout, unit: Unit) -> ScanResult:
    """Run a RANGE or EDGES unit here, on the image mapped again from ``layout``."""
    try:
        image = layout.open()
    except ImageError as err:
        return ScanResult(image=layout.path, errors=[str(err)])
    with image:
        return _engine(token).scan_part(image, unit)


# --------------------------------------------------------------------------- backends


class BackendLost(Exception):
    """The backend can run nothing more (a Dask scheduler gone): what came back is kept."""


class Backend(Protocol):
    """Runs tasks (``open_task``/``unit_task``) somewhere. ``submit`` takes the task, its
    arguments after the run token, and a label (Dask key); ``completed`` yields
    (handle, result, error) of finished tasks, at least one per call, blocking until then,
    and raises BackendLost when nothing more can come back; ``explain`` turns the error of a
    task into an input error of its image when the cause lies outside vmleak (a worker
    killed, e.g. by its memory limit), or None when it is a bug (then it is raised)."""

    #: ranges per segment to cut a large image into (about twice the parallel slots)
    pieces: int
    note: str  # shown by the progress bar (the cluster's workers)

    def submit(self, fn: Any, args: tuple, label: str) -> Any: ...

    def completed(self, handles: set[Any]) -> Iterator[tuple[Any, Any, BaseException | None]]: ...

    def explain(self, error: BaseException) -> str | None: ...

    def close(self) -> None: ...


class LocalBackend:
    """This machine: tasks run on a pool of ``jobs`` worker processes (``scanner.pool``),
    started on first need, even for one job: a worker killed by a signal (SIGBUS when a
    mapped image file is truncated during the scan) then costs only the image it was
    reading, never the run."""

    def __init__(self, token: str, config: ScanConfig, jobs: int) -> None:
        self.token, self.config, self.jobs = token, config, jobs
        self.pieces = jobs * 2 if jobs > 1 else 1
        self.note = ""
        self.pool = Pool(max(1, jobs), install, (token, config))

    def submit(self, fn: Any, args: tuple, label: str) -> Future:
        return self.pool.submit(fn, self.token, *args)

    def completed(self, handles: set[Any]) -> Iterator[tuple[Any, Any, BaseException | None]]:
        done = [f for f in handles if f.done()]
        while not done:
            self.pool.wait()
            done = [f for f in handles if f.done()]
        for fut in done:
            yield fut, None if fut.exception() else fut.result(), fut.exception()

    def explain(self, error: BaseException) -> str | None:
        if not isinstance(error, WorkerDied):
            return None
        guess = {"SIGBUS": "file truncated during the scan?", "SIGKILL": "out of memory?"}
        why = f"{error}: {guess[error.signal]}" if error.signal in guess else str(error)
        return f"the worker process reading it died ({why})"

    def close(self) -> None:
        self.pool.shutdown()


# --------------------------------------------------------------------------- driver side


def run(
    specs: list[ImageSpec],
    config: ScanConfig,
    jobs: int = 1,
    progress: Progress | None = None,
    summary: RunSummary | None = None,
    on_result: Callable[[ScanResult], None] | None = None,
    backend: Backend | None = None,
) -> RunSummary:
    """Scan every image; results in input order. ``on_result(result)`` is called as soon as
    each image is complete (so a caller can store it before the next one finishes), in
    completion order. Runs on ``backend`` (the caller's to close), else on this machine
    with ``jobs`` processes. When the backend is lost, images not complete are left out of the
    results and an error says how many."""
    summary = summary or RunSummary()
    t0 = time.perf_counter()
    own = backend is None
    backend = backend or LocalBackend(uuid.uuid4().hex, config, jobs)
    subsumes = {d.name: set(d.subsumes) for d in config.detectors}  # as Engine.subsumes
    parts: dict[int, list[ScanResult]] = {}
    merged: dict[int, ScanResult] = {}
    left: dict[int, int] = {}  # units of each image still out
    sizes = {i: _size(s.path) for i, s in enumerate(specs)}  # estimates until opened
    # each image's files and their sizes when planned: an error of a worker that died can say
    # which one changed since (truncated on the datastore during the scan)
    planned = {i: {s.path: sizes[i]} for i, s in enumerate(specs)}
    handles: dict[Any, tuple[int, Unit]] = {}
    done_bytes = 0

    def submit(i: int, fn: Any, args: tuple, unit: Unit) -> None:
        label = f"vmleak-{unit}-{os.path.basename(specs[i].path)}-{i}"
        handles[backend.submit(fn, args, label)] = (i, unit)
        left[i] = left.get(i, 0) + 1

    def finish(i: int) -> None:
        merged[i] = merge(specs[i].path, parts.pop(i, []), subsumes)
        if on_result:
            on_result(merged[i])

    try:
        for i, spec in enumerate(specs):
            submit(i, open_task, (spec, backend.pieces), Unit(OPEN))
        while handles:
            for handle, value, error in backend.completed(set(handles)):
                i, unit = handles.pop(handle)
                left[i] -= 1
                if error is not None:
                    why = backend.explain(error)
                    if why is None:
                        raise error
                    path = specs[i].path
                    why = f"{path}: {unit} unit not completed: {why}{_resized(path, planned[i])}"
                    value = ScanResult(image=path, errors=[why])
                if isinstance(value, Opened):
                    summary.files[specs[i].path] = value.files
                    summary.coverage[specs[i].path] = value.coverage
                    sizes[i] = value.total
                    if value.result is None:
                        assert value.layout is not None
                        planned[i] = {f: st[0] for f, st in value.layout.stamps.items()}
                        for u in value.units:
                            submit(i, unit_task, (value.layout.for_unit(u), u), u)
                        continue
                    value = value.result
                parts.setdefault(i, []).append(value)
                done_bytes += value.bytes_scanned
                if not left[i]:
                    finish(i)
                if progress and progress.enabled:
                    progress(done_bytes, sum(sizes.values()), len(merged), len(specs), backend.note)
    except BackendLost as err:
        summary.not_scanned = len(specs) - len(merged)
        summary.errors.append(f"{err}; {summary.not_scanned} image(s) not scanned")
    finally:
        if own:
            backend.close()
    summary.results += [merged[i] for i in range(len(specs)) if i in merged]
    summary.seconds = time.perf_counter() - t0
    return summary


def _size(path: str) -> int:
    try:
        return os.path.getsize(path)
    except OSError:
        return 0


def _resized(path: str, planned: dict[str, int]) -> str:
    """A note ``; FILE is now N bytes, M when the scan began`` for each of ``planned``'s files
    (file -> size in bytes) whose size changed since (``it`` for the image file ``path``
    itself); "" when none did."""
    notes = []
    for f, was in planned.items():
        try:
            now = f"now {os.path.getsize(f):,} bytes"
        except OSError as err:
            now = f"now {err.strerror or err}"
        if now != f"now {was:,} bytes":
            notes.append(f"{'it' if f == path else f} is {now}, {was:,} when the scan began")
    return "".join(f"; {n}" for n in notes)


def merge(path: str, results: list[ScanResult], subsumes: dict[str, set[str]]) -> ScanResult:
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
        out.region_bytes += r.region_bytes
    out.findings = finalize(raw, subsumes)
    return out


class Progress:
    """A one-line progress bar on stderr (only when stderr is a terminal)."""

    def __init__(self, enabled: bool) -> None:
        self.enabled = enabled and sys.stderr.isatty()
        self.t0 = time.perf_counter()
        self.width = 0

    def __call__(
        self, done: int, total: int, images: int = 0, of: int = 0, note: str = ""
    ) -> None:
        """``done`` of ``total`` guest bytes, ``images`` of ``of`` images complete."""
        if not self.enabled or total <= 0:
            return
        frac = min(1.0, done / total)
        rate = done / max(time.perf_counter() - self.t0, 1e-6) / 1e6
        bar = "#" * int(frac * 30)
        line = (
            f"[{bar:<30}] {frac * 100:5.1f}%  {done / 2**20:,.0f} MiB  {rate:,.0f} MB/s  "
            f"{images}/{of} images{'  ' + note if note else ''}"
        )
        self.width = max(self.width, len(line))
        sys.stderr.write("\r" + line)
        sys.stderr.flush()

    def close(self) -> None:
        if self.enabled:
            sys.stderr.write("\r" + " " * self.width + "\r")
            sys.stderr.flush()
