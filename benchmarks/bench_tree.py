"""Nightly-scan benchmark: a tree of many small images against one large image of the same
total size, and an unchanged second run against the first.

Builds, in a temporary directory, ``--count`` raw images of ``--size`` bytes each (guest-like
content: thirds of random bytes, ASCII text with digit runs and planted card numbers, and
zeros) and one raw image that is their concatenation, then times the ``vmleak`` command line
(wall clock, page cache warm, median of ``--repeat`` runs):

- ``tree``: ``vmleak scan -j JOBS DIR`` (no state), and the first run with ``--state``;
- ``large``: ``vmleak scan -j JOBS LARGE``;
- ``second``: the same ``--state`` run again with nothing changed (nothing is rescanned; every
  finding is printed again from the database), and the nightly form with ``--since-last``
  (only changes are printed: none).

Both scans must report the same number of findings. Each figure includes the command's fixed
start-up cost (Python, numpy and detector imports), printed separately (``--version`` run)
so it can be subtracted for small trees.

With ``--dask`` the tree is also scanned with ``--dask local:JOBS`` (a LocalCluster of JOBS
worker processes) against ``--jobs JOBS``: wall-clock medians and CPU time (user + sys of the
whole process tree, workers included: the figure to trust on a shared machine), each also
net of its fixed cost (the same command on one 4 KiB image: interpreter, imports, pool or
cluster start). Both must print the same findings. Then a scaling table on paper: workers
against the expected fleet throughput, min(workers x the measured per-core rate, storage
bandwidth), for the ``--bandwidth`` figures given (GB/s).

Usage::

    python benchmarks/bench_tree.py --count 200 --size 1MiB --jobs 2
    python benchmarks/bench_tree.py --count 200 --size 16MiB --jobs 2 --dask
"""

from __future__ import annotations

import argparse
import os
import random
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
import time

import numpy as np

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
sys.path.insert(0, ROOT)

from benchmarks.bytecode import compile_package  # noqa: E402
from benchmarks.gen_image import luhn_complete, parse_size  # noqa: E402

PAGE = 4096


def content(size: int, seed: int) -> bytes:
    """``size`` bytes (whole pages) of guest-like memory with a few PANs planted in text."""
    rng = np.random.default_rng(seed)
    r = random.Random(seed)
    third = size // 3 // PAGE * PAGE
    words = np.frombuffer(b"abcdefghijklmnopqrstuvwxyz      0123456789\n", np.uint8)
    text = bytearray(rng.choice(words, third).tobytes())
    for off in range(1000, third - 64, 64 * 1024):
        pan = luhn_complete("4" + "".join(r.choice("0123456789") for _ in range(14)))
        text[off : off + 24] = f" card {pan} ".encode()
    body = rng.integers(0, 256, third, np.uint8).tobytes() + bytes(text)
    return body + bytes(size - len(body))


def vmleak(args: list[str], env: dict[str, str]) -> tuple[float, subprocess.CompletedProcess]:
    dt, _, r = run_timed(args, env)
    return dt, r


def run_timed(
    args: list[str], env: dict[str, str]
) -> tuple[float, float, subprocess.CompletedProcess]:
    """Wall seconds, CPU seconds (user + sys of the command and every process it waited for:
    pool or Dask workers) and the completed command."""
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    t0 = time.perf_counter()
    r = subprocess.run(
        [sys.executable, "-m", "scanner", *args], capture_output=True, text=True, env=env, cwd=ROOT
    )
    dt = time.perf_counter() - t0
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    cpu = after.ru_utime - before.ru_utime + after.ru_stime - before.ru_stime
    if r.returncode not in (0, 1):
        raise SystemExit(f"vmleak {' '.join(args)} failed:\n{r.stderr}")
    return dt, cpu, r


def timed(args: list[str], env: dict[str, str], repeat: int, before=None) -> tuple[float, int]:
    """Median wall time of ``repeat`` runs and the findings count of the last."""
    times = []
    for _ in range(repeat):
        if before:
            before()
        dt, r = vmleak(args, env)
        times.append(dt)
    return statistics.median(times), len(r.stdout.splitlines())


