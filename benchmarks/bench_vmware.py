"""Does the VMware region map cost anything? Scan one .vmem as a VMware image (.vmss region
table: RAM below the PCI hole from GPA 0, the rest from 4 GiB) and as a raw image, and compare
throughput (MB/s of guest memory, wall time of ``Engine.scan_image`` in this process, median
of ``--repeat`` runs after one warm-up run that also fills the page cache).

By default the .vmem is a sparse file of ``--size`` bytes (default 4 GiB) with a few planted
PANs, so it costs no disk; ``--image`` uses an existing raw image instead (e.g. the ``M`` image
of ``benchmarks/gen_image.py``), linked as the .vmem, not copied. Both scans must report the
same secrets, at GPAs that differ only by the hole above the low region. Usage::

    python benchmarks/bench_vmware.py                       # 4 GiB sparse
    python benchmarks/bench_vmware.py --size 256M --repeat 1
    python benchmarks/bench_vmware.py --image m.img --detectors pan,ssn
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.dirname(HERE))

from benchmarks.inprocess import timed  # noqa: E402
from patterns import registry as detectors  # noqa: E402
from scanner.engine import Engine, ScanConfig  # noqa: E402
from tests import vmware_writer as w  # noqa: E402  (the test-only checkpoint writer)

HOLE_PPN = 0x100000  # the high region starts at 4 GiB
PANS = [b"4111111111111111", b"5555555555554444", b"4012888888881881", b"378282246310005"]


def parse_size(text: str) -> int:
    units = {"K": 1 << 10, "M": 1 << 20, "G": 1 << 30}
    text = text.strip().upper().rstrip("B")
    return int(text[:-1]) * units[text[-1]] if text[-1] in units else int(text)


def build(directory: str, size: int, image: str | None) -> tuple[str, str, list[w.Region]]:
    """Write ``bench.vmss`` (+ a sparse ``bench.vmem``, or a link to ``image``)."""
    pages = size // w.PAGE
    low = min(pages * 3 // 4, 0xC0000)  # at most 3 GiB below the hole, as x86 guests have
    regions = w.pci_hole_layout(low, pages - low, HOLE_PPN)
    vmem = os.path.join(directory, "bench.vmem")
    if image:
        os.symlink(os.path.abspath(image), vmem)
    else:
        step = size // (len(PANS) + 1)
        w.write_vmem(vmem, size, {step * (k + 1) - 64: p for k, p in enumerate(PANS)})
    ck = os.path.join(directory, "bench.vmss")
    w.write_checkpoint(ck, w.standard_groups(regions))
    return ck, vmem, regions


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--size", default="4G", help="sparse .vmem size (default 4G)")
    ap.add_argument("--image", help="use this raw image as the .vmem instead")
    ap.add_argument("--detectors", default="pan,track1,track2,ssn")
    ap.add_argument("--repeat", type=int, default=3, help="timed runs (median)")
    ap.add_argument("--dir", help="where to build (default: a temporary directory)")
    args = ap.parse_args()
    size = os.path.getsize(args.image) if args.image else parse_size(args.size)
    size -= size % w.PAGE
    engine = Engine(ScanConfig(detectors=detectors.select(args.detectors), key=b"bench"))
    with tempfile.TemporaryDirectory(dir=args.dir) as directory:
        ck, vmem, regions = build(directory, size, args.image)
        t_vm, n_vm, f_vm = timed(engine, ck, None, args.repeat, count_open=False)
        t_raw, n_raw, f_raw = timed(engine, vmem, "raw", args.repeat, count_open=False)
    low_end = regions[0].pages * w.PAGE
    shift = HOLE_PPN * w.PAGE - low_end  # GPA of a byte above the hole minus its offset

    def away(gpa: int) -> bool:
        # Only bytes next to the low region's end may differ: adjacent in the raw file, a
        # hole apart in the guest.
        return not (
            low_end - 128 <= gpa < low_end + 128 or gpa - shift in range(low_end, low_end + 128)
        )

    want = sorted(
        (f.gpa + shift if f.gpa >= low_end else f.gpa, f.fingerprint) for f in f_raw if away(f.gpa)
    )
    got = sorted((f.gpa, f.fingerprint) for f in f_vm if away(f.gpa))
    same = "yes" if want == got else "NO"
    mb = 1e6
    print(
        f"guest memory: {n_vm / mb:,.0f} MB in {len(regions)} regions (hole from "
        f"{low_end:#x} to {HOLE_PPN * w.PAGE:#x}); detectors: {args.detectors}"
    )
    print(f"vmware-vmss: {n_vm / t_vm / mb:8,.0f} MB/s  ({t_vm:.2f} s, {len(f_vm)} findings)")
    print(f"raw:         {n_raw / t_raw / mb:8,.0f} MB/s  ({t_raw:.2f} s, {len(f_raw)} findings)")
    print(f"vmware/raw throughput: {t_raw / t_vm:.3f}; same findings at mapped GPAs: {same}")
    if same != "yes":
        raise SystemExit(1)


if __name__ == "__main__":
    main()
