"""The ``vmleak`` command line: scan, report, diff, baseline, info, extract.

Exit status (like grep and the secret scanners): 0 nothing found, 1 findings, 2 an error
(an input that could not be read, wholly or in part; what was readable is still reported).
``--fail-on new|any|none`` chooses what "findings" means for status 1: findings not seen by
earlier runs (state database) nor accepted (baseline/allowlist), any finding not accepted
(the default), or nothing (status 0 unless an error).
"""

from __future__ import annotations

import json
import os
import sys
import time
from dataclasses import dataclass, field
from datetime import datetime, timezone
from functools import cached_property
from typing import TYPE_CHECKING, TextIO

import click
import numpy as np

from parsers.base import GPA_SPACE, ImageError
from parsers.registry import formats as input_formats
from patterns.registry import DETECTORS, groups, select
from scanner import __version__, output
from scanner.baseline import Allowlist, Baseline, Suppression
from scanner.engine import DEFAULT_CHUNK, ScanConfig, ScanResult
from scanner.findings import load_key
from scanner.runner import (
    ImageSpec,
    Progress,
    RunSummary,
    WalkOptions,
    expand_inputs,
    inside,
    run,
)

if TYPE_CHECKING:  # the state database and reports load only when used (start-up time)
    from scanner.state import Change

EXIT_CLEAN, EXIT_FOUND, EXIT_ERROR = 0, 1, 2
#: findings below this confidence are hex- or number-glued digit strings (benchmarks/README.md:
#: on the memory-like image every planted secret scores >= 0.45, chance matches <= 0.25)
DEFAULT_MIN_CONFIDENCE = 0.3


def _err(msg: str) -> None:
    click.echo(f"vmleak: {msg}", err=True)


class _Group(click.Group):
    """Turns any unexpected exception into a one-line error and exit status 2."""

    def invoke(self, ctx: click.Context):
        try:
            return super().invoke(ctx)
        except (click.exceptions.Exit, click.ClickException, click.Abort, SystemExit):
            raise
        except ImageError as err:
            _err(str(err))
            sys.exit(EXIT_ERROR)
        except (OSError, ValueError) as err:
            _err(str(err))
            sys.exit(EXIT_ERROR)


def _options(snapshot: str | None) -> tuple:
    return (("snapshot", snapshot),) if snapshot else ()


@click.group(cls=_Group, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="vmleak")
def main() -> None:
    """Find leaked secrets in suspended and snapshotted VM memory images."""


