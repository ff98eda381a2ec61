"""VirtualBox .sav and Hyper-V .vmrs against the same memory raw: scan throughput with every
detector, the container walk + decoding without a scan, and the page codec alone (LZF for the
.sav, XPRESS for the .vmrs). MB/s of guest memory (10^6 bytes of the raw image), from the CPU
time of this process (user + sys, ``time.process_time``), median of ``--repeat`` runs after a
warm-up: the machine is shared, so wall clock means little (the lead reruns it quietly).

The containers are made by the test-only writers (``tests/vbox_writer.py``,
``tests/hyperv_writer.py``) from a raw image — by default the memory-like ``M`` image of
``benchmarks/gen_image.py`` of ``--size`` bytes (seed 1), generated into ``--out`` once and
reused with the containers. The .sav is written as SSM writes it (LZF records, raw where LZF
does not shrink a page, zero records). The .vmrs as a Hyper-V host writes it: zero pages as
fill tags, pages that compress as XPRESS, the rest raw; its Python XPRESS compressor (~4 ms a
page) compresses each distinct page once and reuses it (memory repeats pages; the M image draws
its pages from pools), so writing 4 GiB takes minutes, not days. Usage::

    python benchmarks/bench_vbox_hyperv.py --size 4G          # the issue's benchmark
    python benchmarks/bench_vbox_hyperv.py --size 1G --repeat 3
    python benchmarks/bench_vbox_hyperv.py --size 1G --profile vmrs   # where the time goes
"""

from __future__ import annotations

import argparse
import cProfile
import os
import pstats
import statistics
import subprocess
import sys
import time
from collections.abc import Callable

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.dirname(HERE))

import lzf  # noqa: E402
import pyfwnt  # noqa: E402

from parsers import hyperv, registry  # noqa: E402
from parsers.base import Evidence  # noqa: E402
from patterns import registry as detectors  # noqa: E402
from scanner.engine import Engine, ScanConfig  # noqa: E402
from tests import hyperv_writer, vbox_writer  # noqa: E402  (test-only writers)

PAGE = 4096


def median_cpu(fn: Callable[[], tuple[float | None, str]], repeat: int) -> tuple[float, str]:
    """Median CPU seconds of ``repeat`` runs after a warm-up (which fills the page cache).
    ``fn`` returns (its own CPU seconds, or None to time the whole call; a note)."""
    fn()
    times, note = [], ""
    for _ in range(repeat):
        t0 = time.process_time()
        own, note = fn()
        times.append(own if own is not None else time.process_time() - t0)
    return statistics.median(times), note


def scan(engine: Engine, path: str) -> Callable[[], tuple[None, str]]:
    def run() -> tuple[None, str]:
        with registry.open_image(path) as image:
            result = engine.scan_image(image)
        if result.errors:
            raise SystemExit(f"{path}: {result.errors}")
        return None, f"{len(result.findings)} findings"

    return run


def walk(path: str) -> Callable[[], tuple[None, str]]:
    """Open the image and produce every segment (record walk, pages decoded into windows),
    scanning nothing: the container's cost alone."""

    def run() -> tuple[None, str]:
        with registry.open_image(path) as image:
            n = sum(int(seg.extents.length.sum()) for seg in image.segments())
        return None, f"{n / 1e6:,.0f} MB mapped"

    return run


