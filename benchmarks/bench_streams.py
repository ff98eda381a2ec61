"""Every detector on page streams made by the real QEMU, against the same guest memory as a flat
raw file (issue 12): a migration stream (what ``virsh save`` holds, uncompressed), a qcow2
internal snapshot's vmstate (``savevm``) and a kdump (``dump-guest-memory``, kdump-snappy,
kdump-lzo and kdump-zlib where this QEMU has them).

The guest: a paused ``pc`` machine (``-S``, TCG) whose RAM is the benchmark image, loaded with
``-device loader,file=IMAGE,addr=0,force-raw=on`` (as samples/gen_qemu.py plants text). The
reference raw file is ``vmleak extract`` of the migration stream (the guest's memory exactly
as QEMU saved it; the loader's copy differs from the image in the BIOS ROM area).

Each file is scanned by the real command line (``vmleak scan --format jsonl``, every detector,
one job) ``--runs`` times, the files taking turns; the figure is the **median CPU time** of
the whole process tree (user + sys of the command and its scanning worker, start-up
included: wall time is noise on a shared machine), as MB of guest memory per CPU second,
with the ratio to the raw file, whether its findings in guest-physical memory equal the raw
file's, and two peak RSS figures: the largest one process reached (``ru_maxrss`` of the
reaped command, which on Linux covers the worker it reaped: ``-j 1`` still scans in a worker
process), and the whole tree's (the sum of every process's RSS, sampled every 20 ms).

``--sizes`` runs the whole comparison for guests of several sizes in one run (each a prefix of
``--image``, its files made by QEMU like the full one) and ends with one line per file: the
scanning worker's peak RSS at each size, and by how much it grows from the smallest to the
largest (flat: the same few MiB whatever the guest's size). Usage::

    python benchmarks/bench_streams.py --image /tmp/vmleak-bench/m-1G.img --dir /tmp/vmleak-bench \
        --sizes 256M,1G --kdump kdump-zlib
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import threading
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
sys.path.insert(0, str(HERE.parent / "samples"))

import bytecode  # noqa: E402
import gen_qemu  # noqa: E402  (QMP client and QEMU launcher of the fixtures)

KDUMP_FORMATS = ("kdump-snappy", "kdump-lzo", "kdump-zlib")


def prefix_image(image: Path, size: int, out: Path) -> Path:
    """``image`` itself, or its first ``size`` bytes as a file under ``out`` (made once)."""
    if size >= image.stat().st_size:
        return image
    path = out / f"{image.stem}-{size >> 20}M.img"
    if not path.exists() or path.stat().st_size != size:
        out.mkdir(parents=True, exist_ok=True)
        with open(image, "rb") as src, open(path, "wb") as dst:
            left = size
            while left:
                block = src.read(min(left, 64 << 20))
                dst.write(block)
                left -= len(block)
    return path


def parse_size(text: str) -> int:
    """Bytes of ``256M`` / ``1G`` / ``4096``."""
    units = {"K": 1 << 10, "M": 1 << 20, "G": 1 << 30}
    text = text.strip().upper()
    return int(text[:-1]) * units[text[-1]] if text[-1] in units else int(text)


def qemu_guest(work: Path, image: Path, extra: list[str] | None = None):
    size = image.stat().st_size
    args = ["-device", f"loader,file={image},addr=0,force-raw=on", *(extra or [])]
    return gen_qemu.run_qemu(work, "pc", size, args)


def make_files(image: Path, out: Path, kdumps: tuple[str, ...]) -> dict[str, Path]:
    """The QEMU-made files of ``image``'s guest (made once; reused when present)."""
    out.mkdir(parents=True, exist_ok=True)
    stem = image.stem
    files = {"migration stream": out / f"{stem}.qevm"}
    if not files["migration stream"].exists():
        proc, qmp = qemu_guest(out, image)
        try:
            qmp.migrate_to(files["migration stream"])
        finally:
            gen_qemu.stop(proc, qmp)
    files["qcow2 vmstate"] = out / f"{stem}.qcow2"
    if not files["qcow2 vmstate"].exists():
        disk = files["qcow2 vmstate"]
        subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", str(disk), "16M"], check=True)
        proc, qmp = qemu_guest(out, image, ["-drive", f"file={disk},if=none,id=d0,format=qcow2"])
        try:
            reply = qmp.hmp("savevm bench")
            if reply.strip():
                raise SystemExit(f"savevm: {reply}")
        finally:
            gen_qemu.stop(proc, qmp)
    for fmt in kdumps:
        path = out / f"{stem}.{fmt}"
        if not path.exists():
            proc, qmp = qemu_guest(out, image)
            try:
                qmp.cmd("dump-guest-memory", paging=False, protocol=f"file:{path}", format=fmt)
            except RuntimeError as err:
                print(f"{fmt}: not made ({err})", file=sys.stderr)
                continue
            finally:
                gen_qemu.stop(proc, qmp)
        files[fmt] = path
    raw = out / f"{stem}.extract.raw"
    if not raw.exists():
        subprocess.run([sys.executable, "-m", "scanner", "extract", "-o", str(raw),
                        str(files["migration stream"])], check=True, cwd=HERE.parent)
    return {"raw (extract)": raw, **files}


def tree_rss(pid: int) -> int:
    """Bytes of RSS of process ``pid`` and all its descendants now (0 for those gone)."""
    total, todo = 0, [pid]
    while todo:
        p = todo.pop()
        try:
            status = Path(f"/proc/{p}/status").read_text()
            for task in os.listdir(f"/proc/{p}/task"):
                todo += map(int, Path(f"/proc/{p}/task/{task}/children").read_text().split())
        except OSError:  # ended meanwhile
            continue
        for line in status.splitlines():
            if line.startswith("VmRSS:"):
                total += int(line.split()[1]) * 1024
    return total


