"""ripgrep baseline: the throughput of a regex-only PAN search (no Luhn, no IIN table, ASCII
only) over an image, to compare vmleak's validated scan against in the same run.

The regex runs in byte mode (``(?-u)``: ``\\b`` and ``[0-9]`` are ASCII-only; the Unicode
``\\b\\d`` form is ~25x slower) and matches 13-19 digits, plain or grouped with one
consistent space or dash in the usual card groupings (4-4-4-4, 4-4-4-4-3, 4-6-5, 4-6-4).
ripgrep is installed with ``apt-get install -y ripgrep`` when missing.

    python benchmarks/rg_compare.py IMAGE [--runs 5] [--json]

Throughput is the image size over the median wall time of ``--runs`` runs (the first run
also warms the page cache and is not counted), in MB/s with MB = 10^6 bytes.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import statistics
import subprocess
import sys
import time
from dataclasses import asdict, dataclass


def _grouped(sep: str) -> str:
    """Card groupings with one separator character ``sep`` used throughout."""
    d = "[0-9]"
    return (f"{d}{{4}}(?:{sep}{d}{{4}}){{3}}(?:{sep}{d}{{3}})?"  # 4-4-4-4, 4-4-4-4-3
            f"|{d}{{4}}{sep}{d}{{6}}{sep}{d}{{4,5}}")  # 4-6-4, 4-6-5


#: The PAN regex: consistent separators are spelled out per separator because ripgrep's
#: default engine has no back-references.
PAN_REGEX = f"(?-u)\\b(?:[0-9]{{13,19}}|{_grouped(' ')}|{_grouped('-')})\\b"


@dataclass
class RgResult:
    """One timed baseline: ``matches`` counted by ripgrep, wall ``seconds`` per run, their
    ``median_s``, ``bytes`` of the image and ``mb_per_s`` (10^6 bytes per second);
    ``median_cpu_s`` (user + sys of ripgrep) and the ``mb_per_cpu_s`` it gives."""

    path: str
    bytes: int
    matches: int
    seconds: list[float]
    median_s: float
    mb_per_s: float
    version: str
    regex: str
    median_cpu_s: float = 0.0
    mb_per_cpu_s: float = 0.0


def ensure_rg() -> str:
    """Path of ``rg``, installing the ``ripgrep`` package with apt-get if it is missing."""
    rg = shutil.which("rg")
    if rg:
        return rg
    cmd = ["apt-get", "install", "-y", "ripgrep"]
    if os.geteuid() != 0 and shutil.which("sudo"):
        cmd = ["sudo", *cmd]
    print("rg_compare: ripgrep missing, running: " + " ".join(cmd), file=sys.stderr)
    proc = subprocess.run(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    rg = shutil.which("rg")
    if proc.returncode != 0 or not rg:
        raise RuntimeError(f"could not install ripgrep: {proc.stderr.strip()[-300:]}")
    return rg


def rg_count(path: str, regex: str = PAN_REGEX, rg: str | None = None) -> int:
    """Matches of ``regex`` in ``path``, binary data searched as text (``--text``)."""
    proc = subprocess.run(
        [rg or ensure_rg(), "--no-config", "--text", "--count-matches", "--no-filename",
         "-e", regex, "--", path],
        capture_output=True, text=True,
    )
    if proc.returncode == 1:  # ripgrep: no match
        return 0
    if proc.returncode != 0:
        raise RuntimeError(f"rg failed on {path}: {proc.stderr.strip()}")
    return int(proc.stdout.strip() or 0)


def rg_throughput(path: str, runs: int = 5, regex: str = PAN_REGEX) -> RgResult:
    """Time ``runs`` ripgrep counts of ``regex`` over ``path`` after one warm-up run; the
    result holds the median wall time and the MB/s it gives."""
    rg = ensure_rg()
    version = subprocess.run([rg, "--version"], capture_output=True, text=True).stdout
    size = os.path.getsize(path)
    matches = rg_count(path, regex, rg)  # warm-up: page cache, and the count we report
    times, cpus = [], []
    for _ in range(max(1, runs)):
        r0, t0 = resource.getrusage(resource.RUSAGE_CHILDREN), time.perf_counter()
        rg_count(path, regex, rg)
        times.append(time.perf_counter() - t0)
        r1 = resource.getrusage(resource.RUSAGE_CHILDREN)
        cpus.append(r1.ru_utime + r1.ru_stime - r0.ru_utime - r0.ru_stime)
    med, cpu = statistics.median(times), statistics.median(cpus)
    return RgResult(path, size, matches, times, med, size / med / 1e6,
                    version.split("\n")[0], regex, cpu, size / max(cpu, 1e-6) / 1e6)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description="ripgrep PAN-regex baseline throughput.")
    ap.add_argument("image")
    ap.add_argument("--runs", type=int, default=5, help="timed runs (median taken)")
    ap.add_argument("--json", action="store_true", help="print the result as JSON")
    args = ap.parse_args(argv)
    try:
        res = rg_throughput(args.image, args.runs)
    except (RuntimeError, OSError) as exc:
        print(f"rg_compare: {exc}", file=sys.stderr)
        return 2
    if args.json:
        print(json.dumps(asdict(res)))
    else:
        print(f"{res.version}: {res.matches} matches, median {res.median_s:.3f} s, "
              f"{res.mb_per_s:.0f} MB/s on {res.path} ({res.bytes / 1e6:.0f} MB)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