def medians(
    ways: dict[str, list[str]], env: dict[str, str], repeat: int
) -> dict[str, tuple[float, float, list[str]]]:
    """Per way (a command line): median wall and CPU seconds of ``repeat`` runs and the
    sorted output of the last. The ways take turns, so a change in the machine's load falls
    on all of them alike."""
    runs: dict[str, list] = {k: [] for k in ways}
    for _ in range(repeat):
        for name, args in ways.items():
            runs[name].append(run_timed(args, env))
    return {
        k: (
            statistics.median(dt for dt, _, _ in v),
            statistics.median(c for _, c, _ in v),
            sorted(v[-1][2].stdout.splitlines()),
        )
        for k, v in runs.items()
    }


def dask_comparison(a: argparse.Namespace, tree: str, work: str, env: dict[str, str]) -> None:
    """``--dask local:JOBS`` against ``--jobs JOBS`` on the tree, then the scaling table."""
    tiny = os.path.join(work, "tiny.raw")
    with open(tiny, "wb") as fh:
        fh.write(bytes(PAGE))
    common = ["scan", "-q", "--no-progress", "--format", "jsonl"]
    ways = {"jobs": ["--jobs", str(a.jobs)], "dask": ["--dask", f"local:{a.jobs}"]}
    fixed = medians({k: [*common, *how, tiny] for k, how in ways.items()}, env, a.repeat)
    full = medians({k: [*common, *how, tree] for k, how in ways.items()}, env, a.repeat)
    got = {k: (*full[k][:2], *fixed[k][:2], full[k][2]) for k in ways}
    assert got["jobs"][4] == got["dask"][4], "--dask and --jobs printed different findings"
    mb = a.count * (a.size // PAGE * PAGE) / 1e6
    print(f"dask vs local pool: {a.count} images, {mb:,.0f} MB, {a.jobs} workers each; "
          f"{len(got['jobs'][4])} findings (identical); median of {a.repeat}")  # fmt: skip
    print("                        wall s   MB/s   net MB/s  |  CPU s   MB per CPU s  "
          "fixed wall / CPU s")  # fmt: skip
    for name, (wall, cpu, fw, fc, _) in got.items():
        label = f"--dask local:{a.jobs}" if name == "dask" else f"--jobs {a.jobs}"
        print(f"  {label:<20} {wall:7.2f} {mb / wall:7.0f} {mb / max(wall - fw, 1e-9):9.0f}  |"
              f" {cpu:6.2f} {mb / max(cpu - fc, 1e-9):10.0f}"
              f"       {fw:5.2f} / {fc:5.2f}")  # fmt: skip
    (jw, jc, jfw, jfc, _), (dw, dc, dfw, dfc, _) = got["jobs"], got["dask"]
    print(f"  dask throughput as % of --jobs: wall {jw / dw * 100:.0f}%, net of fixed costs "
          f"{(jw - jfw) / max(dw - dfw, 1e-9) * 100:.0f}%, by CPU time "
          f"{(jc - jfc) / max(dc - dfc, 1e-9) * 100:.0f}% (target: within 10%)")  # fmt: skip
    per_core = mb / max(dc - dfc, 1e-9)  # MB per CPU second of the Dask run, workers included
    bands = [float(x) for x in a.bandwidth.split(",")]
    print(f"scaling on paper: per-core rate {per_core:,.0f} MB/s (this run, every detector); "
          "expected fleet throughput min(workers x rate, storage bandwidth), GB/s")  # fmt: skip
    print("  workers " + "".join(f"  storage {b:g} GB/s" for b in bands))
    for w in (1, 2, 4, 8, 16, 32, 64):
        print(f"  {w:7d} " + "".join(f"  {min(w * per_core / 1e3, b):17.2f}" for b in bands))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--count", type=int, default=200)
    ap.add_argument("--size", type=parse_size, default=parse_size("1MiB"))
    ap.add_argument("--jobs", type=int, default=2)
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--keep", help="build the files in this directory and keep them")
    ap.add_argument("--dask", action="store_true", help="also --dask local:JOBS vs --jobs JOBS")
    ap.add_argument("--dask-only", action="store_true", help="only the Dask comparison")
    ap.add_argument("--bandwidth", default="1.1,2.8,11",
                    help="storage bandwidths for the scaling table, GB/s (10/25/100 GbE)")
    a = ap.parse_args()
    compile_package()
    size = a.size // PAGE * PAGE
    work = a.keep or tempfile.mkdtemp(prefix="bench_tree.")
    tree = os.path.join(work, "tree")
    large = os.path.join(work, "large.raw")
    os.makedirs(tree, exist_ok=True)
    with open(large, "wb") as big:
        for k in range(a.count):
            data = content(size, k)
            with open(os.path.join(tree, f"vm{k:04d}.raw"), "wb") as fh:
                fh.write(data)
            big.write(data)
    total = size * a.count
    env = dict(os.environ, VMLEAK_FINGERPRINT_KEY="00" * 32)
    state = os.path.join(work, "state.db")

    def fresh_state() -> None:
        for suffix in ("", "-wal", "-shm", ".lock"):
            if os.path.exists(state + suffix):
                os.remove(state + suffix)

    common = ["scan", "-q", "--no-progress", "--format", "jsonl", "-j", str(a.jobs)]
    vmleak([*common, tree], env)  # warm the page cache and imports
    if a.dask or a.dask_only:
        dask_comparison(a, tree, work, env)
    if a.dask_only:
        if not a.keep:
            shutil.rmtree(work)
        return
    vmleak([*common, large], env)
    startup, _ = timed(["--version"], env, a.repeat)
    t_large, n_large = timed([*common, large], env, a.repeat)
    t_tree, n_tree = timed([*common, tree], env, a.repeat)
    t_first, n_first = timed([*common, "--state", state, tree], env, a.repeat, fresh_state)
    t_second, n_second = timed([*common, "--state", state, tree], env, a.repeat)
    assert n_tree == n_large == n_first == n_second, (n_tree, n_large, n_first, n_second)
    # the nightly form (README): only what changed is printed, here nothing
    t_nightly, n_nightly = timed([*common, "--state", state, "--since-last", tree], env, a.repeat)
    assert n_nightly == 0, n_nightly

    mb = total / 1e6
    print(f"tree: {a.count} images x {size / 2**20:.2f} MiB = {mb:,.0f} MB; jobs {a.jobs}; "
          f"{n_tree} findings; median of {a.repeat}")  # fmt: skip
    print(f"  start-up (vmleak --version)      {startup:7.2f} s")
    print(f"  one large image                  {t_large:7.2f} s  {mb / t_large:7.1f} MB/s")
    print(f"  tree, no state                   {t_tree:7.2f} s  {mb / t_tree:7.1f} MB/s  "
          f"({t_large / t_tree * 100:.0f}% of the large image's throughput)")  # fmt: skip
    print(f"  tree, first run with --state     {t_first:7.2f} s  {mb / t_first:7.1f} MB/s  "
          f"({t_large / t_first * 100:.0f}%)")  # fmt: skip
    net = (t_second - startup) / max(t_first - startup, 1e-9) * 100
    share = t_second / t_first * 100
    print(f"  tree, unchanged second run       {t_second:7.2f} s  "
          f"({share:.1f}% of the first; {net:.1f}% without start-up)")  # fmt: skip
    net = (t_nightly - startup) / max(t_first - startup, 1e-9) * 100
    share = t_nightly / t_first * 100
    print(f"  same, --since-last (nightly)     {t_nightly:7.2f} s  "
          f"({share:.1f}% of the first; {net:.1f}% without start-up)")  # fmt: skip
    if not a.keep:
        shutil.rmtree(work)


if __name__ == "__main__":
    main()