def sample_tree(proc: subprocess.Popen, peak: list[int]) -> None:
    """Until ``proc`` ends, keep in ``peak[0]`` the largest RSS sum of its process tree."""
    while proc.returncode is None and os.path.exists(f"/proc/{proc.pid}/task"):
        peak[0] = max(peak[0], tree_rss(proc.pid))
        time.sleep(0.02)


def scan(path: Path, detectors: str) -> tuple[float, int, int, list[tuple]]:
    """One whole-process scan: (CPU seconds of the process tree, peak RSS bytes of its
    largest process, peak RSS bytes of the whole tree (sampled), findings with a GPA)."""
    cmd = [sys.executable, "-m", "scanner", "scan", "--format", "jsonl", "--no-progress",
           "--detectors", detectors, "-j", "1", str(path)]
    env = dict(os.environ, VMLEAK_FINGERPRINT_KEY="00" * 32)
    out = path.parent / f".bench-{os.getpid()}.jsonl"
    with open(out, "w") as fh:
        proc = subprocess.Popen(cmd, stdout=fh, stderr=subprocess.PIPE, env=env, cwd=HERE.parent)
        tree = [0]
        sampler = threading.Thread(target=sample_tree, args=(proc, tree), daemon=True)
        sampler.start()
        stderr = proc.stderr.read().decode() if proc.stderr else ""  # until the child ends
        _, status, usage = os.wait4(proc.pid, 0)
        proc.returncode = os.waitstatus_to_exitcode(status)
        sampler.join()
    code = proc.returncode
    if code not in (0, 1):
        raise SystemExit(f"scan failed ({code}): {' '.join(cmd)}\n{stderr}")
    rows = [json.loads(line) for line in out.read_text().splitlines() if line.strip()]
    out.unlink()
    found = sorted((r["detector"], r["gpa"], r["length"], r["fingerprint"]) for r in rows
                   if r["gpa"] is not None)
    return usage.ru_utime + usage.ru_stime, usage.ru_maxrss * 1024, tree[0], found


def compare(image: Path, out: Path, args: argparse.Namespace) -> dict[str, int]:
    """Print the table of one guest; return each file's peak RSS (largest process), bytes."""
    files = make_files(image, out, tuple(f for f in args.kdump.split(",") if f))
    ram = image.stat().st_size
    cpu: dict[str, list[float]] = {name: [] for name in files}
    rss: dict[str, list[int]] = {name: [] for name in files}
    tree: dict[str, int] = {}
    found: dict[str, list[tuple]] = {}
    t0 = time.time()
    for _ in range(args.runs):
        for name, path in files.items():  # alternate: every file sees the same machine load
            sec, peak, whole, hits = scan(path, args.detectors)
            cpu[name].append(sec)
            rss[name].append(peak)
            tree[name] = max(tree.get(name, 0), whole)
            found[name] = hits
    print(f"\nevery detector ({args.detectors}), one job, guest RAM {ram / 1e6:,.0f} MB, "
          f"median CPU (user+sys) of {args.runs} runs, whole process; {time.time() - t0:.0f} s")
    print("| file | size MB | CPU s | MB/s of guest per CPU s | x raw | peak RSS MiB, largest "
          "process (median) | peak RSS MiB, process tree (max) | findings (GPA) | = raw |")
    print("|---|---|---|---|---|---|---|---|---|")
    ref = statistics.median(cpu["raw (extract)"])
    for name, path in files.items():
        med = statistics.median(cpu[name])
        same = "yes" if found[name] == found["raw (extract)"] else "NO"
        print(f"| {name} | {path.stat().st_size / 1e6:,.0f} | {med:.2f} | {ram / med / 1e6:,.0f} | "
              f"{ref / med:.2f} | {statistics.median(rss[name]) / 2**20:.0f} | "
              f"{tree[name] / 2**20:.0f} | {len(found[name])} | {same} |")
    return {name: int(statistics.median(v)) for name, v in rss.items()}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--image", type=Path, required=True, help="raw guest memory (e.g. M, 1 GiB)")
    ap.add_argument("--dir", type=Path, default=Path("/tmp/vmleak-bench/streams"))
    ap.add_argument("--runs", type=int, default=5)
    ap.add_argument("--detectors", default="all")
    ap.add_argument("--kdump", default=",".join(KDUMP_FORMATS),
                    help="kdump formats to make (comma-separated, '' for none)")
    ap.add_argument("--sizes", default="",
                    help="guest sizes to compare, prefixes of --image (e.g. 256M,1G; "
                    "default: the whole image only)")
    args = ap.parse_args(argv)
    bytecode.compile_package()
    image = args.image.resolve()
    sizes = [parse_size(t) for t in args.sizes.split(",") if t] or [image.stat().st_size]
    peaks = {size: compare(prefix_image(image, size, args.dir), args.dir, args)
             for size in sorted(sizes)}
    if len(peaks) > 1:
        lo, hi = min(peaks), max(peaks)
        names = " -> ".join(f"{s >> 20} MiB" for s in peaks)
        print(f"\npeak RSS of the scanning process (median), guest {names}:")
        for name in peaks[lo]:
            steps = " -> ".join(f"{p[name] / 2**20:.0f}" for p in peaks.values())
            grow = (peaks[hi][name] - peaks[lo][name]) / 2**20
            print(f"  {name}: {steps} MiB (grows {grow:+.0f})")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
