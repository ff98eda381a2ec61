"""The command line's one exit rule and what it says of coverage (issue 13; issue 11 part 1):
``scan``, ``report``, ``extract`` and ``info`` on the real fixtures (``samples/``) changed by
one byte or one field."""

from __future__ import annotations

import json
import shutil
import struct
from pathlib import Path

import numpy as np

from tests.samples import dump_sample, qemu_sample

PAN = "4556737586899855"


def copied(name: str, tmp: Path) -> Path:
    """A writable copy of the QEMU/libvirt fixture ``name`` in ``tmp``."""
    out = tmp / Path(name).name.removesuffix(".xz")
    src = qemu_sample(name, tmp)
    if src != out:
        shutil.copyfile(src, out)
    return out


def every_command(vmleak, path: Path, tmp: Path) -> dict[str, object]:
    """The runs of scan, report, extract and info (text and json) on ``path``."""
    return {
        "scan": vmleak("scan", "--detectors", "pan", str(path)),
        "report": vmleak("report", "--detectors", "pan", "-o", str(tmp / "rep"), str(path)),
        "extract": vmleak("extract", "-o", str(tmp / "out.raw"), str(path)),
        "info": vmleak("info", str(path)),
        "info-json": vmleak("info", "--format", "json", str(path)),
    }


def kdump_bitmap2(data: bytearray) -> tuple[int, int]:
    """(offset, size) of a kdump's 2nd (dumpable pages) bitmap (docs/formats.md, kdump)."""
    bs, sub, bitmaps = struct.unpack_from("<III", data, 0x1AC)
    return (1 + sub) * bs + bitmaps * bs // 2, bitmaps * bs // 2


