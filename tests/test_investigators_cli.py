"""The command-line side of issue 15: ``scan --yara``, ``info --format json`` (guest clock,
file time), ``--dormant-days`` on scan and report, ``vol3-path`` — on the real QEMU/libvirt
fixtures."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from parsers import clock

ROOT = Path(__file__).resolve().parent.parent
QEMU = ROOT / "samples" / "qemu"
ENV = {**os.environ, "VMLEAK_FINGERPRINT_KEY": "test-key"}
RULE = 'rule straddler : card { strings: $pan = "5544332211009989" condition: $pan }\n'


def vmleak(*args: str, pre: str = "") -> subprocess.CompletedProcess:
    code = f"{pre}import sys; from scanner.cli import main; sys.argv[0] = 'vmleak'; main()"
    return subprocess.run([sys.executable, "-c", code, *args], capture_output=True, text=True,
                          timeout=300, env=ENV, cwd=ROOT)


def jsonl(done: subprocess.CompletedProcess) -> list[dict]:
    return [json.loads(x) for x in done.stdout.splitlines() if x.strip()]


def days_since(iso: str) -> int:
    return int((time.time() - clock.parse(iso)) // 86400)


# ---- YARA -----------------------------------------------------------------------------------

def test_scan_yara_reports_each_string_match_masked_at_its_gpa(tmp_path: Path) -> None:
    pytest.importorskip("yara_x", reason="yara-x is not installed", exc_type=ImportError)
    rules = tmp_path / "cards.yar"
    rules.write_text(RULE)
    done = vmleak("scan", "--format", "jsonl", "--detectors", "ssn", "--yara", str(rules),
                  "--dormant-days", "100000", str(QEMU / "pc-64m.qevm"))
    assert done.returncode == 1, done.stderr
    [f] = jsonl(done)
    assert (f["detector"], f["gpa"], f["length"], f["masked"]) == (
        "yara", 0x200000 - 8, 16, "55...89 (16 bytes)")
    assert f["details"] == {"rule": "straddler", "namespace": "cards", "tags": ["card"],
                            "string": "$pan"}


def test_scan_yara_says_conditions_are_per_window(tmp_path: Path) -> None:
    pytest.importorskip("yara_x", reason="yara-x is not installed", exc_type=ImportError)
    rules = tmp_path / "cards.yar"
    rules.write_text(RULE)
    image = str(QEMU / "pc-64m.qevm")
    done = vmleak("scan", "-q", "--detectors", "ssn", "--yara", str(rules), image)
    assert done.returncode == 1, done.stderr
    (note,) = [x for x in done.stderr.splitlines() if "condition" in x]
    assert note.startswith("vmleak: note: --yara: each rule's condition is evaluated per "
                           "scanned window (a chunk of 8 MiB")
    assert "not per image" in note
    plain = vmleak("scan", "-q", "--detectors", "ssn", image)
    assert "condition" not in plain.stderr


def test_scan_yara_directory_repeatable_and_unmask(tmp_path: Path) -> None:
    pytest.importorskip("yara_x", reason="yara-x is not installed", exc_type=ImportError)
    (tmp_path / "d").mkdir()
    (tmp_path / "d" / "a.yar").write_text(RULE)
    other = tmp_path / "b.yar"
    other.write_text('rule tag { strings: $t = "pc-64m card=" condition: $t }\n')
    done = vmleak("scan", "--format", "jsonl", "--detectors", "ssn", "--unmask", "--yara",
                  str(tmp_path / "d"), "--yara", str(other), str(QEMU / "pc-64m.qevm"))
    assert done.returncode == 1, done.stderr
    values = sorted(f["details"]["value"] for f in jsonl(done))
    assert values == ["a:straddler:$pan=5544332211009989", "b:tag:$t=pc-64m card="]


def test_rule_syntax_error_names_file_and_line_before_any_image(tmp_path: Path) -> None:
    pytest.importorskip("yara_x", reason="yara-x is not installed", exc_type=ImportError)
    bad = tmp_path / "bad.yar"
    bad.write_text("rule ok { condition: true }\nrule bad {\n  strings: $a = \n}\n")
    done = vmleak("scan", "--yara", str(bad), str(tmp_path / "no-such-image"))
    assert done.returncode == 2
    assert f"{bad}:4: error" in done.stderr
    assert "no-such-image" not in done.stderr  # the rules are read first
    assert "Traceback" not in done.stderr


def test_yara_without_yara_python_says_how_to_install(tmp_path: Path) -> None:
    rules = tmp_path / "r.yar"
    rules.write_text(RULE)
    done = vmleak("scan", "--yara", str(rules), str(QEMU / "pc-64m.qevm"),
                  pre="import sys; sys.modules['yara_x'] = None; ")
    assert done.returncode == 2
    assert "pip install 'vmleak[yara]'" in done.stderr


def test_help_states_the_yara_seam_length() -> None:
    done = vmleak("scan", "--help")
    assert "--yara-max-len" in done.stdout and "default: 4096" in done.stdout


# ---- info --format json ---------------------------------------------------------------------

@pytest.mark.parametrize("name", ["pc-64m.qevm", "libvirt-gzip.save", "libvirt-raw.save"])
def test_info_json_guest_clock_and_file_time(name: str) -> None:
    done = vmleak("info", "--format", "json", str(QEMU / name))
    assert done.returncode == 0, done.stderr
    doc = json.loads(done.stdout)
    manifest = json.loads((QEMU / "manifest.json").read_text())
    assert doc["guest_clock"].startswith(manifest[name]["made"] + "T")
    assert doc["file_mtime"] == clock.iso(os.stat(QEMU / name).st_mtime)
    assert "guest_clock" not in doc["meta"]


def test_info_json_null_clock_where_nothing_says(tmp_path: Path) -> None:
    raw = tmp_path / "flat.raw"
    raw.write_bytes(bytes(8192))
    doc = json.loads(vmleak("info", "--format", "json", str(raw)).stdout)
    assert doc["guest_clock"] is None and doc["format"] == "raw"


# ---- dormant images -------------------------------------------------------------------------

def test_dormant_by_guest_clock_in_jsonl_and_summary() -> None:
    image = QEMU / "pc-64m.qevm"
    age = days_since("2026-11-23T15:14:08Z")  # its guest clock (test_clock.py)
    done = vmleak("scan", "--format", "jsonl", "--detectors", "pan", "--dormant-days",
                  str(age - 1), str(image))
    found = jsonl(done)
    assert found and all(f["details"]["dormant_days"] == age for f in found)
    assert f"1 dormant image(s) (saved over {age - 1} days ago)" in done.stderr
    fresh = vmleak("scan", "--format", "jsonl", "--detectors", "pan", "--dormant-days",
                   str(age), str(image))
    assert all("dormant_days" not in f["details"] for f in jsonl(fresh))
    assert "dormant" not in fresh.stderr


def test_dormant_by_file_time_without_a_guest_clock(tmp_path: Path) -> None:
    raw = tmp_path / "old.raw"
    raw.write_bytes(b"card 4532015112830366 " + bytes(8170))
    then = time.time() - 200 * 86400
    os.utime(raw, (then, then))
    found = jsonl(vmleak("scan", "--format", "jsonl", str(raw)))
    assert [f["details"]["dormant_days"] for f in found] == [200]


def test_report_lists_dormant_images_with_their_age(tmp_path: Path) -> None:
    out = tmp_path / "rep"
    old, new = QEMU / "libvirt-raw.save", tmp_path / "new.raw"
    new.write_bytes(bytes(4096))
    age = days_since(json.loads(vmleak("info", "--format", "json", str(old)).stdout)
                     ["guest_clock"])
    done = vmleak("report", "-o", str(out), "--detectors", "pan", "--dormant-days", "5",
                  str(old), str(new))
    assert done.returncode == 1, done.stderr
    doc = json.loads((out / "report.json").read_text())
    [d] = doc["dormant_images"]
    assert (d["image"], d["age_days"], d["source"], d["threshold_days"]) == (
        str(old), age, "guest_clock", 5)
    html = (out / "report.html").read_text()
    assert "<h2>Dormant images</h2>" in html and f"<td class='n'>{age}</td>" in html


# ---- vol3-path ------------------------------------------------------------------------------

def test_vol3_path_is_the_plugin_directory() -> None:
    done = vmleak("vol3-path")
    assert done.returncode == 0
    path = Path(done.stdout.strip())
    assert (path / "vmleak.py").is_file()
    assert sorted(p.name for p in path.glob("*.py")) == ["vmleak.py"]  # volatility3 imports all