def _scan_options(f):
    """Options shared by ``scan`` and ``report`` (what to scan, how, and what to compare to)."""
    opts = [
        click.argument("inputs", nargs=-1, required=True, type=click.Path()),
        click.option(
            "--detectors",
            default="all",
            show_default=True,
            help="Comma-separated detector names or groups "
            f"({', '.join(d.name for d in DETECTORS)}; groups: {', '.join(groups())}).",
        ),
        click.option(
            "--input-format",
            type=click.Choice(input_formats()),
            default=None,
            help="Force the image format instead of detecting it from the content.",
        ),
        click.option("--snapshot", default=None, help="Only this snapshot (qcow2 images)."),
        click.option(
            "-j",
            "--jobs",
            type=click.IntRange(1, 256),
            default=None,
            help="Worker processes (default: all cores).",
        ),
        click.option(
            "--min-confidence",
            type=click.FloatRange(0, 1),
            default=DEFAULT_MIN_CONFIDENCE,
            show_default=True,
            help="Report only findings with details.confidence at least this. Below the "
            "default lie digit strings glued to hex or to a longer number (0 shows all).",
        ),
        click.option(
            "--fingerprint-key-file",
            type=click.Path(dir_okay=False),
            default=None,
            help="HMAC key for fingerprints (default: $VMLEAK_FINGERPRINT_KEY, else a key "
            "created 0600 in the user's state directory).",
        ),
        click.option("--unmask", is_flag=True, help="Show full secret values (masked by default)."),
        click.option(
            "--progress/--no-progress",
            default=True,
            help="Progress bar on stderr when it is a terminal.",
        ),
        click.option("-q", "--quiet", is_flag=True, help="No summary on stderr."),
        click.option(
            "--chunk-size", type=click.IntRange(4096, 1 << 30), default=DEFAULT_CHUNK, hidden=True
        ),
        click.option(
            "--include",
            multiple=True,
            metavar="GLOB",
            help="In directories, only files matching (a GLOB with / matches the path below "
            "the directory, else the file name). Repeatable.",
        ),
        click.option(
            "--exclude",
            multiple=True,
            metavar="GLOB",
            help="In directories, skip files and directories matching. Repeatable.",
        ),
        click.option(
            "--follow-symlinks",
            is_flag=True,
            help="Follow symlinks leading out of a scanned directory (inside it they are "
            "always followed, each file scanned once).",
        ),
        click.option(
            "--state",
            "state_path",
            type=click.Path(dir_okay=False),
            default=None,
            help="State database for incremental runs: unchanged images are not rescanned "
            "and new/resolved findings are recorded. Implied (in the user's state directory) "
            "by --since-last, --full and --fail-on new.",
        ),
        click.option(
            "--lock-wait",
            type=click.FloatRange(0),
            default=60.0,
            show_default=True,
            help="Seconds to wait for another run holding the state database, then fail.",
        ),
        click.option(
            "--baseline",
            "baseline_file",
            type=click.Path(dir_okay=False),
            default=None,
            help="Baseline file (vmleak baseline create): its findings are accepted.",
        ),
        click.option(
            "--allowlist",
            "allowlist_file",
            type=click.Path(dir_okay=False),
            default=None,
            help="Allowlist file: fingerprints, PAN IIN ranges or test-pans, each with a reason.",
        ),
        click.option(
            "--fail-on",
            type=click.Choice(["new", "any", "none"]),
            default=None,
            help="Exit 1 when: new = findings not seen before (state/baseline); any = any "
            "finding not accepted; none = never (errors still exit 2). Default: new with "
            "--since-last, else any.",
        ),
    ]
    for o in reversed(opts):
        f = o(f)
    return f


@dataclass
class Outcome:
    """What one scan invocation produced, for the outputs and the exit status."""

    summary: RunSummary
    config: ScanConfig
    key: bytes
    started: str
    ended: str = ""
    started_ns: int = field(default_factory=time.time_ns)  # precise start, for mtime checks
    scanned: set[str] = field(default_factory=set)  # images (re)scanned this run
    changes: list[Change] | None = None  # None: no state database used
    run_id: int | None = None
    state_path: str | None = None
    suppress: Suppression = field(default_factory=Suppression)
    removed: int = 0
    specs: dict[str, ImageSpec] = field(default_factory=dict)  # how each image was opened
    #: findings of unchanged images left in the database, per detector: a nightly run that
    #: prints only changes, with nothing to suppress, needs their number, not themselves
    stored_counts: dict[str, int] = field(default_factory=dict)

    def reason(self, f) -> str | None:
        return self.suppress.reason(f)

    # both read after the run, several times each (summary, exit status, output)
    @cached_property
    def reportable(self) -> list:
        return [f for f in self.summary.findings if not self.reason(f)]

    @cached_property
    def new(self) -> list:
        """Reportable findings that are new: vs the state when one is used, else every
        reportable one (then only a baseline/allowlist separates old from new)."""
        if self.changes is None:
            return self.reportable
        keys = {(c.image, c.detector, c.fingerprint) for c in self.changes if c.kind == "new"}
        return [f for f in self.reportable if (f.image, f.detector, f.fingerprint) in keys]


def _config_signature(config: ScanConfig, input_format: str | None, snapshot: str | None) -> str:
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


def _argv() -> list[str]:
    """The command line as the user typed it (``vmleak`` however it was started)."""
    return ["vmleak", *sys.argv[1:]]


def _now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="seconds")