def test_a_truncated_save_is_exit_2_for_every_command(tmp_path: Path, vmleak) -> None:
    """The issue's 121 mutants: extract said ``warning:`` and exited 0 where scan exited 2."""
    path = copied("libvirt-raw.save", tmp_path)
    size = path.stat().st_size
    with open(path, "r+b") as f:
        f.truncate(size // 2)  # the stream ends in the middle of its RAM pages
    runs = every_command(vmleak, path, tmp_path)
    assert {k: r.returncode for k, r in runs.items()} == dict.fromkeys(runs, 2), {
        k: r.stderr for k, r in runs.items()}
    (said,) = [ln for ln in runs["extract"].stderr.splitlines() if "guest memory missing" in ln]
    assert said.startswith(f"vmleak: {path}")  # an error, as scan prints it, not a warning
    assert (tmp_path / "out.raw").stat().st_size > 0  # what was readable is written
    assert any(ln.startswith("error:") and "guest memory missing" in ln
               for ln in runs["info"].stdout.splitlines())
    assert any("guest memory missing" in e for e in json.loads(runs["info-json"].stdout)["errors"])
    rep = json.loads((tmp_path / "rep" / "report.json").read_text())
    (img,) = rep["images"]
    assert img["meta"]["coverage"]["missing"] > 0 and img["errors"]


def test_the_intact_save_is_exit_0_for_extract_and_info(tmp_path: Path, vmleak) -> None:
    path = copied("libvirt-raw.save", tmp_path)
    for args in (("extract", "-o", str(tmp_path / "o.raw"), str(path)), ("info", str(path))):
        run = vmleak(*args)
        assert run.returncode == 0, run.stderr
        assert "error" not in run.stdout + run.stderr


def test_info_shows_guest_bytes_regions_and_structure_per_file(tmp_path: Path, vmleak) -> None:
    """Every byte of the file is guest memory, a region scanned anyway, or structure."""
    path = copied("libvirt-raw.save", tmp_path)
    run = vmleak("info", str(path))
    assert run.returncode == 0, run.stderr
    (line,) = [ln for ln in run.stdout.splitlines() if ln.startswith("file:")]
    assert "header" in line and "padding" in line and "device-state" in line
    info = json.loads(vmleak("info", "--format", "json", str(path)).stdout)
    cov, row = info["meta"]["coverage"], info["bytes_per_file"][str(path)]
    assert sum(n for k, n in row.items() if k != "guest") == cov["outside"] > 0
    assert row["guest"] + cov["outside"] + cov["structure"] == path.stat().st_size
    assert cov["declared"] == cov["read"] and cov["missing"] == 0


def test_pages_a_kdump_leaves_out_are_stated_everywhere(tmp_path: Path, vmleak) -> None:
    """One bit of the 2nd bitmap cleared: a page the dump leaves out on purpose (dump level):
    exit 0, and info, the summary and report.json say how much and why."""
    path = dump_sample("pc-64M.kdump-zlib.gz", tmp_path)
    data = bytearray(path.read_bytes())
    at, n = kdump_bitmap2(data)
    last = int(np.flatnonzero(np.frombuffer(bytes(data[at : at + n]), np.uint8))[-1])
    data[at + last] &= 0x7F  # the highest stored PFN: the descriptors before it still hold
    path.write_bytes(bytes(data))
    runs = every_command(vmleak, path, tmp_path)
    want = {"scan": 1, "report": 1, "extract": 0, "info": 0, "info-json": 0}  # 1: planted PANs
    assert {k: r.returncode for k, r in runs.items()} == want, {
        k: r.stderr for k, r in runs.items()}
    assert "4,096 bytes excluded on purpose" in runs["info"].stdout
    assert "4,096 bytes of guest memory excluded on purpose" in runs["scan"].stderr
    rep = json.loads((tmp_path / "rep" / "report.json").read_text())
    assert rep["images"][0]["meta"]["coverage"]["excluded"] == 4096
    html = (tmp_path / "rep" / "report.html").read_text()
    assert "4,096 bytes excluded on purpose" in html


def test_a_kdump_excluding_every_page_is_exit_2_for_every_command(tmp_path: Path,
                                                                 vmleak) -> None:
    path = dump_sample("pc-64M.kdump-zlib.gz", tmp_path)
    data = bytearray(path.read_bytes())
    at, n = kdump_bitmap2(data)
    data[at : at + n] = bytes(n)  # one field: the dumpable-page bitmap, every bit cleared
    path.write_bytes(bytes(data))
    runs = every_command(vmleak, path, tmp_path)
    assert {k: r.returncode for k, r in runs.items()} == dict.fromkeys(runs, 2)
    assert "no guest memory in this image" in runs["info"].stdout


def test_a_file_nothing_recognises_says_raw_in_summary_info_and_report(tmp_path: Path,
                                                                       vmleak) -> None:
    """Flat guest memory (the save's memory written out by extract) has no magic: scanned as
    raw, and the summary, info and report say so (a damaged image would read the same)."""
    flat = tmp_path / "flat.raw"
    assert vmleak("extract", "-o", str(flat), str(copied("libvirt-raw.save", tmp_path))
                  ).returncode == 0
    (tmp_path / "again").mkdir()
    runs = every_command(vmleak, flat, tmp_path / "again")
    assert runs["scan"].returncode == 1 and runs["extract"].returncode == 0
    assert "1 image(s) scanned as raw only because no known format" in runs["scan"].stderr
    assert "scanned:  as raw memory only because no known format" in runs["info"].stdout
    rep = json.loads((tmp_path / "again" / "rep" / "report.json").read_text())
    assert rep["images"][0]["meta"]["unrecognised"] is True
    assert "no known format recognised" in (tmp_path / "again" / "rep" / "report.html").read_text()


def test_summary_and_report_count_file_regions_apart_from_guest_memory(
    tmp_path: Path, vmleak
) -> None:
    """A raw libvirt save's header, padding and device state are scanned, but they are not
    guest memory: the summary and report.json give the two amounts apart, and together they
    are every byte scanned, as ``info`` counts them."""
    path = copied("libvirt-raw.save", tmp_path)
    info = json.loads(vmleak("info", "--format", "json", str(path)).stdout)
    guest = info["bytes_per_file"][str(path)]["guest"]
    outside = info["meta"]["coverage"]["outside"]
    assert guest > 0 and outside > 0
    run = vmleak("report", "--detectors", "pan", "-o", str(tmp_path / "rep"), str(path))
    (summary,) = [ln for ln in run.stderr.splitlines() if "MB of guest memory" in ln]
    assert (f"{guest / 1e6:,.1f} MB of guest memory and {outside / 1e6:,.1f} MB of file regions "
            "outside it") in summary, summary
    stats = json.loads((tmp_path / "rep" / "report.json").read_text())["summary"]
    assert (stats["bytes_scanned"], stats["region_bytes"]) == (guest + outside, outside)


def test_each_qcow2_snapshot_declares_its_own_ram(tmp_path: Path, vmleak) -> None:
    """A qcow2 with two snapshots holds two streams, each with its RAM block list: the
    declarations add up as the pages read do, so the second snapshot cut short (its
    vm_state_size field made smaller) is guest memory missing against both, not hidden by
    the first one's pages."""
    path = copied("savevm.qcow2.xz", tmp_path)
    data = bytearray(path.read_bytes())
    count, table = struct.unpack_from(">IQ", data, 60)  # nb_snapshots, snapshots_offset
    assert count == 2
    at = table
    extra, id_len, name_len = (struct.unpack_from(">I", data, at + 36)[0],
                               *struct.unpack_from(">HH", data, at + 12))
    at = -(-(at + 40 + extra + id_len + name_len) // 8) * 8  # the second entry
    struct.pack_into(">I", data, at + 32, 150_000)  # vm_state_size
    struct.pack_into(">Q", data, at + 40, 150_000)  # extra data: its 64-bit form
    path.write_bytes(bytes(data))
    run = vmleak("scan", "--detectors", "pan", str(path))
    assert run.returncode == 2, run.stderr
    (line,) = [ln for ln in run.stderr.splitlines() if "guest memory missing" in ln]
    assert "declares 68,173,824 bytes" in line  # 2 x (32 MiB RAM + ROMs), not one snapshot's
