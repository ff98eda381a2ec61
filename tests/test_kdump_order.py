"""A kdump's pages reach the engine in PFN order: raw runs (zero-copy views) are merged with
the compressed pages decoded through windows, so the only pages that come after a later one
are those waiting in the decompression window when a run comes (its edges wait in the
engine's store only until that window is yielded)."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from parsers import kdump, registry
from parsers.base import GPA_SPACE
from tests.dumpwriter import Kdump, write_kdump

PAGE = 4096


def test_raw_runs_and_compressed_pages_yielded_in_pfn_order(tmp_path: Path) -> None:
    rng = np.random.default_rng(5)
    pages = {}
    for pfn in range(3 * kdump.WINDOW_BYTES // PAGE):  # three windows of compressible pages
        if pfn % 64 < kdump.MIN_RUN:  # with a raw (incompressible) run every 64 pages
            pages[pfn] = rng.integers(0, 256, PAGE, np.uint8).tobytes()
        else:
            pages[pfn] = f"page {pfn} ".encode().ljust(PAGE, b"t")
    path = tmp_path / "mixed.kdump"
    write_kdump(str(path), pages, Kdump(codec="zlib"))
    image = registry.open_image(str(path), None, {})
    seen = []  # PFNs yielded
    runs = []  # [first PFN, windows yielded since] of each raw run (a zero-copy segment)
    for seg in image.segments():
        guest = seg.extents.space == GPA_SPACE  # not the file regions scanned after
        if not guest.any():
            continue
        ext = zip(seg.extents.addr[guest].tolist(), seg.extents.length[guest].tolist(),
                  strict=True)  # extents of adjacent pages come merged
        pfns = [p for a, n in ext for p in range(a // PAGE, (a + n) // PAGE)]
        seen += pfns
        if not seg.reused:
            runs.append([pfns[0], 0])
            continue
        for run in runs:  # pages before a run come in the window filling when it came
            assert run[1] == 0 or min(pfns) > run[0]
            run[1] += 1
    assert sorted(seen) == sorted(pages)
    assert len(runs) > 8
