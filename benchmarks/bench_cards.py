"""CPU time of the card detectors, this tree against a reference tree (issue 11: the card
detectors stay within 5% of before once the EMV detectors are added).

Runs ``python -m scanner scan --format jsonl --detectors D -j 1`` on the memory-like image
(``gen_image.py`` M, 1 GiB by default), alternating between this checkout and ``--reference``
(another checkout of the project, e.g. ``git worktree add /tmp/vmleak-ref <commit>``) so both
see the same machine load, and reports per tree and detector set the median **CPU time**
(user + sys of the scanner process, from ``os.wait4``; interpreter start-up included) and the
ratio to the reference. CPU time, not wall time: on a shared machine wall time mostly measures
the neighbours. Each tree scans with its own detector registry, so ``cards`` means pan,
track1, track2 in a tree from before the EMV detectors and adds emv-pan, emv-track2 after.
Usage::

    python benchmarks/bench_cards.py --reference /tmp/vmleak-ref --runs 7 \
        [--image /tmp/vmleak-bench/m-1G.img] [--detectors cards cards,pii]
"""

from __future__ import annotations

import argparse
import compileall
import os
import statistics
import subprocess
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

import gen_image  # noqa: E402

ROOT = HERE.parent


def cpu_run(tree: Path, image: Path, detectors: str) -> tuple[float, int]:
    """(user + sys CPU seconds, number of findings) of one scan run in ``tree``."""
    cmd = [sys.executable, "-m", "scanner", "scan", "--format", "jsonl", "--no-progress", "-q",
           "--detectors", detectors, "-j", "1", str(image)]
    env = dict(os.environ, VMLEAK_FINGERPRINT_KEY="00" * 32, PYTHONPATH=str(tree))
    proc = subprocess.Popen(cmd, cwd=tree, env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.DEVNULL)
    assert proc.stdout is not None
    lines = sum(1 for _ in proc.stdout)
    _, status, usage = os.wait4(proc.pid, 0)
    proc.returncode = os.waitstatus_to_exitcode(status)
    if proc.returncode not in (0, 1):
        raise SystemExit(f"scan failed ({proc.returncode}) in {tree}: {' '.join(cmd)}")
    return usage.ru_utime + usage.ru_stime, lines


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--reference", type=Path, required=True, help="checkout to compare with")
    ap.add_argument("--image", type=Path, default=Path("/tmp/vmleak-bench/m-1G.img"))
    ap.add_argument("--runs", type=int, default=7)
    ap.add_argument("--detectors", nargs="+", default=["cards", "cards,pii"])
    args = ap.parse_args(argv)
    if not args.image.exists():
        print(f"generating {args.image} ...", file=sys.stderr)
        args.image.parent.mkdir(parents=True, exist_ok=True)
        gen_image.main(["--kind", "M", "--size", "1G", "--seed", "1", "-o", str(args.image),
                        "-q"])
    trees = {"reference": args.reference.resolve(), "this": ROOT}
    for tree in trees.values():  # bytecode as an installed copy caches it (see bytecode.py)
        for package in ("parsers", "patterns", "scanner"):
            compileall.compile_dir(tree / package, quiet=1)
    cpu: dict[tuple[str, str], list[float]] = {}
    found: dict[tuple[str, str], int] = {}
    for det in args.detectors:
        cpu_run(ROOT, args.image, det)  # warm-up: the image into the page cache
        for k in range(args.runs):
            # alternate which tree goes first, so a drift in machine load hits both alike
            order = list(trees.items()) if k % 2 == 0 else list(trees.items())[::-1]
            for name, tree in order:
                seconds, found[(name, det)] = cpu_run(tree, args.image, det)
                cpu.setdefault((name, det), []).append(seconds)
                print(f"{det:>12} {name:>9} run {k + 1}: {seconds:.3f} s CPU", file=sys.stderr)
    size_gib = args.image.stat().st_size / 2**30
    print(f"image {args.image} ({size_gib:.2f} GiB), {args.runs} alternating runs, one job")
    print("| detectors | tree | CPU s (median) | min | max | findings | vs reference |")
    print("|---|---|---|---|---|---|---|")
    for det in args.detectors:
        ref = statistics.median(cpu[("reference", det)])
        for name in trees:
            t = cpu[(name, det)]
            med = statistics.median(t)
            print(f"| {det} | {name} | {med:.3f} | {min(t):.3f} | {max(t):.3f} | "
                  f"{found[(name, det)]} | {100 * (med / ref - 1):+.1f}% |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