def _execute(p: dict, full: bool, changes_only: bool = False) -> Outcome:
    """Find the images, scan what needs scanning (all of it with ``full``), record it in the
    state database when one is used, and gather everything the outputs need (with
    ``changes_only``, the findings of unchanged images are counted, not read back, unless a
    baseline or allowlist has to judge them)."""
    try:
        dets = select(p["detectors"])
    except ValueError as err:
        raise click.BadParameter(str(err), param_hint="--detectors") from None
    key = load_key(p["fingerprint_key_file"])
    if p["unmask"]:
        _err("WARNING: --unmask given: full secret values are shown")
    config = ScanConfig(dets, key, p["unmask"], p["chunk_size"], p["min_confidence"])
    if p["baseline_file"] or p["state_path"] or p.get("since_last") or p.get("full") or (
        p["fail_on"] == "new"
    ):  # the state module (sqlite) loads only when used: start-up time
        from scanner.state import StateDB, default_path, key_check
    suppress = Suppression(
        Baseline.load(p["baseline_file"], key_check(key)) if p["baseline_file"] else None,
        Allowlist.load(p["allowlist_file"]) if p["allowlist_file"] else None,
    )
    out = Outcome(RunSummary(), config, key, _now(), suppress=suppress)
    summary = out.summary
    state_path = p["state_path"]
    if state_path is None and (
        p.get("since_last") or p.get("full") or (p["fail_on"] == "new" and not p["baseline_file"])
    ):
        state_path = str(default_path())
    inputs = list(p["inputs"])
    if state_path:  # images are remembered by absolute path: cron may start us anywhere
        inputs = [os.path.abspath(x) for x in inputs]
    walk = WalkOptions(tuple(p["include"]), tuple(p["exclude"]), p["follow_symlinks"])
    known = None
    if state_path and not full and os.path.exists(state_path):
        with StateDB(state_path, key) as db:  # recorded, untouched images are not reread
            known = db.known_images()
    paths = list(expand_inputs(inputs, summary, walk, known))
    specs = [ImageSpec(x, p["input_format"], _options(p["snapshot"])) for x in paths]
    out.specs = {s.path: s for s in specs}
    jobs = p["jobs"] or os.cpu_count() or 1
    bar = Progress(p["progress"])
    if state_path is None:
        run(specs, config, jobs, bar, summary)
        out.scanned = {s.path for s in specs}
        bar.close()
        out.ended = _now()
        return out
    out.state_path = state_path
    signature = _config_signature(config, p["input_format"], p["snapshot"])
    detector_names = {d.name for d in dets}
    with StateDB(state_path, key, writer=True, lock_wait=p["lock_wait"]) as db:
        out.run_id = run_id = db.begin_run(_argv())
        fresh = [s for s in specs if full or not db.is_current(s.path, signature)]
        fresh_paths = {s.path for s in fresh}
        reused = [s.path for s in specs if s.path not in fresh_paths]
        db.touch(run_id, reused)
        if reused and p["unmask"]:
            _err(
                f"note: {len(reused)} unchanged image(s) are shown from the state database, "
                "masked (it never stores values); --full rescans them"
            )
        changes: list[Change] = []

        def store(result: ScanResult) -> None:
            if not result.format and db.image_row(result.image) is None:
                return  # never opened and never known: nothing to remember
            files = summary.files.get(result.image, [result.image])
            changes.extend(db.store(run_id, result, files, signature, detector_names))

        run(fresh, config, jobs, bar, summary, on_result=store)
        bar.close()
        by_path = {r.image: r for r in summary.results}
        stored: dict[str, list] = {}
        if changes_only and suppress.baseline is None and suppress.allowlist is None:
            out.stored_counts = db.current_counts(reused)
        else:
            for f in db.current_findings(reused):
                stored.setdefault(f.image, []).append(f)
        for path in reused:
            rec = db.image_record(path)
            summary.files[path] = rec.pop("files")
            by_path[path] = ScanResult(image=path, findings=stored.get(path, []), **rec)
        summary.results = [by_path[x] for x in paths]
        # Gone from a tree means removed; but a datastore that is missing or empty (not
        # mounted tonight) is an error, and resolves nothing.
        roots = [x for x in inputs if os.path.exists(x) and x not in summary.empty_dirs]
        removed = db.mark_removed(run_id, roots, set(paths))
        out.removed = len({c.image for c in removed})
        changes += removed
        out.changes = changes
        out.scanned = fresh_paths
        out.ended = _now()
        db.finish_run(run_id, _stats(out))
    return out


def _stats(out: Outcome) -> dict:
    s = out.summary
    changes = out.changes or []
    return {
        "images": len(s.results),
        "scanned": len(out.scanned),
        "unchanged": len(s.results) - len(out.scanned),
        "removed": out.removed,
        "findings": len(s.findings) + sum(out.stored_counts.values()),
        "new": sum(c.kind == "new" for c in changes),
        "resolved": sum(c.kind == "resolved" for c in changes),
        "errors": len(s.errors) + sum(len(r.errors) for r in s.results),
        "skipped": dict(s.skips),
        "bytes_scanned": sum(r.bytes_scanned for r in s.results if r.image in out.scanned),
    }


