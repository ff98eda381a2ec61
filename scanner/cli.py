"""The ``vmleak`` command line: scan, report, diff, baseline, info, extract (click wiring only).

The run itself is ``scanner.execute`` (parameters: ``scanner.params.ScanParams``), its outcome
and exit-status rules ``scanner.outcome``, the stderr summary ``scanner.summary``, the outputs
``scanner.printers``. An option of ``scan`` and ``report`` is a line in ``SCAN_OPTIONS`` plus
a ``ScanParams`` field of the same name; an option of one command goes on that command.
"""

from __future__ import annotations

import dataclasses
import json
import os
import sys
from collections.abc import Callable
from typing import Any

import click

from parsers.base import ImageError
from parsers.registry import formats as input_formats
from patterns.registry import DETECTORS, groups
from scanner import __version__, printers
from scanner.baseline import Baseline
from scanner.engine import DEFAULT_CHUNK
from scanner.execute import execute, warn
from scanner.findings import load_key
from scanner.imageinfo import extract as extract_gpa
from scanner.imageinfo import info_json, info_lines, problems
from scanner.outcome import EXIT_CLEAN, EXIT_ERROR, EXIT_FOUND, FAIL_ON
from scanner.params import DEFAULT_MIN_CONFIDENCE, ScanParams
from scanner.runner import ImageSpec, inside
from scanner.summary import diagnostics


class _Group(click.Group):
    """Turns any unexpected exception into a one-line error and exit status 2."""

    def invoke(self, ctx: click.Context):
        try:
            return super().invoke(ctx)
        except (click.exceptions.Exit, click.ClickException, click.Abort, SystemExit):
            raise
        except (ImageError, OSError, ValueError) as err:
            warn(str(err))
            sys.exit(EXIT_ERROR)


@click.group(cls=_Group, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="vmleak")
def main() -> None:
    """Find leaked secrets in suspended and snapshotted VM memory images."""


Decorator = Callable[[Callable[..., Any]], Callable[..., Any]]

#: options shared by ``scan`` and ``report`` (what to scan, how, and what to compare to); each
#: fills the ScanParams field of its name
SCAN_OPTIONS: list[Decorator] = [
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
        "--dask",
        metavar="ADDRESS",
        default=None,
        help="Run the scan's units on a Dask cluster: a scheduler address "
        "(tcp://host:8786; workers must see the same paths) or local:N (N worker processes "
        "here). Needs pip install 'vmleak[dask]'.",
    ),
    click.option(
        "--dask-timeout",
        type=click.FloatRange(0.1),
        default=30.0,
        show_default=True,
        help="Seconds to reach the Dask scheduler and see a first worker.",
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
        "--yara",
        multiple=True,
        metavar="RULES",
        type=click.Path(),
        help="YARA rules (a .yar file or a directory of .yar/.yara files; repeatable): each "
        "string match is reported once at its GPA as detector yara, masked. Needs "
        "pip install 'vmleak[yara]'.",
    ),
    click.option(
        "--yara-max-len",
        type=click.IntRange(1, 1 << 20),
        default=4096,
        show_default=True,
        help="Bytes of a YARA string match found whole across page seams and chunk edges "
        "(YARA's own limit for regular expressions is 4096).",
    ),
    click.option(
        "--dormant-days",
        type=click.IntRange(0),
        default=90,
        show_default=True,
        help="Mark images saved more than this many days ago (guest clock, else file time) "
        "as dormant.",
    ),
    click.option(
        "--fail-on",
        type=click.Choice(FAIL_ON),
        default=None,
        help="Exit 1 when: new = findings not seen before (state/baseline); any = any "
        "finding not accepted; none = never (errors still exit 2). Default: new with "
        "--since-last, else any.",
    ),
]


def scan_options(f: Callable[..., Any]) -> Callable[..., Any]:
    """Apply ``SCAN_OPTIONS`` (in their listed order in ``--help``)."""
    for o in reversed(SCAN_OPTIONS):
        f = o(f)
    return f


