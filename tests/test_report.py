"""Evidence reports: report.json contents tie findings to input bytes, report.html is
self-contained and renders the expected numbers in headless Chromium, files are 0600."""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import stat
import subprocess

import pytest

from scanner.report import STRIP_W, strip_svg
from tests.plant import PAGE, PAN, SSN, lime, raw_with

TRACK2 = ";4556737586899855=25121010000012300000?"


@pytest.fixture
def evidence(tmp_path, vmleak):
    ds = tmp_path / "ds"
    ds.mkdir()
    raw_with(ds / "a.raw", {100: f"card {PAN}", 3 * PAGE + 50: TRACK2}, pages=16)
    mem = bytearray(8 * PAGE)
    mem[5 * PAGE + 10 : 5 * PAGE + 23] = f" {SSN} ".encode()
    (ds / "b.lime").write_bytes(lime(bytes(mem), [0, 1, 2, 3, 5, 6]))  # pages 4 and 7 absent
    raw_with(ds / "clean.raw", {})
    out = tmp_path / "rep"
    r = vmleak("report", "-o", str(out), "-j", "1", str(ds))
    assert r.returncode == 1, r.stderr
    return ds, out, r


def load(out) -> dict:
    return json.loads((out / "report.json").read_text())


def test_report_json_ties_findings_to_bytes(evidence):
    ds, out, r = evidence
    doc = load(out)
    assert doc["command_line"][:2] == ["vmleak", "report"]
    assert doc["started"] <= doc["ended"] and doc["host"]["name"]
    assert {d["name"] for d in doc["detectors"]} >= {"pan", "track2", "ssn"}
    assert all(d["version"] for d in doc["detectors"])
    assert re.fullmatch(r"[0-9a-f]{16}", doc["fingerprints"]["key_check"])
    imgs = {os.path.basename(i["image"]): i for i in doc["images"]}
    assert set(imgs) == {"a.raw", "b.lime", "clean.raw"}
    for i in doc["images"]:
        (f,) = i["files"]
        data = open(f["path"], "rb").read()
        assert f["sha256"] == hashlib.sha256(data).hexdigest() and f["size"] == len(data)
        assert f["modified_since_scan_start"] is False
        for x in i["findings"]:  # the masked value's visible digits are at that file offset
            assert x["offset"] is not None
            raw = data[x["offset"] : x["offset"] + x["length"]].decode()
            tail = re.sub(r"\D", "", x["masked"])[-4:]
            assert tail and tail in raw
    a, b = imgs["a.raw"], imgs["b.lime"]
    assert [(x["detector"], x["gpa"], x["pci"]) for x in a["findings"]] == [
        ("pan", 106, "pan"),
        ("track2", 3 * PAGE + 51, "track"),
    ]
    assert a["format"] == "raw" and a["meta"]["ram_size"] == 16 * PAGE
    assert b["gpa_ranges"] == [[0, 4 * PAGE], [5 * PAGE, 7 * PAGE]]
    assert [(x["detector"], x["gpa"]) for x in b["findings"]] == [("ssn", 5 * PAGE + 11)]
    s = doc["summary"]
    assert (s["images"], s["findings"], s["images_with_findings"]) == (3, 3, 2)
    assert s["findings_by_detector"] == {"pan": 1, "ssn": 1, "track2": 1}
    assert "3.2.1" in doc["pci_requirements"]["track"]["requirements"]
    assert doc["exit_status"] == 1 and doc["unmasked"] is False


def test_report_files_private_self_contained_and_not_overwritten(evidence, tmp_path, vmleak):
    ds, out, _ = evidence
    assert stat.S_IMODE(out.stat().st_mode) == 0o700
    for name in ("report.json", "report.html"):
        assert stat.S_IMODE((out / name).stat().st_mode) == 0o600
    page = (out / "report.html").read_text()
    assert "Content-Security-Policy" in page and "default-src 'none'" in page
    for needle in ("http://", "https://", "<script", "<link", "src=", "url("):
        assert needle not in page.replace("http://www.w3.org/2000/svg", "")
    for needle in ("3.2.1", "3.3", "3.4", "3.5.1.1", "<svg"):
        assert needle in page
    r = vmleak("report", "-o", str(out), str(ds))
    assert r.returncode == 2 and "--force" in r.stderr
    assert vmleak("report", "-q", "--force", "-o", str(out), str(ds)).returncode == 1


def test_strip_places_findings_at_their_gpa():
    img = {
        "gpa_ranges": [[0, 1 << 20], [3 << 20, 4 << 20]],
        "meta": {},
        "findings": [
            {"gpa": 1 << 20, "length": 16, "detector": "pan", "pci": "pan", "accepted": None},
            {"gpa": 2 << 20, "length": 16, "detector": "pan", "pci": "pan", "accepted": "x"},
            {"gpa": None, "length": 16, "detector": "ssn", "pci": "pii", "accepted": None},
        ],
    }
    svg = strip_svg(img)
    scale = STRIP_W / (4 << 20)
    assert f"x='{1 + int((1 << 20) * scale)}' y='3'" in svg  # the PAN tick
    assert "fill='#999'><title>1 pan at GPA 0x200000" in svg  # accepted: grey
    assert svg.count("fill='#cfe3cf'") == 2  # the two ranges held
    assert svg.count("<title>") == 2  # the finding without a GPA has no tick


CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")


@pytest.mark.skipif(CHROMIUM is None, reason="Debian package chromium not installed")
def test_html_renders_expected_numbers_in_chromium(evidence, tmp_path):
    _, out, _ = evidence
    cmd = [
        CHROMIUM, "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic",
        "--no-first-run", "--disable-background-networking", "--disable-component-update",
        "--disable-sync", f"--user-data-dir={tmp_path / 'chromium'}", "--dump-dom",
        (out / "report.html").as_uri(),
    ]  # fmt: skip
    dom = subprocess.run(cmd, capture_output=True, text=True, timeout=120).stdout
    assert dom, "chromium produced no DOM"

    def cell(ident: str) -> str:
        m = re.search(rf'id="{ident}"[^>]*>([^<]*)<', dom)
        assert m, ident
        return m.group(1)

    assert cell("images") == "3" and cell("total-findings") == "3"
    assert cell("images-with-findings") == "2" and cell("exit-status") == "1"
    assert (cell("pci-pan"), cell("pci-track"), cell("pci-pii"), cell("pci-key")) == (
        "1",
        "1",
        "1",
        "0",
    )
    doc = load(out)
    for n, img in enumerate(doc["images"]):
        assert cell(f"img{n}-total") == str(len(img["findings"]))
    assert dom.count("<svg") == 3  # one strip per image
    assert f"1 ssn at GPA {5 * PAGE + 11:#x}" in dom
    assert PAN not in dom and SSN not in dom