def _exit_status(out: Outcome, fail_on: str) -> int:
    if out.summary.failed:
        return EXIT_ERROR
    if fail_on == "none":
        return EXIT_CLEAN
    hits = out.new if fail_on == "new" else out.reportable or out.stored_counts
    return EXIT_FOUND if hits else EXIT_CLEAN


def _diagnostics(out: Outcome, quiet: bool, fail_on: str) -> int:
    """Errors and warnings, then the summary paragraph, on stderr; returns the exit status."""
    s = out.summary
    for msg in s.errors:
        _err(msg)
    for r in s.results:
        for msg in r.errors:
            _err(msg)
        for msg in r.warnings:
            _err(f"warning: {msg}")
    for msg in s.unreadable:
        _err(f"warning: cannot read {msg}")
    status = _exit_status(out, fail_on)
    if not quiet:
        _err(_summary_paragraph(out, fail_on, status))
    return status


def _summary_paragraph(out: Outcome, fail_on: str, status: int) -> str:
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
    held = len(s.findings) - len(reportable)
    if held:
        parts.append(f"{held} accepted by baseline/allowlist")
    scanned_bytes = sum(r.bytes_scanned for r in s.results if r.image in out.scanned)
    mb = scanned_bytes / 1e6
    rate = mb / s.seconds if s.seconds else 0.0
    parts.append(f"{mb:,.1f} MB of guest memory in {s.seconds:.2f} s ({rate:,.0f} MB/s)")
    if s.skips:
        parts.append("skipped " + ", ".join(f"{k} {why}" for why, k in sorted(s.skips.items())))
    errors = len(s.errors) + sum(1 for r in s.results if r.errors)
    if errors:
        parts.append(f"{errors} input(s) with errors")
    parts.append(f"exit {status} (--fail-on {fail_on})")
    return "; ".join(parts) + "."


@main.command()
@_scan_options
@click.option(
    "--format",
    "fmt",
    type=click.Choice(output.FORMATS),
    default="table",
    show_default=True,
    help="Output format on stdout.",
)
@click.option("--full", is_flag=True, help="Rescan every image even if unchanged (uses state).")
@click.option(
    "--since-last",
    is_flag=True,
    help="Print only what changed since the last run (new and resolved findings; uses state).",
)
def scan(**p) -> None:
    """Scan memory images (files or directories of them) for secrets.

    With a state database (--state, or implied by --since-last / --full / --fail-on new)
    unchanged images are not rescanned, their stored findings are shown, and each run records
    what is new and what was resolved (see `vmleak diff`)."""
    p["fail_on"] = p["fail_on"] or ("new" if p["since_last"] else "any")
    out = _execute(p, full=p["full"], changes_only=p["since_last"])
    if p["since_last"]:
        reportable_new = {(f.image, f.detector, f.fingerprint) for f in out.new}
        shown = [
            c
            for c in out.changes or []
            if c.kind == "resolved" or (c.image, c.detector, c.fingerprint) in reportable_new
        ]
        output.write_changes(shown, sys.stdout, p["fmt"])
    else:
        _report(out.reportable, p["fmt"], sys.stdout, len(out.summary.results) > 1)
    sys.exit(_diagnostics(out, p["quiet"], p["fail_on"]))


@main.command("report")
@_scan_options
@click.option(
    "-o",
    "--out",
    "out_dir",
    required=True,
    type=click.Path(file_okay=False),
    help="Directory for report.json and report.html (created 0700).",
)
@click.option("--force", is_flag=True, help="Replace a report already in the directory.")
def report_cmd(**p) -> None:
    """Scan (every image, fully) and write a PCI evidence report: report.json and a
    self-contained report.html, both 0600. Records the run in --state when given.

    Exit status as for scan (--fail-on)."""
    from scanner import report
    p["fail_on"] = p["fail_on"] or "any"
    out_dir = p["out_dir"]
    targets = [os.path.join(out_dir, n) for n in report.NAMES]
    if not p["force"] and any(os.path.exists(t) for t in targets):
        raise click.UsageError(f"{out_dir} already holds a report (use --force to replace it)")
    out = _execute(p, full=True)
    status = _diagnostics(out, p["quiet"], p["fail_on"])
    report.write(out_dir, report.build(out, _argv(), status))
    if not p["quiet"]:
        _err(f"evidence report written to {targets[0]} and {targets[1]}")
    sys.exit(status)


