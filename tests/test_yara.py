"""YARA rules as the ``yara`` detector (patterns/yara.py) on real QEMU/libvirt fixtures: string
matches across page seams and decompression windows found once at their GPA, masking,
fingerprints, rule errors, and worker processes loading the saved rules."""

from __future__ import annotations

import json
import pickle
import sys
from pathlib import Path

import pytest

from parsers import registry
from scanner.engine import Engine, ScanConfig

pytest.importorskip("yara_x", reason="yara-x is not installed (pip install 'vmleak[yara]')",
                    exc_type=ImportError)
from patterns import yara as vy  # noqa: E402

QEMU = Path(__file__).resolve().parent.parent / "samples" / "qemu"
MANIFEST = json.loads((QEMU / "manifest.json").read_text())
KEY = b"k" * 32

RULES = """
rule straddler : card seam
{
    strings:
        $pan = "5544332211009989"
        $wide = "5544332211009989" wide
    condition:
        any of them
}

rule tagged_card
{
    strings:
        $text = /lv-[a-z0-9]+ card=[0-9]{16};/
    condition:
        $text
}
"""


def rules_file(tmp: Path, text: str = RULES, name: str = "cards.yar") -> Path:
    path = tmp / name
    path.write_text(text)
    return path


def scan(path: Path, det: vy.YaraDetector, unmask: bool = False) -> list:
    with registry.open_image(str(path)) as image:
        result = Engine(ScanConfig([det], KEY, unmask=unmask)).scan_image(image)
    assert not result.errors
    return result.findings


def plant_gpa(name: str, text: str) -> int:
    return next(p["gpa"] + p["text"].index(text) for p in MANIFEST[name]["plants"]
                if text in p["text"])


@pytest.mark.parametrize("name", ["pc-64m.qevm", "libvirt-raw.save", "libvirt-gzip.save"])
def test_string_across_a_page_seam_found_once_at_its_gpa(tmp_path: Path, name: str) -> None:
    det = vy.YaraDetector.from_files([str(rules_file(tmp_path))])
    found = [f for f in scan(QEMU / name, det) if f.details["rule"] == "straddler"]
    gpa = plant_gpa(name, "5544332211009989")
    assert gpa % 4096 > 4096 - 16  # it does straddle the boundary at 2 MiB
    assert [(f.gpa, f.length) for f in found] == [(gpa, 16)]
    f = found[0]
    assert f.detector == "yara"
    assert f.details == {"rule": "straddler", "namespace": "cards", "tags": ["card", "seam"],
                         "string": "$pan"}
    assert f.masked == "55...89 (16 bytes)"
    assert "value" not in f.details


def test_regex_rule_per_libvirt_fixture_and_unmask(tmp_path: Path) -> None:
    det = vy.YaraDetector.from_files([str(rules_file(tmp_path))])
    found = [f for f in scan(QEMU / "libvirt-xz.save", det, unmask=True)
             if f.details["rule"] == "tagged_card"]
    text = next(p["text"] for p in MANIFEST["libvirt-xz.save"]["plants"] if "card=" in p["text"])
    assert [f.details["value"] for f in found] == [f"cards:tagged_card:$text={text}"]
    assert found[0].gpa == plant_gpa("libvirt-xz.save", text)


def test_fingerprint_covers_the_matched_bytes(tmp_path: Path) -> None:
    """The two saves hold the same card number after different tags ("lv-raw card=",
    "lv-gzip card="): the digits alone fingerprint alike, the tagged texts do not."""
    rule = """rule digits { strings: $a = /card=[0-9]{16}/ condition: $a }
              rule tagged { strings: $a = /lv-[a-z]+ card=[0-9]{16}/ condition: $a }"""
    det = vy.YaraDetector.from_files([str(rules_file(tmp_path, rule))])
    raw, gz = (
        {f.details["rule"]: f.fingerprint for f in scan(QEMU / name, det)}
        for name in ("libvirt-raw.save", "libvirt-gzip.save")
    )
    assert raw["digits"] == gz["digits"]
    assert raw["tagged"] != gz["tagged"]


def test_syntax_error_names_file_and_line(tmp_path: Path) -> None:
    bad = rules_file(tmp_path, "rule ok { condition: true }\n\nrule bad {\n  strings: $a = \n}\n",
                     "bad.yar")
    with pytest.raises(vy.RuleError) as err:
        vy.compile_rules([str(bad)])
    assert str(err.value).startswith(f"{bad}:5: error")


def test_directory_of_rules_and_missing_paths(tmp_path: Path) -> None:
    (tmp_path / "d" / "sub").mkdir(parents=True)
    rules_file(tmp_path / "d", RULES, "a.yar")
    rules_file(tmp_path / "d" / "sub", 'rule r2 { strings: $x = "zz" condition: $x }', "b.yara")
    (tmp_path / "d" / "notes.txt").write_text("not a rule")
    assert [Path(p).name for p in vy.rule_files([str(tmp_path / "d")])] == ["a.yar", "b.yara"]
    with pytest.raises(vy.RuleError, match="no such rule file"):
        vy.rule_files([str(tmp_path / "nope.yar")])
    (tmp_path / "empty").mkdir()
    with pytest.raises(vy.RuleError, match="no .yar"):
        vy.rule_files([str(tmp_path / "empty")])


def test_detector_pickles_without_loaded_rules(tmp_path: Path) -> None:
    """Worker processes get the saved rules, load them once, and match as the parent does."""
    det = vy.YaraDetector.from_files([str(rules_file(tmp_path))])
    before = scan(QEMU / "pc-64m.qevm", det)
    clone = pickle.loads(pickle.dumps(det))
    assert clone._scanner is None and clone.max_len == det.max_len
    assert [(f.gpa, f.fingerprint) for f in scan(QEMU / "pc-64m.qevm", clone)] == [
        (f.gpa, f.fingerprint) for f in before
    ]


def test_mask_shows_length_and_ends_only() -> None:
    assert vy.mask(b"password=hunter2!") == "pa...2! (17 bytes)"
    assert vy.mask(b"\x00\x01secretsecret\xfe\xff") == "0001...feff (16 bytes)"
    assert vy.mask(b"short") == "(5 bytes)"


def test_without_yara_python_says_how_to_install(monkeypatch: pytest.MonkeyPatch,
                                                 tmp_path: Path) -> None:
    monkeypatch.setitem(sys.modules, "yara_x", None)  # import yara_x -> ImportError
    with pytest.raises(vy.RuleError, match=r"pip install 'vmleak\[yara\]'"):
        vy.compile_rules([str(rules_file(tmp_path))])
