"""Key search benchmark: vmleak's ``aes-key`` and ``rsa-key`` detectors against aeskeyfind and
rsakeyfind (Debian packages ``aeskeyfind``, ``rsakeyfind``) on the same image, in the same run.

Every tool runs as a whole process on one core (``vmleak scan -j 1``), image in the page
cache (one warm-up read first); throughput is the image size over the median wall time of
``--runs`` runs, in MB/s (MB = 10^6 bytes), interpreter start-up included. Recall comes from
the truth file written by ``benchmarks/gen_image.py``: vmleak findings are scored with
``benchmarks/truth.py`` (by GPA overlap); aeskeyfind prints keys, which are compared with
the planted key values; rsakeyfind prints offsets, compared with the planted offsets.
Findings that match nothing planted are the benchmark's false positives (the M image's real
ELF, ``.pyc``, compressed and text pages are where they would come from).

    python benchmarks/gen_image.py --kind M --size 64M --seed 1 -o m.img
    python benchmarks/bench_keys.py m.img [--runs 3] [--json]
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from typing import Any

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from benchmarks import truth as truthmod  # noqa: E402
from benchmarks.bytecode import compile_package  # noqa: E402


@dataclass
class Row:
    """One tool on one job: throughput and recall against the truth file."""

    tool: str
    job: str
    mb_per_s: float
    found: int
    planted: int
    unplanted: int
    notes: str = ""
    seconds: list[float] = field(default_factory=list)
    #: throughput without the process start-up (measured on an empty 4 KiB image): what the
    #: tool approaches on a large image
    mb_per_s_scan: float = 0.0


def _timed(cmd: list[str], runs: int, env: dict[str, str]) -> tuple[list[float], str]:
    """Wall times of ``runs`` runs of ``cmd`` and the stdout of the last one."""
    times, out = [], ""
    for _ in range(runs):
        t0 = time.perf_counter()
        proc = subprocess.run(cmd, capture_output=True, env=env, check=False)
        times.append(time.perf_counter() - t0)
        if proc.returncode not in (0, 1):  # 1: findings, like grep
            raise SystemExit(f"{cmd[0]} failed ({proc.returncode}): {proc.stderr[-400:]!r}")
        out = proc.stdout.decode("utf-8", "replace")
    return times, out


def _vmleak(image: str, detectors: str, runs: int, env: dict[str, str]) -> tuple[list[float], list]:
    cmd = [sys.executable, "-m", "scanner", "scan", image, "--format", "jsonl", "--detectors",
           detectors, "-j", "1", "-q", "--no-progress"]
    times, out = _timed(cmd, runs, env)
    return times, [json.loads(line) for line in out.splitlines() if line.strip()]


def _aeskeyfind(image: str, runs: int, env: dict[str, str], truth: list[dict[str, Any]]) -> Row:
    times, out = _timed(["aeskeyfind", "-q", image], runs, env)
    keys = {line.strip().lower() for line in out.splitlines() if re.fullmatch(r"[0-9a-f]+", line)}
    planted = {t["value"].lower(): t for t in truth if t["kind"] == "aes-key"}
    found = [k for k in keys if k in planted]
    missed = [t for k, t in planted.items() if k not in keys]
    layouts = sorted({t.get("layout", "?") for t in missed})
    notes = f"missed layouts: {', '.join(layouts)}" if missed else ""
    return Row("aeskeyfind", "AES schedules", 0.0, len(found), len(planted),
               len(keys) - len(found), notes, times)


def _rsakeyfind(image: str, runs: int, env: dict[str, str], truth: list[dict[str, Any]]) -> Row:
    times, out = _timed(["rsakeyfind", image], runs, env)
    offsets = {int(m.group(1), 16) for m in re.finditer(r"FOUND PRIVATE KEY AT ([0-9a-f]+)", out)}
    planted = {t["offset"] for t in truth if t["kind"] == "rsa-key"}
    found = offsets & planted
    return Row("rsakeyfind", "DER RSA keys", 0.0, len(found), len(planted),
               len(offsets - planted), "", times)


def run(image: str, truth_path: str, runs: int) -> list[Row]:
    """Every comparison on one image (each command run ``runs`` times after a warm-up read)."""
    size = os.path.getsize(image)
    truth = truthmod.load_truth(truth_path)
    with open(image, "rb") as fh:  # page cache warm-up
        while fh.read(8 << 20):
            pass
    rows: list[Row] = []
    with tempfile.TemporaryDirectory() as tmp:
        env = dict(os.environ, VMLEAK_FINGERPRINT_KEY="bench-key", XDG_STATE_HOME=tmp,
                   OMP_NUM_THREADS="1", OPENBLAS_NUM_THREADS="1")
        jobs: list[tuple[str, str, tuple[str, ...]]] = [
            ("aes-key", "AES schedules", ("aes-key",)),
            ("rsa-key", "DER RSA keys", ("rsa-key",)),
            ("keys", "all key detectors", ("aes-key", "rsa-key")),
            ("secrets", "all secret detectors", ()),
            ("all", "every detector", truthmod.KINDS),
        ]
        for detectors, job, kinds in jobs:
            times, findings = _vmleak(image, detectors, runs, env)
            rep = truthmod.match(findings, truth)
            found = sum(rep.found.get(k, 0) for k in kinds)
            planted = sum(rep.planted.get(k, 0) for k in kinds)
            unplanted = sum(rep.unplanted.values())
            rows.append(Row("vmleak", job, 0.0, found, planted, unplanted, "", times))
        tools: list[tuple[str, Callable[..., Row]]] = [("aeskeyfind", _aeskeyfind),
                                                       ("rsakeyfind", _rsakeyfind)]
        for name, fn in tools:
            if shutil.which(name) is None:
                print(f"{name} not installed (apt-get install {name}); skipped", file=sys.stderr)
                continue
            rows.append(fn(image, runs, env, truth))
        startup = {r.tool: _startup(r, tmp, runs, env) for r in rows}
    for r in rows:
        wall = statistics.median(r.seconds)
        r.mb_per_s = size / wall / 1e6
        r.mb_per_s_scan = size / max(wall - startup[r.tool], 1e-3) / 1e6
    return rows


def _startup(row: Row, tmp: str, runs: int, env: dict[str, str]) -> float:
    """Median wall time of the tool on an empty 4 KiB image (seconds)."""
    empty = os.path.join(tmp, "empty.img")
    with open(empty, "wb") as fh:
        fh.write(bytes(4096))
    if row.tool == "vmleak":
        return statistics.median(_vmleak(empty, "all", runs, env)[0])
    cmd = ["aeskeyfind", "-q", empty] if row.tool == "aeskeyfind" else ["rsakeyfind", empty]
    return statistics.median(_timed(cmd, runs, env)[0])


def table(rows: list[Row], image: str) -> str:
    """The results as a Markdown table."""
    size = os.path.getsize(image)
    out = [f"Image `{os.path.basename(image)}`, {size / 2**20:.0f} MiB, 1 core, median wall time "
           "(MB/s scan: start-up on an empty image subtracted).", "",
           "| tool | job | MB/s | MB/s scan | recall | unplanted | notes |",
           "|---|---|---|---|---|---|---|"]
    for r in rows:
        out.append(f"| {r.tool} | {r.job} | {r.mb_per_s:,.0f} | {r.mb_per_s_scan:,.0f} | "
                   f"{r.found}/{r.planted} | {r.unplanted} | {r.notes} |")
    return "\n".join(out)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("image")
    ap.add_argument("--truth", default=None, help="truth file (default IMAGE.truth.jsonl)")
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--json", action="store_true", help="rows as JSON instead of a table")
    args = ap.parse_args(argv)
    compile_package()
    rows = run(args.image, args.truth or args.image + ".truth.jsonl", max(1, args.runs))
    print(json.dumps([asdict(r) for r in rows], indent=1) if args.json else table(rows, args.image))
    return 0


if __name__ == "__main__":
    sys.exit(main())