def _report(findings: list, fmt: str, out: TextIO, many: bool) -> None:
    if fmt == "jsonl":
        output.write_jsonl(findings, out)
    elif fmt == "csv":
        output.write_csv(findings, out)
    else:
        output.write_table(findings, out, show_image=many)
    out.flush()


def _state_option(f):
    f = click.option(
        "--fingerprint-key-file",
        type=click.Path(dir_okay=False),
        default=None,
        help="The key the state database was made with (default as for scan).",
    )(f)
    return click.option(
        "--state",
        "state_path",
        type=click.Path(dir_okay=False),
        default=None,
        help="State database (default: in the user's state directory).",
    )(f)


@main.command()
@_state_option
@click.option("--run", "run_id", type=int, default=None, help="Run number (default: the last).")
@click.option(
    "--format",
    "fmt",
    type=click.Choice(output.FORMATS),
    default="table",
    show_default=True,
)
@click.option("--list-runs", is_flag=True, help="List the recorded runs instead.")
def diff(
    state_path: str | None,
    fingerprint_key_file: str | None,
    run_id: int | None,
    fmt: str,
    list_runs: bool,
) -> None:
    """New and resolved findings per image of one run (by default the last), from the state
    database. Exit 1 when that run found something new, 0 otherwise, 2 on errors."""
    from scanner.state import StateDB, default_path
    key = load_key(fingerprint_key_file)
    with StateDB(state_path or default_path(), key) as db:
        runs = db.runs()
        if list_runs:
            for r in runs:
                st = r.stats
                click.echo(
                    f"{r.id:>5}  {r.started}  {r.status:<11}  images {st.get('images', '-')}, "
                    f"scanned {st.get('scanned', '-')}, new {st.get('new', '-')}, "
                    f"resolved {st.get('resolved', '-')}"
                )
            sys.exit(EXIT_CLEAN)
        if not runs:
            raise click.UsageError("the state database records no run yet")
        chosen = next((r for r in runs if r.id == run_id), None) if run_id else runs[-1]
        if chosen is None:
            raise click.UsageError(f"no run {run_id} (see --list-runs)")
        changes = db.changes(chosen.id)
    if chosen.status != "complete":
        _err(f"warning: run {chosen.id} is {chosen.status}: its changes are partial")
    output.write_changes(changes, sys.stdout, fmt)
    new = sum(c.kind == "new" for c in changes)
    _err(
        f"run {chosen.id} ({chosen.started}): {new} new, {len(changes) - new} resolved "
        f"finding(s) in {len({c.image for c in changes})} image(s)"
    )
    sys.exit(EXIT_FOUND if new else EXIT_CLEAN)


@main.group()
def baseline() -> None:
    """Accept the current findings, so later runs report only what is not in the baseline."""


@baseline.command("create")
@_state_option
@click.option("-o", "--output", "out", required=True, type=click.Path(dir_okay=False))
@click.option("--any-image", is_flag=True, help="Entries match their secret in any image.")
@click.option("--force", is_flag=True, help="Overwrite OUTPUT if it exists.")
@click.argument("paths", nargs=-1, type=click.Path())
def baseline_create(
    state_path: str | None,
    fingerprint_key_file: str | None,
    out: str,
    any_image: bool,
    force: bool,
    paths: tuple[str, ...],
) -> None:
    """Write the current findings recorded in the state database (of the images under PATHS
    if given) to a baseline file (0600) for scan --baseline."""
    from scanner.state import StateDB, default_path, key_check
    if os.path.exists(out) and not force:
        raise click.UsageError(f"{out} exists (use --force to overwrite)")
    key = load_key(fingerprint_key_file)
    with StateDB(state_path or default_path(), key) as db:
        if not db.runs():
            raise click.UsageError("the state database records no run yet: scan first")
        found = db.current_findings()
    if paths:
        found = [f for f in found if inside(f.image, paths)]
    if any_image:
        for f in found:
            f.image = "*"
    masked = {(f.image, f.detector, f.fingerprint): f.masked for f in found}
    Baseline.create(found, key_check(key)).save(out, masked)
    _err(f"baseline of {len(masked)} finding(s) written to {out}")


