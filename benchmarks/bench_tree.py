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

Usage::

    python benchmarks/bench_tree.py --count 200 --size 1MiB --jobs 2
"""

from __future__ import annotations

import argparse
import os
import random
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
    t0 = time.perf_counter()
    r = subprocess.run(
        [sys.executable, "-m", "scanner", *args], capture_output=True, text=True, env=env, cwd=ROOT
    )
    dt = time.perf_counter() - t0
    if r.returncode not in (0, 1):
        raise SystemExit(f"vmleak {' '.join(args)} failed:\n{r.stderr}")
    return dt, r


def timed(args: list[str], env: dict[str, str], repeat: int, before=None) -> tuple[float, int]:
    """Median wall time of ``repeat`` runs and the findings count of the last."""
    times = []
    for _ in range(repeat):
        if before:
            before()
        dt, r = vmleak(args, env)
        times.append(dt)
    return statistics.median(times), len(r.stdout.splitlines())


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--count", type=int, default=200)
    ap.add_argument("--size", type=parse_size, default=parse_size("1MiB"))
    ap.add_argument("--jobs", type=int, default=2)
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--keep", help="build the files in this directory and keep them")
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
