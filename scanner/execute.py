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
from scanner.runner import ImageSpec, Progress, RunSummary, WalkOptions, expand_inputs, run


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
    """Find the images, scan what needs scanning (all of it with ``rescan_all``), record it in
    the state database when one is used, and give the printers everything (with
    ``p.since_last``, the findings of unchanged images are counted, not read back, unless a
    baseline or allowlist has to judge them). ``p.fail_on`` must be set."""
    try:
        dets = select(p.detectors)
    except ValueError as err:
        raise click.BadParameter(str(err), param_hint="--detectors") from None
    dets += yara_detectors(p.yara, p.yara_max_len)  # rule errors stop us before any image
    key = load_key(p.fingerprint_key_file)
    if p.unmask:
        warn("WARNING: --unmask given: full secret values are shown")
    config = ScanConfig(dets, key, p.unmask, p.chunk_size, p.min_confidence)
    if p.baseline_file or p.state_path or p.since_last or p.full or p.fail_on == "new":
        # the state module (sqlite) loads only when used: start-up time
        from scanner.printers.state import StateWriter
        from scanner.state import StateDB, default_path, key_check
    suppress = Suppression(
        Baseline.load(p.baseline_file, key_check(key)) if p.baseline_file else None,
        Allowlist.load(p.allowlist_file) if p.allowlist_file else None,
    )
    out = Outcome(RunSummary(), config, key, now(), argv(), p.fail_on or "any", suppress=suppress)
    summary = out.summary
    state_path = p.state_path
    if state_path is None and p.implies_state:
        state_path = str(default_path())
    inputs = list(p.inputs)
    if state_path:  # images are remembered by absolute path: cron may start us anywhere
        inputs = [os.path.abspath(x) for x in inputs]
    walk = WalkOptions(p.include, p.exclude, p.follow_symlinks)
    known = None
    if state_path and not rescan_all and os.path.exists(state_path):
        with StateDB(state_path, key) as db:  # recorded, untouched images are not reread
            known = db.known_images()
    paths = list(expand_inputs(inputs, summary, walk, known))
    specs = [ImageSpec(x, p.input_format, p.image_options) for x in paths]
    jobs = p.jobs or os.cpu_count() or 1
    bar = Progress(p.progress)

    def each(result: ScanResult) -> None:
        dormant.mark(result, p.dormant_days)
        for printer in sinks:
            printer.image(result)

    if state_path is None:
        sinks = list(printers)
        for printer in sinks:
            printer.begin(out)
        run(specs, config, jobs, bar, summary, on_result=each)
        out.scanned = {r.image for r in summary.results}
        bar.close()
        out.ended = now()
        for printer in sinks:
            printer.finish(out)
        return out
    out.state_path = state_path
    signature = config_signature(config, p.input_format, p.snapshot)
    with StateDB(state_path, key, writer=True, lock_wait=p.lock_wait) as db:
        writer = StateWriter(db, signature, {d.name for d in dets})
        sinks = [writer, *printers]
        for printer in sinks:
            printer.begin(out)
        fresh = [s for s in specs if rescan_all or not db.is_current(s.path, signature)]
        fresh_paths = {s.path for s in fresh}
        reused = [s.path for s in specs if s.path not in fresh_paths]
        db.touch(out.run_id, reused)
        if reused and p.unmask:
            warn(
                f"note: {len(reused)} unchanged image(s) are shown from the state database, "
                "masked (it never stores values); --full rescans them"
            )
        run(fresh, config, jobs, bar, summary, on_result=each)
        bar.close()
        by_path = {r.image: r for r in summary.results}
        stored: dict[str, list] = {}
        if p.since_last and suppress.baseline is None and suppress.allowlist is None:
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
    for printer in printers:
        printer.finish(out)
    return out
