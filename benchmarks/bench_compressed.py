"""Compressed saves against the decompressor alone (issue 12: "within 1.2x of the decompressor
alone on the same file"). Build a ``virsh save``-style file of a raw memory image (libvirt
header + QEMU stream, written by ``bench_libvirt.make_save`` and compressed with the program
and level libvirt uses), then time, alternating, medians of ``--repeat`` rounds:

- the decompressor alone on the same payload (``gzip -dc`` etc., reading the save file from
  the payload offset, output to /dev/null);
- ``vmleak scan`` of the save with every detector, ``-j 1`` and the default jobs;
- with ``--before DIR``: the same two scans run from another checkout (e.g. a ``git worktree``
  of main before the read-ahead decoder) with this interpreter.

Prints WALL and CPU (user+sys of the process tree) seconds, and the ratio scan wall /
decompressor wall (target <= 1.2). Wall time is the figure the issue asks for: it only means
something on an otherwise idle machine.

Usage (build the image with benchmarks/gen_image.py)::

    python benchmarks/bench_compressed.py --image /tmp/vmleak-bench/m-1G.img \\
        --compress gzip,zstd,lzop,xz [--before /tmp/vmleak-before] [--repeat 3]
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import subprocess
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
sys.path.insert(0, ROOT)

from benchmarks.bench_libvirt import COMPRESS, make_save  # noqa: E402
from parsers import registry  # noqa: E402

# The decompressor libvirt itself would run to restore, output discarded.
DECOMPRESS = {"gzip": ["gzip", "-dc"], "bzip2": ["bzip2", "-dc"], "xz": ["xz", "-dc"],
              "lzop": ["lzop", "-dc"], "zstd": ["zstd", "-dcq"]}
SCAN = "import sys; from scanner.cli import main; sys.argv[0] = 'vmleak'; main()"


def run(cmd: list[str], stdin_at: tuple[str, int] | None = None,
        cwd: str | None = None) -> tuple[float, float]:
    """(wall seconds, CPU seconds of the whole process tree) of ``cmd``, stdout discarded;
    with ``stdin_at`` = (file, offset), its stdin is that file read from that offset."""
    env = dict(os.environ, PYTHONPATH=cwd) if cwd else None
    fh = open(stdin_at[0], "rb") if stdin_at else subprocess.DEVNULL  # noqa: SIM115
    try:
        if stdin_at:
            fh.seek(stdin_at[1])
        t0 = time.perf_counter()
        proc = subprocess.Popen(cmd, stdin=fh, stdout=subprocess.DEVNULL, cwd=cwd, env=env)
        _, status, usage = os.wait4(proc.pid, 0)
        wall = time.perf_counter() - t0
    finally:
        if stdin_at:
            fh.close()
    code = os.waitstatus_to_exitcode(status)
    if code not in (0, 1):  # 1: findings
        raise SystemExit(f"{' '.join(cmd)}: exit status {code}")
    return wall, usage.ru_utime + usage.ru_stime


def payload_offset(path: str) -> int:
    with registry.open_image(path) as image:
        return int(image.meta["payload_offset"])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--image", required=True, help="raw memory image (e.g. from gen_image.py)")
    ap.add_argument("--compress", default="gzip,zstd,lzop")
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--before", help="another checkout whose vmleak scan is timed too")
    ap.add_argument("--workdir", default=os.path.join(HERE, "out"))
    opts = ap.parse_args()
    os.makedirs(opts.workdir, exist_ok=True)
    trees = {"after": ROOT, **({"before": opts.before} if opts.before else {})}
    print(f"medians of {opts.repeat} alternating rounds; wall and CPU seconds")
    for fmt in [c for c in opts.compress.split(",") if c]:
        if shutil.which(COMPRESS[fmt][1][0]) is None:
            print(f"{fmt}: program not installed, skipped")
            continue
        save = os.path.join(opts.workdir, f"bench-{os.path.basename(opts.image)}.{fmt}.save")
        if not os.path.exists(save):
            make_save(opts.image, save, fmt)
        start = payload_offset(save)
        cases: dict[str, tuple[list[str], tuple[str, int] | None, str | None]] = {
            "decompressor": (DECOMPRESS[fmt], (save, start), None)}
        for label, tree in trees.items():
            for jobs in ("1", "default"):
                cmd = [sys.executable, "-c", SCAN, "scan", "-q", "--no-progress", save]
                if jobs == "1":
                    cmd[4:4] = ["-j", "1"]
                cases[f"scan {label} -j {jobs}"] = (cmd, None, tree)
        times: dict[str, list[tuple[float, float]]] = {k: [] for k in cases}
        for _ in range(opts.repeat):
            for name, (cmd, stdin_at, tree) in cases.items():
                times[name].append(run(cmd, stdin_at, tree))
        base = statistics.median(w for w, _ in times["decompressor"])
        print(f"{fmt}: file {os.path.getsize(save) / 1e6:.0f} MB")
        for name, got in times.items():
            wall = statistics.median(w for w, _ in got)
            cpu = statistics.median(c for _, c in got)
            print(f"  {name:24} wall {wall:7.2f}  cpu {cpu:7.2f}  ratio {wall / base:5.2f}x")


if __name__ == "__main__":
    main()