@main.command()
@scan_options
@click.option(
    "--format",
    "fmt",
    type=click.Choice(printers.FORMATS),
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
def scan(**opts: Any) -> None:
    """Scan memory images (files or directories of them) for secrets.

    With a state database (--state, or implied by --since-last / --full / --fail-on new)
    unchanged images are not rescanned, their stored findings are shown, and each run records
    what is new and what was resolved (see `vmleak diff`)."""
    p = ScanParams.take(opts)
    p = dataclasses.replace(p, fail_on=p.fail_on or ("new" if p.since_last else "any"))
    printer = printers.FINDINGS[opts["fmt"]](sys.stdout, changes_only=p.since_last)
    out = execute(p, [printer], rescan_all=p.full)
    sys.exit(diagnostics(out, p.quiet))


@main.command("report")
@scan_options
@click.option(
    "-o",
    "--out",
    "out_dir",
    required=True,
    type=click.Path(file_okay=False),
    help="Directory for report.json and report.html (created 0700).",
)
@click.option("--force", is_flag=True, help="Replace a report already in the directory.")
def report_cmd(**opts: Any) -> None:
    """Scan (every image, fully) and write a PCI evidence report: report.json and a
    self-contained report.html, both 0600. Records the run in --state when given.

    Exit status as for scan (--fail-on)."""
    from scanner.printers.report import ReportWriter
    from scanner.report import NAMES

    p = ScanParams.take(opts)
    p = dataclasses.replace(p, fail_on=p.fail_on or "any")
    out_dir = opts["out_dir"]
    targets = [os.path.join(out_dir, n) for n in NAMES]
    if not opts["force"] and any(os.path.exists(t) for t in targets):
        raise click.UsageError(f"{out_dir} already holds a report (use --force to replace it)")
    out = execute(p, [ReportWriter(out_dir)], rescan_all=True)
    status = diagnostics(out, p.quiet)
    if not p.quiet:
        warn(f"evidence report written to {targets[0]} and {targets[1]}")
    sys.exit(status)


def _state_option(f: Callable[..., Any]) -> Callable[..., Any]:
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
    type=click.Choice(printers.FORMATS),
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
        warn(f"warning: run {chosen.id} is {chosen.status}: its changes are partial")
    printers.FINDINGS[fmt](sys.stdout).changes(changes)
    sys.stdout.flush()
    new = sum(c.kind == "new" for c in changes)
    warn(
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
    warn(f"baseline of {len(masked)} finding(s) written to {out}")


def _image_spec(image: str, input_format: str | None, snapshot: str | None) -> ImageSpec:
    return ImageSpec(image, input_format, (("snapshot", snapshot),) if snapshot else ())


@main.command()
@click.argument("image", type=click.Path())
@click.option("--input-format", type=click.Choice(input_formats()), default=None)
@click.option("--snapshot", default=None, help="Only this snapshot (qcow2 images).")
@click.option(
    "--format",
    "fmt",
    type=click.Choice(["text", "json"]),
    default="text",
    show_default=True,
    help="json: one object with the metadata, guest_clock (the guest's wall-clock time at "
    "save, null where the format does not record it) and file_mtime.",
)
def info(image: str, input_format: str | None, snapshot: str | None, fmt: str) -> None:
    """Show an image's format, guest, RAM and extent map, the guest memory it declares against
    what was read, and per file the bytes of guest memory and those outside it (scanned
    anyway). Exit 2 when part of it is damaged, as scan."""
    with _image_spec(image, input_format, snapshot).open() as img:
        if fmt == "json":
            click.echo(json.dumps(info_json(img), indent=1, default=str))
        else:
            for line in info_lines(img):
                click.echo(line)
        damaged = problems(img)
    sys.exit(EXIT_ERROR if damaged else EXIT_CLEAN)  # the exit rule of scan (outcome.py)


@main.command("vol3-path")
def vol3_path() -> None:
    """Print the directory to give volatility3 with -p: vol -p "$(vmleak vol3-path)" -f IMAGE
    PLUGIN opens every format vmleak reads, and adds the plugin vmleak.Scan."""
    from scanner.vol3 import PLUGIN_DIR

    try:
        import volatility3  # noqa: F401
    except ImportError:
        warn("note: volatility3 is not installed here: pip install 'vmleak[vol3]'")
    click.echo(str(PLUGIN_DIR))


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
    that volatility3 and other tools open directly. Exit 2 when part of the image is damaged
    (what was readable is written), as scan."""
    if os.path.exists(out) and os.path.samefile(out, image):
        raise click.UsageError("refusing to write over the evidence image")
    if os.path.exists(out) and not force:
        raise click.UsageError(f"{out} exists (use --force to overwrite)")
    with _image_spec(image, input_format, snapshot).open() as img:
        written, end = extract_gpa(img, out)
        damaged = problems(img)
        for w in img.warnings:  # as scan prints them: damage bare, remarks as warnings
            warn(str(w) if w in damaged else f"warning: {w}")
    warn(f"wrote {written:,} bytes of guest memory to {out} (file size {end:,})")
    sys.exit(EXIT_ERROR if damaged else EXIT_CLEAN)  # the exit rule of scan (outcome.py)
