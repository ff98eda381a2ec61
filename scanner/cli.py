"""The ``vmleak`` command line: scan, info, extract.

Exit status (like grep and the secret scanners): 0 nothing found, 1 findings, 2 an error
(an input that could not be read, wholly or in part; what was readable is still reported).
"""

from __future__ import annotations

import os
import sys
from typing import TextIO

import click
import numpy as np

from parsers.base import GPA_SPACE, ImageError
from parsers.registry import formats as input_formats
from patterns.registry import DETECTORS, groups, select
from scanner import __version__, output
from scanner.engine import DEFAULT_CHUNK, ScanConfig
from scanner.findings import load_key
from scanner.runner import ImageSpec, Progress, RunSummary, expand_inputs, run

EXIT_CLEAN, EXIT_FOUND, EXIT_ERROR = 0, 1, 2


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


@main.command()
@click.argument("inputs", nargs=-1, required=True, type=click.Path())
@click.option(
    "--format",
    "fmt",
    type=click.Choice(output.FORMATS),
    default="table",
    show_default=True,
    help="Output format on stdout.",
)
@click.option(
    "--detectors",
    default="all",
    show_default=True,
    help="Comma-separated detector names or groups "
    f"({', '.join(d.name for d in DETECTORS)}; groups: {', '.join(groups())}).",
)
@click.option(
    "--input-format",
    type=click.Choice(input_formats()),
    default=None,
    help="Force the image format instead of detecting it from the content.",
)
@click.option("--snapshot", default=None, help="Only this snapshot (qcow2 images).")
@click.option(
    "-j",
    "--jobs",
    type=click.IntRange(1, 256),
    default=None,
    help="Worker processes (default: all cores).",
)
@click.option(
    "--min-confidence",
    type=click.FloatRange(0, 1),
    default=0.0,
    show_default=True,
    help="Report only findings with details.confidence at least this.",
)
@click.option(
    "--fingerprint-key-file",
    type=click.Path(dir_okay=False),
    default=None,
    help="HMAC key for fingerprints (default: $VMLEAK_FINGERPRINT_KEY, else a key "
    "created 0600 in the user's state directory).",
)
@click.option("--unmask", is_flag=True, help="Print full secret values (masked by default).")
@click.option(
    "--progress/--no-progress", default=True, help="Progress bar on stderr when it is a terminal."
)
@click.option("-q", "--quiet", is_flag=True, help="No summary line on stderr.")
@click.option(
    "--chunk-size", type=click.IntRange(4096, 1 << 30), default=DEFAULT_CHUNK, hidden=True
)
def scan(
    inputs: tuple[str, ...],
    fmt: str,
    detectors: str,
    input_format: str | None,
    snapshot: str | None,
    jobs: int | None,
    min_confidence: float,
    fingerprint_key_file: str | None,
    unmask: bool,
    progress: bool,
    quiet: bool,
    chunk_size: int,
) -> None:
    """Scan memory images (files or directories of them) for secrets."""
    try:
        dets = select(detectors)
    except ValueError as err:
        raise click.BadParameter(str(err), param_hint="--detectors") from None
    key = load_key(fingerprint_key_file)
    if unmask:
        _err("WARNING: --unmask given: full secret values are printed")
    config = ScanConfig(dets, key, unmask, chunk_size, min_confidence)
    summary = RunSummary()
    paths = list(expand_inputs(list(inputs), summary))
    specs = [ImageSpec(p, input_format, _options(snapshot)) for p in paths]
    bar = Progress(progress)
    run(specs, config, jobs or os.cpu_count() or 1, bar, summary)
    bar.close()
    _report(summary, fmt, sys.stdout, len(specs) > 1)
    for msg in summary.errors:
        _err(msg)
    for r in summary.results:
        for msg in r.errors:
            _err(msg)
        for msg in r.warnings:
            _err(f"warning: {msg}")
    if not quiet:
        _err(_summary_line(summary))
    if summary.failed:
        sys.exit(EXIT_ERROR)
    sys.exit(EXIT_FOUND if summary.findings else EXIT_CLEAN)


def _report(summary: RunSummary, fmt: str, out: TextIO, many: bool) -> None:
    findings = summary.findings
    if fmt == "jsonl":
        output.write_jsonl(findings, out)
    elif fmt == "csv":
        output.write_csv(findings, out)
    else:
        output.write_table(findings, out, show_image=many)
    out.flush()


def _summary_line(s: RunSummary) -> str:
    by_det: dict[str, int] = {}
    for f in s.findings:
        by_det[f.detector] = by_det.get(f.detector, 0) + 1
    what = ", ".join(f"{n} {d}" for d, n in sorted(by_det.items())) or "no findings"
    mb = s.bytes_scanned / 1e6
    rate = mb / s.seconds if s.seconds else 0.0
    skipped = f", {s.skipped} non-image files skipped" if s.skipped else ""
    return (
        f"{what} in {len(s.results)} image(s); {mb:,.1f} MB of guest memory in "
        f"{s.seconds:.2f} s ({rate:,.0f} MB/s){skipped}"
    )


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
