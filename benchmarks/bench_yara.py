"""YARA over guest memory (issue 15): 20 string rules (``rules20.yar``) on the 1 GiB memory-like
image, through vmleak's engine alone and together with every built-in detector, and the two
bindings compared on the same bytes.

Rows (all CPU time, user + sys of this process, median of ``--runs`` after a warm-up run that
also fills the page cache; one job; MB = 10^6 bytes of image):

- ``engine: yara alone`` / ``engine: every detector`` / ``engine: every detector + yara`` —
  ``Engine.scan_image`` on the raw image (what ``vmleak scan -j 1`` does per image, without the
  interpreter start-up), so the YARA cost is the difference of the last two rows;
- ``yara-python`` / ``yara-x`` — the compiled rules run over the same image in 4 MiB chunks by
  each library directly (yara-python on a memoryview of the mmap, no copy; yara-x needs
  ``bytes``, so each chunk is copied first, as vmleak does). vmleak uses yara-x (the faster
  here); yara-python is measured when installed (``pip install yara-python``).

Usage: ``python benchmarks/bench_yara.py [--image m-1G.img] [--workdir /tmp/vmleak-bench]
[--runs 3]`` (the image is generated with gen_image.py when missing).
"""

from __future__ import annotations

import argparse
import mmap
import sys
import time
from collections.abc import Callable
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))
sys.path.insert(0, str(HERE))

# CPU-time medians after a warm-up run; a timed call returns (None, note)
from bench_vbox_hyperv import median_cpu  # noqa: E402

from parsers import registry  # noqa: E402
from patterns.registry import DETECTORS  # noqa: E402
from patterns.yara import YaraDetector  # noqa: E402
from scanner.engine import Engine, ScanConfig  # noqa: E402

RULES = HERE / "rules20.yar"
CHUNK = 4 << 20


def engine_run(image: Path, detectors: list) -> Callable[[], tuple[None, str]]:
    def go() -> tuple[None, str]:
        with registry.open_image(str(image)) as img:
            found = Engine(ScanConfig(detectors, b"k" * 32)).scan_image(img).findings
        return None, str(len(found))
    return go


def python_run(image: Path) -> Callable[[], tuple[None, str]] | None:
    try:
        import yara
    except ImportError:
        return None

    rules = yara.compile(filepath=str(RULES))

    def go() -> tuple[None, str]:
        n = 0
        with open(image, "rb") as fh, mmap.mmap(fh.fileno(), 0, access=mmap.ACCESS_READ) as mm:
            view = memoryview(mm)
            for a in range(0, len(mm), CHUNK):
                n += len(rules.match(data=view[a : a + CHUNK]))
            view.release()
        return None, str(n)
    return go


def x_run(image: Path) -> Callable[[], tuple[None, str]]:
    import yara_x

    rules = yara_x.compile(RULES.read_text())

    def go() -> tuple[None, str]:
        n = 0
        scanner = yara_x.Scanner(rules)
        with open(image, "rb") as fh, mmap.mmap(fh.fileno(), 0, access=mmap.ACCESS_READ) as mm:
            for a in range(0, len(mm), CHUNK):
                n += len(scanner.scan(mm[a : a + CHUNK]).matching_rules)
        return None, str(n)
    return go


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--image", type=Path, default=None)
    ap.add_argument("--workdir", type=Path, default=Path("/tmp/vmleak-bench"))
    ap.add_argument("--runs", type=int, default=3)
    opts = ap.parse_args(argv)
    image = opts.image
    if image is None:
        import throughput

        opts.workdir.mkdir(parents=True, exist_ok=True)
        image = throughput.ensure_image(opts.workdir, "M", "1G")
    size = image.stat().st_size
    yara_det = YaraDetector.from_files([str(RULES)])
    rows: list[tuple[str, Callable[[], tuple[None, str]] | None]] = [
        ("engine: yara alone (20 rules)", engine_run(image, [yara_det])),
        ("engine: every detector", engine_run(image, list(DETECTORS))),
        ("engine: every detector + yara", engine_run(image, [*DETECTORS, yara_det])),
        ("yara-python 4 MiB chunks, no copy", python_run(image)),
        ("yara-x 4 MiB chunks, copied to bytes", x_run(image)),
    ]
    print(f"{image} ({size / 1e6:,.0f} MB), CPU time medians of {opts.runs} run(s), 1 job")
    print("| run | CPU s | MB/s | findings (engine) / matching rules (libraries) |")
    print("|---|---|---|---|")
    for name, fn in rows:
        if fn is None:
            print(f"| {name} | not installed | | |")
            continue
        t0 = time.perf_counter()
        secs, n = median_cpu(fn, opts.runs)
        print(f"| {name} | {secs:.2f} | {size / secs / 1e6:,.0f} | {n} |  "
              f"(wall {time.perf_counter() - t0:.1f} s for all runs)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