@main.command()
@click.argument("image", type=click.Path())
@click.option("--input-format", type=click.Choice(input_formats()), default=None)
@click.option("--snapshot", default=None, help="Only this snapshot (qcow2 images).")
def info(image: str, input_format: str | None, snapshot: str | None) -> None:
    """Show an image's format, guest, RAM and extent map."""
    with ImageSpec(image, input_format, _options(snapshot)).open() as img:
        click.echo(f"image:    {img.path}")
        click.echo(f"format:   {img.format}")
        click.echo(f"files:    {', '.join(img.files)}")
        for k, v in img.meta.items():
            click.echo(f"{k + ':':<9} {_fmt_meta(v)}")
        if img.random_access:
            _extent_summary(img)
        else:
            click.echo("extents:  streamed (compressed); mapped while scanning")
        for w in img.warnings:
            click.echo(f"warning:  {w}")


def _fmt_meta(v: object) -> str:
    if isinstance(v, int) and not isinstance(v, bool) and v >= 1 << 20:
        return f"{v} ({v / 2**20:,.0f} MiB)"
    if isinstance(v, list | tuple):
        return "\n          ".join(str(x) for x in v) if v else "-"
    return str(v)


def _extent_summary(img) -> None:
    segs = img.fixed_segments or []
    for space_id, space in enumerate(img.spaces):
        rows = [
            (int(a), int(n))
            for seg in segs
            for a, n, sp in zip(
                seg.extents.addr, seg.extents.length, seg.extents.space, strict=True
            )
            if sp == space_id
        ]
        if not rows:
            continue
        rows.sort()
        runs: list[list[int]] = []
        for a, n in rows:
            if runs and a <= runs[-1][1]:
                runs[-1][1] = max(runs[-1][1], a + n)
            else:
                runs.append([a, a + n])
        total = sum(n for _, n in rows)
        label = "GPA" if space_id == GPA_SPACE else space
        click.echo(f"extents:  {label}: {len(rows)} extents, {total:,} bytes, {len(runs)} ranges")
        for a, b in runs[:16]:
            click.echo(f"          {a:#014x}-{b:#014x}  {(b - a) / 2**20:,.1f} MiB")
        if len(runs) > 16:
            click.echo(f"          ... {len(runs) - 16} more ranges")


@main.command()
@click.argument("image", type=click.Path())
@click.option(
    "-o",
    "--output",
    "out",
    required=True,
    type=click.Path(dir_okay=False),
    help="Raw file to write (guest-physical memory, sparse).",
)
@click.option("--input-format", type=click.Choice(input_formats()), default=None)
@click.option("--snapshot", default=None, help="Only this snapshot (qcow2 images).")
@click.option("--force", is_flag=True, help="Overwrite OUTPUT if it exists.")
def extract(
    image: str, out: str, input_format: str | None, snapshot: str | None, force: bool
) -> None:
    """Write guest-physical memory as a flat raw file (byte k = GPA k, holes left sparse)
    that volatility3 and other tools open directly."""
    if os.path.exists(out) and os.path.samefile(out, image):
        raise click.UsageError("refusing to write over the evidence image")
    if os.path.exists(out) and not force:
        raise click.UsageError(f"{out} exists (use --force to overwrite)")
    written = 0
    with ImageSpec(image, input_format, _options(snapshot)).open() as img:
        fd = os.open(out, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        try:
            end = 0
            for seg in img.segments():
                ext = seg.extents
                for k in np.flatnonzero(ext.space == GPA_SPACE).tolist():
                    b, a, n = int(ext.buf_offset[k]), int(ext.addr[k]), int(ext.length[k])
                    os.pwrite(fd, seg.data[b : b + n], a)
                    written += n
                    end = max(end, a + n)
            os.ftruncate(fd, end)
        finally:
            os.close(fd)
        for w in img.warnings:
            _err(f"warning: {w}")
    _err(f"wrote {written:,} bytes of guest memory to {out} (file size {end:,})")
