"""Scanning throughput, peak memory, recall and false positives of ``vmleak scan``.

Generates the benchmark images if missing (``gen_image.py``: M = 1 GiB memory-like, D =
256 MiB dense digits), then for each detector alone and for groups of detectors, on 1 job and
on all cores, runs the real command line (``vmleak scan --format jsonl``) N times and reports
MB/s of image scanned (MB = 10^6 bytes, interpreter start-up included) by the median CPU time
(user + sys of the scan and its workers: the figure to compare on a shared machine) and by
the median wall time, the child's peak RSS, recall against the truth file and findings that
were not planted (per GiB). ripgrep's regex-only PAN search on the same file runs in the same
session for comparison (CPU and wall). Usage::

    python benchmarks/throughput.py --workdir /tmp/vmleak-bench [--runs 3] [--quick]

Results go to stdout as a Markdown table and to ``WORKDIR/results.json``.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

import bytecode  # noqa: E402
import gen_image  # noqa: E402
import rg_compare  # noqa: E402
import truth  # noqa: E402

GIB = 1 << 30


def _children_cpu() -> float:
    """User + sys seconds of every waited-for descendant of this process so far."""
    r = resource.getrusage(resource.RUSAGE_CHILDREN)
    return r.ru_utime + r.ru_stime


def run_scan(
    image: Path, detectors: str, jobs: int, extra: list[str]
) -> tuple[float, float, int, str]:
    """One ``vmleak scan`` run: (wall seconds, CPU seconds, peak RSS bytes, stdout). The CPU
    time is user + sys of the scan and the worker processes it waited for. The peak is GNU
    time's maximum resident set of the scanner process (a fork of this big process would
    inherit its high-water mark); with several jobs it is the largest of the processes."""
    out_path = image.parent / f".scan-{os.getpid()}.jsonl"
    rss_path = image.parent / f".rss-{os.getpid()}"
    cmd = ["/usr/bin/time", "-f", "%M", "-o", str(rss_path), sys.executable, "-m", "scanner",
           "scan", "--format", "jsonl", "--no-progress", "-q", "--detectors", detectors,
           "-j", str(jobs), *extra, str(image)]
    env = dict(os.environ, VMLEAK_FINGERPRINT_KEY="00" * 32)
    with open(out_path, "w") as out:
        c0, t0 = _children_cpu(), time.perf_counter()
        proc = subprocess.run(cmd, stdout=out, stderr=subprocess.DEVNULL, env=env,
                              cwd=HERE.parent, check=False)
        wall, cpu = time.perf_counter() - t0, _children_cpu() - c0
    if proc.returncode not in (0, 1):
        raise SystemExit(f"scan failed ({proc.returncode}): {' '.join(cmd)}")
    text = out_path.read_text()
    rss_kib = int(rss_path.read_text().split()[-1])
    out_path.unlink()
    rss_path.unlink()
    return wall, cpu, rss_kib * 1024, text


def measure(image: Path, detectors: str, jobs: int, runs: int, extra: list[str]) -> dict:
    walls, cpus, rss, text = [], [], 0, ""
    for _ in range(runs):
        wall, cpu, peak, text = run_scan(image, detectors, jobs, extra)
        walls.append(wall)
        cpus.append(cpu)
        rss = max(rss, peak)
    size = image.stat().st_size
    findings = [json.loads(line) for line in text.splitlines() if line.strip()]
    report = truth.match(findings, truth.load_truth(str(image) + ".truth.jsonl"))
    wanted = set(detectors.split(","))
    kinds = [k for k in report.planted if k in wanted or _group_has(detectors, k)]
    med, cpu = statistics.median(walls), statistics.median(cpus)
    return {
        "image": image.name, "detectors": detectors, "jobs": jobs, "runs": runs,
        "median_s": round(med, 3), "mb_s": round(size / med / 1e6, 1),
        "median_cpu_s": round(cpu, 3), "mb_per_cpu_s": round(size / cpu / 1e6, 1),
        "peak_rss_mib": round(rss / 2**20, 1),
        "recall": {k: f"{report.found.get(k, 0)}/{report.planted[k]}" for k in kinds},
        "unplanted_per_gib": {k: round(v * GIB / size, 1) for k, v in report.unplanted.items()},
        "findings": len(findings),
    }


def _group_has(detectors: str, kind: str) -> bool:
    groups = {"cards": {"pan", "track1", "track2"}, "pii": {"ssn"},
              "keys": {"aes-key", "rsa-key"}, "all": set(truth.KINDS)}
    return any(kind in groups.get(d, ()) for d in detectors.split(","))


def ensure_image(workdir: Path, kind: str, size: str) -> Path:
    path = workdir / f"{kind.lower()}-{size}.img"
    if not (path.exists() and Path(str(path) + ".truth.jsonl").exists()):
        print(f"generating {path} ...", file=sys.stderr)
        gen_image.main(["--kind", kind, "--size", size, "--seed", "1", "-o", str(path), "-q"])
    return path


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--workdir", default="/tmp/vmleak-bench", type=Path)
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--quick", action="store_true", help="256 MiB M image, fewer rows")
    ap.add_argument("--min-confidence", default=None,
                    help="passed to vmleak scan (default: the scanner's own default)")
    args = ap.parse_args(argv)
    bytecode.compile_package()
    args.workdir.mkdir(parents=True, exist_ok=True)
    cores = os.cpu_count() or 1
    m = ensure_image(args.workdir, "M", "256M" if args.quick else "1G")
    d = ensure_image(args.workdir, "D", "64M" if args.quick else "256M")
    extra = ["--min-confidence", args.min_confidence] if args.min_confidence else []
    rows = []
    plan = [(m, det, 1) for det in ("pan", "track1", "track2", "ssn")]
    plan += [(m, "cards,pii", 1), (m, "cards,pii", cores), (m, "all", 1), (m, "all", cores)]
    plan += [(d, "cards,pii", 1), (d, "cards,pii", cores)]
    if args.quick:
        plan = [p for p in plan if "," in p[1] or p[1] == "all"]
    for image, det, jobs in plan:
        row = measure(image, det, jobs, args.runs, extra)
        rows.append(row)
        print(json.dumps(row), file=sys.stderr)
    rg = {img.name: rg_compare.rg_throughput(str(img), runs=args.runs) for img in (m, d)}
    print("| image | detectors | jobs | MB per CPU s (median) | MB/s wall (median) | peak RSS MiB "
          "| recall | unplanted/GiB |")
    print("|---|---|---|---|---|---|---|---|")
    for r in rows:
        rec = ", ".join(f"{k} {v}" for k, v in r["recall"].items())
        fp = ", ".join(f"{k} {v}" for k, v in r["unplanted_per_gib"].items()) or "0"
        print(f"| {r['image']} | {r['detectors']} | {r['jobs']} | {r['mb_per_cpu_s']:,.0f} | "
              f"{r['mb_s']:,.0f} | {r['peak_rss_mib']} | {rec} | {fp} |")
    for name, res in rg.items():
        print(f"| {name} | ripgrep PAN regex (no Luhn) | 1 | {res.mb_per_cpu_s:,.0f} | "
              f"{res.mb_per_s:,.0f} | - | "
              f"{res.matches} matches | - |")
    out = {"rows": rows, "ripgrep": {k: vars(v) for k, v in rg.items()},
           "cores": cores, "min_confidence": args.min_confidence or "default"}
    (args.workdir / "results.json").write_text(json.dumps(out, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
