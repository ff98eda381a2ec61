"""One scan or report run, from its parameters to its :class:`~scanner.outcome.Outcome`:
find the images, decide with the state database (when one is used) which need scanning,
scan them, record each in the database as soon as it is complete, and hand every result to
the run's printers."""

from __future__ import annotations

import json
import os
import sys
from collections.abc import Sequence
from datetime import datetime, timezone

import click

from patterns.registry import select
from patterns.yara import yara_detectors
from scanner import dormant
from scanner.baseline import Allowlist, Baseline, Suppression
from scanner.engine import ScanConfig, ScanResult
from scanner.findings import load_key
from scanner.outcome import Outcome
from scanner.params import ScanParams
from scanner.printers import Printer
from scanner.runner import (
    Backend,
    ImageSpec,
    Progress,
    RunSummary,
    WalkOptions,
    expand_inputs,
    run,
)


def warn(msg: str) -> None:
    """A line on stderr, prefixed ``vmleak:``."""
    click.echo(f"vmleak: {msg}", err=True)


def config_signature(config: ScanConfig, input_format: str | None, snapshot: str | None) -> str:
    """What makes two scans of the same bytes comparable (detectors and their versions,
    threshold, forced format, snapshot choice)."""
    return json.dumps(
        {
            "detectors": sorted([d.name, d.version] for d in config.detectors),
            "min_confidence": config.min_confidence,
            "input_format": input_format,
            "snapshot": snapshot,
        },
        sort_keys=True,
    )


def argv() -> list[str]:
    """The command line as the user typed it (``vmleak`` however it was started)."""
    return ["vmleak", *sys.argv[1:]]


def now() -> str:
    """The time, UTC, ISO 8601 to the second."""
    return datetime.now(timezone.utc).isoformat(timespec="seconds")


def execute(
    p: ScanParams, printers: Sequence[Printer] = (), rescan_all: bool = False
) -> Outcome:
    """Find the images, scan what needs scanning (all of it with ``rescan_all``) locally or
    on Dask (``p.dask``), record it in the state database when one is used, and give the
    printers everything (with ``p.since_last``, the findings of unchanged images are counted,
    not read back, unless a baseline or allowlist has to judge them)."""
    if p.dask and p.jobs:
        raise click.UsageError("--jobs and --dask exclude each other")
    try:
        dets = select(p.detectors)
    except ValueError as err:
        raise click.BadParameter(str(err), param_hint="--detectors") from None
    dets += yara_detectors(p.yara, p.yara_max_len)  # rule errors stop us before any image
    if p.yara:
        # yara-x's Python binding shows no rule's condition (1.23: Rules has scan, serialize
        # and imports only), so rules needing only their strings cannot be told apart: always
        warn(
            "note: --yara: each rule's condition is evaluated per scanned window (a chunk of "
            f"{p.chunk_size / 2**20:g} MiB or a batch of seam windows), not per image: "
            "filesize, at/in offsets and strings farther apart than a window do not mean "
            "what they mean on a file"
        )
    key = load_key(p.fingerprint_key_file)
    if p.unmask:
        warn("WARNING: --unmask given: full secret values are shown")
    config = ScanConfig(dets, key, p.unmask, p.chunk_size, p.min_confidence)
    if p.baseline_file or p.state_path or p.since_last or p.full or p.fail_on == "new":
        # the state module (sqlite) loads only when used: start-up time
        from scanner.state import default_path, key_check
    suppress = Suppression(
        Baseline.load(p.baseline_file, key_check(key)) if p.baseline_file else None,
        Allowlist.load(p.allowlist_file) if p.allowlist_file else None,
    )
    out = Outcome(RunSummary(), config, key, now(), argv(), p.fail_on or "any", suppress=suppress)
    state_path = p.state_path
    if state_path is None and p.implies_state:
        state_path = str(default_path())
    backend = None
    if p.dask:  # before the walk and the state lock: a bad address fails at once
        from scanner.fleet import DaskBackend

        backend = DaskBackend(p.dask, config, p.dask_timeout)
    try:
        job = _Job(p, out, backend, printers)
        if state_path is None:
            job.plain()
        else:
            job.with_state(state_path, rescan_all)
    finally:
        if backend is not None:
            backend.close()
    for printer in printers:
        printer.finish(out)
    return out


