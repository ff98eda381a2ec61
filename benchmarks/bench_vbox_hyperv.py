"""VirtualBox .sav and Hyper-V .vmrs against the same memory raw: scan throughput with every
detector (MB/s of guest memory, CPU time of the process: user + sys), and the decompressor
alone (LZF for the .sav, XPRESS for the .vmrs: every compressed page decoded, nothing scanned).

The containers are made by the test-only writers (``tests/vbox_writer.py``,
``tests/hyperv_writer.py``) from a raw image — by default the memory-like ``M`` image of
``benchmarks/gen_image.py`` of ``--size`` bytes, generated into ``benchmarks/out/`` once and
reused. The .sav is written as SSM writes it (LZF records, raw where LZF does not shrink a
page, zero records); the .vmrs gets fill tags for zero pages and XPRESS for pages that
compress well, from the writer's simple greedy compressor (slower to write than Windows' and
compressing less: generating a 4 GiB .vmrs takes a long while, once). Each figure is the
median CPU time of ``--repeat`` runs after a warm-up. Usage::

    python benchmarks/bench_vbox_hyperv.py --size 4G          # the issue's benchmark
    python benchmarks/bench_vbox_hyperv.py --size 256M --repeat 3
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.dirname(HERE))

from parsers import registry  # noqa: E402
from patterns import registry as detectors  # noqa: E402
from scanner.engine import Engine, ScanConfig  # noqa: E402
from tests import hyperv_writer, vbox_writer  # noqa: E402  (test-only writers)


def cpu() -> float:
    t = os.times()
    return t.user + t.system


def median_cpu(fn, repeat: int) -> tuple[float, object]:
    out = fn()  # warm-up, fills the page cache
    times = []
    for _ in range(repeat):
        t0 = cpu()
        out = fn()
        times.append(cpu() - t0)
    return statistics.median(times), out


def scan(engine: Engine, path: str):
    def run():
        with registry.open_image(path) as image:
            result = engine.scan_image(image)
        if result.errors:
            raise SystemExit(f"{path}: {result.errors}")
        return result

    return run


def decode(path: str):
    """Open the image and decode every compressed page (the record walk included), scanning
    nothing: the cost of the container and its codec alone."""

    def run():
        with registry.open_image(path) as image:
            return sum(seg.extents.total() for seg in image.segments())

    return run


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--size", default="4G")
    ap.add_argument("--image", help="raw image to use instead of generating the M image")
    ap.add_argument("--out", default=os.path.join(HERE, "out"))
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--detectors", default="all")
    args = ap.parse_args()
    os.makedirs(args.out, exist_ok=True)
    raw = args.image or os.path.join(args.out, f"m-{args.size}.img")
    if not os.path.exists(raw):
        subprocess.run([sys.executable, os.path.join(HERE, "gen_image.py"), "--kind", "M",
                        "--size", args.size, "--seed", "1", "-o", raw], check=True)  # fmt: skip
    stem = os.path.splitext(os.path.basename(raw))[0]
    sav = os.path.join(args.out, stem + ".sav")
    vmrs = os.path.join(args.out, stem + ".vmrs")
    for path, make in ((sav, vbox_writer.write_sav_from_raw),
                       (vmrs, hyperv_writer.write_vmrs_from_raw)):  # fmt: skip
        if not os.path.exists(path):
            t0 = time.perf_counter()
            make(raw, path + ".part")
            os.replace(path + ".part", path)
            print(f"wrote {path} in {time.perf_counter() - t0:.0f} s", file=sys.stderr)
    names = None if args.detectors == "all" else args.detectors
    engine = Engine(ScanConfig(detectors=detectors.select(names), key=b"bench"))
    mb = os.path.getsize(raw) / 1e6
    rows = []
    for label, fn in (("raw", scan(engine, raw)), ("vbox-sav", scan(engine, sav)),
                      ("hyperv-vmrs", scan(engine, vmrs)),
                      ("LZF decode alone (.sav walk + pages)", decode(sav)),
                      ("XPRESS decode alone (.vmrs pages)", decode(vmrs))):  # fmt: skip
        t, out = median_cpu(fn, args.repeat)
        rows.append((label, t, out))
    base = rows[0][1]
    print(f"guest memory: {mb:,.0f} MB ({raw}); detectors: {args.detectors}; "
          f"median CPU seconds (user+sys) of {args.repeat} runs after a warm-up")  # fmt: skip
    for label, t, out in rows:
        extra = f", {len(out.findings)} findings" if hasattr(out, "findings") else ""
        print(f"  {label:40s} {t:8.2f} s  {mb / t:8.0f} MB/s  ({base / t:5.0%} of raw){extra}")


if __name__ == "__main__":
    main()