def lzf_alone(raw: str) -> Callable[[], tuple[float, str]]:
    """liblzf's decoder on exactly the pages the .sav holds as LZF records: each non-zero page
    of the raw image compressed as the writer does (not timed), then decoded (timed)."""

    def run() -> tuple[float, str]:
        cpu = 0.0
        packed_pages = raw_pages = 0
        with open(raw, "rb") as fh:
            while chunk := fh.read(16 << 20):
                batch = []
                for k in range(0, len(chunk), PAGE):
                    pg = chunk[k : k + PAGE]
                    if pg.count(0) != PAGE:
                        packed = lzf.compress(pg, PAGE - PAGE // 16)
                        if packed:
                            batch.append(packed)
                        else:
                            raw_pages += 1
                t0 = time.process_time()
                for data in batch:
                    lzf.decompress(data, PAGE)
                cpu += time.process_time() - t0
                packed_pages += len(batch)
        return cpu, f"{packed_pages:,} LZF pages, {raw_pages:,} raw"

    return run


def xpress_alone(vmrs: str) -> Callable[[], tuple[float, str]]:
    """libfwnt's XPRESS decoder on every compressed page of the .vmrs: the RamBlocks' tags
    parsed (not timed), then each block's pages decoded (timed)."""

    def run() -> tuple[float, str]:
        cpu = 0.0
        counts = {"xpress": 0, "raw": 0, "fill": 0}
        ev = Evidence(vmrs)
        try:
            c = hyperv.read_container(ev, vmrs)
            for k in c.keys:
                if not k.name.startswith("RamBlock"):
                    continue
                pieces, _ = hyperv.parse_block(ev, k.value_at, k.value_size)
                batch = []
                for _, count, kind, at, size, _ in pieces:
                    if kind == hyperv._PACKED:
                        batch.append(ev.data[at : at + size].tobytes())
                    counts["raw" if kind == hyperv._RAW else "fill"] += count
                t0 = time.process_time()
                for data in batch:
                    pyfwnt.lzxpress_decompress(data, PAGE + 1)
                cpu += time.process_time() - t0
                counts["xpress"] += len(batch)
        finally:
            ev.close()
        counts["fill"] -= counts["xpress"]
        return cpu, ", ".join(f"{v:,} {n}" for n, v in counts.items()) + " pages"

    return run


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--size", default="4G", help="size of the generated M image (4G, 1G, ...)")
    ap.add_argument("--image", help="raw image to use instead of generating the M image")
    ap.add_argument("--out", default=os.path.join(HERE, "out"))
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--detectors", default="all")
    ap.add_argument("--profile", choices=("sav", "vmrs"),
                    help="profile one scan of that container instead")  # fmt: skip
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
        if not os.path.exists(path) or os.path.getmtime(path) < os.path.getmtime(raw):
            t0 = time.perf_counter()
            make(raw, path + ".part")
            os.replace(path + ".part", path)
            print(f"wrote {path} in {time.perf_counter() - t0:.0f} s (wall)", file=sys.stderr)
    engine = Engine(ScanConfig(detectors=detectors.select(args.detectors), key=b"bench"))
    if args.profile:
        prof = cProfile.Profile()
        prof.runcall(scan(engine, sav if args.profile == "sav" else vmrs))
        pstats.Stats(prof).sort_stats("tottime").print_stats(15)
        return
    mb = os.path.getsize(raw) / 1e6
    rows = [
        ("raw image, every detector", scan(engine, raw)),
        (".sav, every detector", scan(engine, sav)),
        (".vmrs, every detector", scan(engine, vmrs)),
        (".sav opened + walked, no scan", walk(sav)),
        (".vmrs opened + walked, no scan", walk(vmrs)),
        ("LZF decoder alone (.sav's pages)", lzf_alone(raw)),
        ("XPRESS decoder alone (.vmrs's pages)", xpress_alone(vmrs)),
    ]
    print(f"guest memory: {mb:,.0f} MB ({raw}); .sav {os.path.getsize(sav) / 1e6:,.0f} MB, "
          f".vmrs {os.path.getsize(vmrs) / 1e6:,.0f} MB; detectors: {args.detectors}; "
          f"median CPU seconds (user+sys) of {args.repeat} runs after a warm-up")  # fmt: skip
    base = None
    for label, fn in rows:
        t, note = median_cpu(fn, args.repeat)
        base = base or t
        print(f"  {label:38s} {t:7.2f} s {mb / t:7.0f} MB/s  {t / base:5.2f}x raw's time  "
              f"{note}", flush=True)  # fmt: skip


if __name__ == "__main__":
    main()