class _Job:
    """The scanning part of one run (``execute``), without a state database or with one."""

    def __init__(
        self, p: ScanParams, out: Outcome, backend: Backend | None, printers: Sequence[Printer]
    ) -> None:
        self.p, self.out, self.backend = p, out, backend
        self.sinks = list(printers)
        self.bar = Progress(p.progress)

    def _walk(self, inputs: list[str], known: dict | None) -> list[ImageSpec]:
        p = self.p
        walk = WalkOptions(p.include, p.exclude, p.follow_symlinks)
        paths = expand_inputs(inputs, self.out.summary, walk, known)
        return [ImageSpec(x, p.input_format, p.image_options) for x in paths]

    def _scan(self, specs: list[ImageSpec]) -> None:
        def each(result: ScanResult) -> None:
            dormant.mark(result, self.p.dormant_days)
            for printer in self.sinks:
                printer.image(result)

        jobs = self.p.jobs or os.cpu_count() or 1
        run(specs, self.out.config, jobs, self.bar, self.out.summary, each, self.backend)
        self.bar.close()

    def plain(self) -> None:
        """Scan every image found; nothing remembered."""
        specs = self._walk(list(self.p.inputs), None)
        for printer in self.sinks:
            printer.begin(self.out)
        self._scan(specs)
        self.out.scanned = {r.image for r in self.out.summary.results}
        self.out.ended = now()

    def with_state(self, state_path: str, rescan_all: bool) -> None:
        """Scan what the state database does not hold as current (everything with
        ``rescan_all``), store each image as it completes, read the rest back, and record
        what was removed."""
        from scanner.printers.state import StateWriter
        from scanner.state import StateDB

        p, out, summary = self.p, self.out, self.out.summary
        # images are remembered by absolute path: cron may start us anywhere
        inputs = [os.path.abspath(x) for x in p.inputs]
        known = None
        if not rescan_all and os.path.exists(state_path):
            with StateDB(state_path, out.key) as db:  # recorded, untouched images are not reread
                known = db.known_images()
        specs = self._walk(inputs, known)
        paths = [s.path for s in specs]
        out.state_path = state_path
        signature = config_signature(out.config, p.input_format, p.snapshot)
        with StateDB(state_path, out.key, writer=True, lock_wait=p.lock_wait) as db:
            writer = StateWriter(db, signature, {d.name for d in out.config.detectors})
            self.sinks.insert(0, writer)  # stored before any other printer sees the image
            for printer in self.sinks:
                printer.begin(out)
            fresh = [s for s in specs if rescan_all or not db.is_current(s.path, signature)]
            fresh_paths = {s.path for s in fresh}
            reused = [x for x in paths if x not in fresh_paths]
            db.touch(out.run_id, reused)
            if reused and p.unmask:
                warn(
                    f"note: {len(reused)} unchanged image(s) are shown from the state database, "
                    "masked (it never stores values); --full rescans them"
                )
            self._scan(fresh)
            by_path = {r.image: r for r in summary.results}
            stored: dict[str, list] = {}
            if p.since_last and out.suppress.baseline is None and out.suppress.allowlist is None:
                out.stored_counts = db.current_counts(reused)
            else:
                for f in db.current_findings(reused):
                    stored.setdefault(f.image, []).append(f)
            for path in reused:
                rec = db.image_record(path)
                summary.files[path] = rec.pop("files")
                by_path[path] = ScanResult(image=path, findings=stored.get(path, []), **rec)
                dormant.mark(by_path[path], p.dormant_days)
            summary.results = [by_path[x] for x in paths if x in by_path]  # all, unless cut
            # Gone from a tree means removed; but a datastore that is missing or empty (not
            # mounted tonight) is an error, and resolves nothing.
            roots = [x for x in inputs if os.path.exists(x) and x not in summary.empty_dirs]
            removed = db.mark_removed(out.run_id, roots, set(paths))
            out.removed = len({c.image for c in removed})
            out.changes = writer.changes + removed
            out.scanned = fresh_paths & set(by_path)
            out.ended = now()
            writer.finish(out)
