"""Nightly scans of a datastore tree through the CLI: incremental runs with a state database,
new/resolved findings and --fail-on, diff, baseline and allowlist, globs and symlinks,
a run killed mid-way, concurrent runs, and no secret in anything written."""

from __future__ import annotations

import json
import os
import signal
import sqlite3
import subprocess
import sys
import time

import pytest

from scanner.state import StateDB
from tests.plant import PAGE, PAN, SSN, lime, luhn_digit, raw_with

PAN2 = "491761234567890" + luhn_digit("491761234567890")
AWS = "AKIAJ7QXZ2M4KPL3WRT5"
KEY_HEX = "00" * 32


@pytest.fixture
def tree(tmp_path):
    """A datastore: two images with secrets (raw, LiME), a clean one, junk, a FIFO, symlinks
    (inside, outside the tree, dangling), an image outside the tree (reached only by a link)."""
    ds = tmp_path / "ds"
    (ds / "vm2").mkdir(parents=True)
    raw_with(ds / "vm1.raw", {100: f"card {PAN}", 3000: f"aws_access_key_id = {AWS}"})
    mem = bytearray(8 * PAGE)
    mem[2 * PAGE - 6 : 2 * PAGE + 7] = f" {SSN} ".encode()  # straddles two pages
    (ds / "vm2" / "mem.lime").write_bytes(lime(bytes(mem), [3, 1, 0, 2, 4, 5, 6, 7]))
    raw_with(ds / "clean.raw", {})
    (ds / "notes.txt").write_text("not an image")
    (ds / "blob.bin").write_bytes(bytes(range(256)) * 4)  # no magic, not whole pages
    os.mkfifo(ds / "pipe")
    outside = tmp_path / "outside.raw"
    raw_with(outside, {500: PAN2})
    os.symlink(outside, ds / "link-out.raw")
    os.symlink(ds / "vm1.raw", ds / "vm2" / "same.raw")  # inside: scanned once only
    os.symlink(ds / "gone.raw", ds / "dangling")
    return ds


def summary_line(r: subprocess.CompletedProcess) -> str:
    (line,) = [x for x in r.stderr.splitlines() if " image(s)" in x]
    return line


def jsonl(r: subprocess.CompletedProcess) -> list[dict]:
    return [json.loads(x) for x in r.stdout.splitlines()]


def test_incremental_runs_new_resolved_fail_on(tree, tmp_path, vmleak):
    db = str(tmp_path / "state.db")
    scan = ("scan", "--state", db, "-j", "1", "--format", "jsonl")
    r = vmleak(*scan, "--fail-on", "new", str(tree))
    assert r.returncode == 1, r.stderr  # first night: everything is new
    rows = jsonl(r)
    assert sorted((os.path.basename(x["image"]), x["detector"]) for x in rows) == [
        ("mem.lime", "ssn"),
        ("vm1.raw", "aws-key"),
        ("vm1.raw", "pan"),
    ]
    line = summary_line(r)
    assert "3 scanned, 0 unchanged" in line and "3 new" in line
    for what in ("2 non-image files", "1 symlinks leading out", "1 broken symlinks"):
        assert what in line
    assert "FIFOs" in line and "second names of the same file" in line
    assert PAN2[-4:] not in r.stdout  # the image outside the tree was not followed

    r = vmleak(*scan, "--fail-on", "new", str(tree))
    assert r.returncode == 0, r.stderr
    assert "0 scanned, 3 unchanged" in summary_line(r) and len(jsonl(r)) == 3  # stored results
    assert vmleak(*scan, str(tree)).returncode == 1  # --fail-on any (default): findings remain

    raw_with(tree / "clean.raw", {7000: f"visa {PAN2}"})  # a new finding appears
    r = vmleak(*scan, "--fail-on", "new", "--since-last", str(tree))
    assert r.returncode == 1
    assert "1 scanned, 2 unchanged" in summary_line(r)
    (change,) = jsonl(r)
    assert (change["change"], change["detector"], change["gpa"]) == ("new", "pan", 7006)
    assert change["image"].endswith("clean.raw") and PAN2 not in r.stdout

    (tree / "vm2" / "mem.lime").unlink()  # an image disappears: its finding is resolved
    r = vmleak(*scan, "--since-last", str(tree))
    assert r.returncode == 0, r.stderr  # --since-last defaults to --fail-on new
    (change,) = jsonl(r)
    assert (change["change"], change["detector"]) == ("resolved", "ssn")
    assert "1 removed" in summary_line(r) and "1 resolved" in summary_line(r)

    d = vmleak("diff", "--state", db, "--format", "jsonl")
    assert d.returncode == 0 and [x["change"] for x in jsonl(d)] == ["resolved"]
    d = vmleak("diff", "--state", db, "--run", "4")
    assert d.returncode == 1 and "NEW" in d.stdout and "clean.raw" in d.stdout
    runs = vmleak("diff", "--state", db, "--list-runs").stdout.splitlines()
    assert len(runs) == 5 and all("complete" in x for x in runs)

    r = vmleak(*scan, "--full", str(tree))
    assert "2 scanned, 0 unchanged" in summary_line(r)  # the two images left


def test_config_change_rescans_and_other_key_refused(tree, tmp_path, vmleak):
    db = str(tmp_path / "state.db")
    vmleak("scan", "--state", db, "-q", str(tree))
    r = vmleak("scan", "--state", db, "--detectors", "cards", str(tree))
    assert "3 scanned" in summary_line(r)  # other detectors: results not comparable
    r = vmleak("scan", "--state", db, str(tree), env={"VMLEAK_FINGERPRINT_KEY": "11" * 32})
    assert r.returncode == 2 and "another fingerprint key" in r.stderr
    assert "Traceback" not in r.stderr


def test_globs_and_follow_symlinks(tree, tmp_path, vmleak):
    r = vmleak("scan", "--format", "jsonl", "--exclude", "vm2", str(tree))
    assert {os.path.basename(x["image"]) for x in jsonl(r)} == {"vm1.raw"}
    assert "excluded by --include/--exclude" in r.stderr
    r = vmleak("scan", "--format", "jsonl", "--include", "*.lime", str(tree))
    assert {x["detector"] for x in jsonl(r)} == {"ssn"}
    r = vmleak("scan", "--format", "jsonl", "--follow-symlinks", str(tree))
    pans = [x for x in jsonl(r) if x["detector"] == "pan"]
    assert len(pans) == 2 and any(x["image"].endswith("link-out.raw") for x in pans)


def test_baseline_and_allowlist(tree, tmp_path, vmleak):
    db = str(tmp_path / "state.db")
    assert vmleak("scan", "--state", db, "-q", str(tree)).returncode == 1
    base = tmp_path / "baseline.json"
    r = vmleak("baseline", "create", "--state", db, "-o", str(base))
    assert r.returncode == 0 and "3 finding(s)" in r.stderr
    assert oct(base.stat().st_mode & 0o777) == "0o600"
    assert PAN not in base.read_text() and "455673******9855" in base.read_text()
    r = vmleak("scan", "--format", "jsonl", "--baseline", str(base), str(tree))
    assert r.returncode == 0 and r.stdout == "" and "3 accepted" in r.stderr
    raw_with(tree / "clean.raw", {100: PAN2})
    r = vmleak("scan", "--format", "jsonl", "--baseline", str(base), "--fail-on", "new", str(tree))
    assert r.returncode == 1 and [x["image"][-9:] for x in jsonl(r)] == ["clean.raw"]

    allow = tmp_path / "allow.txt"
    allow.write_text(f"# test ranges\npan-iin {PAN2[:6]}  QA cards (ticket 7)\n")
    r = vmleak(
        "scan", "--format", "jsonl", "--baseline", str(base), "--allowlist", str(allow), str(tree)
    )
    assert r.returncode == 0 and r.stdout == ""
    allow.write_text("pan-iin 491761\n")
    r = vmleak("scan", "--allowlist", str(allow), str(tree))
    assert r.returncode == 2 and "line 1" in r.stderr and "reason" in r.stderr
    r = vmleak("scan", "--baseline", str(base), str(tree), env={"VMLEAK_FINGERPRINT_KEY": "22" * 8})
    assert r.returncode == 2 and "another fingerprint key" in r.stderr


def test_killed_run_keeps_stored_results(tmp_path, vmleak):
    ds = tmp_path / "ds"
    ds.mkdir()
    raw_with(ds / "a-first.raw", {100: PAN})
    # A slow second image: digits everywhere, scanned in tiny chunks.
    pattern = bytes(b"0123456789 "[(k * 7) % 11] for k in range(1 << 20))
    (ds / "z-slow.raw").write_bytes(pattern * 48)
    db = tmp_path / "state.db"
    env = dict(os.environ, VMLEAK_FINGERPRINT_KEY=KEY_HEX)
    args = ["scan", "--state", str(db), "-j", "1", "--chunk-size", "4096", str(ds)]
    proc = subprocess.Popen(
        [sys.executable, "-m", "scanner", *args],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        env=env,
    )
    deadline = time.monotonic() + 60
    stored = []
    try:
        while time.monotonic() < deadline and not stored and proc.poll() is None:
            time.sleep(0.05)
            if db.exists():
                try:
                    stored = sqlite3.connect(db).execute("SELECT path FROM images").fetchall()
                except sqlite3.OperationalError:
                    stored = []  # schema not there yet
        assert proc.poll() is None, "the run ended before it could be killed"
        proc.send_signal(signal.SIGKILL)
    finally:
        proc.wait()
    assert [os.path.basename(p) for (p,) in stored] == ["a-first.raw"]
    with StateDB(db, bytes.fromhex(KEY_HEX)) as st:
        assert [(f.detector, f.gpa) for f in st.current_findings()] == [("pan", 101)]
        assert [r.status for r in st.runs()] == ["running"]
    # The next run does not scan the stored image again, and says the killed run was cut.
    r = vmleak("scan", "--state", str(db), "--fail-on", "new", str(ds / "a-first.raw"))
    assert r.returncode == 0 and "0 scanned, 1 unchanged" in summary_line(r), r.stderr
    runs = vmleak("diff", "--state", str(db), "--list-runs").stdout.splitlines()
    assert "interrupted" in runs[0] and "complete" in runs[1]


def test_concurrent_run_waits_then_fails_clearly(tree, tmp_path, vmleak):
    db = tmp_path / "state.db"
    with StateDB(db, bytes.fromhex(KEY_HEX), writer=True):
        t0 = time.monotonic()
        r = vmleak("scan", "--state", str(db), "--lock-wait", "1", str(tree))
        assert time.monotonic() - t0 >= 1
    assert r.returncode == 2 and "another vmleak run holds the state database" in r.stderr
    assert "Traceback" not in r.stderr
    assert vmleak("scan", "--state", str(db), "-q", str(tree)).returncode == 1  # free again


def written_files(*roots) -> list:
    out = []
    for root in roots:
        for dirpath, _, names in os.walk(root):
            out += [os.path.join(dirpath, n) for n in names]
    return out


def test_no_secret_in_anything_written_unless_unmask(tree, tmp_path, vmleak):
    state_home = tmp_path / "xdg"
    env = {"XDG_STATE_HOME": str(state_home)}
    default_db = str(state_home / "vmleak" / "state.db")
    out = tmp_path / "out"
    out.mkdir()
    logs = []
    for args in (
        ("scan", "--since-last", str(tree)),  # the default state database
        ("scan", "--format", "jsonl", "--fail-on", "new", str(tree)),
        ("baseline", "create", "-o", str(out / "base.json")),
        ("report", "-o", str(out / "rep"), "--state", default_db, str(tree)),
    ):
        r = vmleak(*args, env=env)
        assert r.returncode in (0, 1), r.stderr
        logs += [r.stdout, r.stderr]
    files = written_files(state_home, out)
    names = {os.path.basename(f) for f in files}
    assert {"state.db", "base.json", "report.json", "report.html"} <= names
    secrets = [PAN, SSN, SSN.replace("-", ""), AWS]
    for f in files:
        data = open(f, "rb").read()
        for s in secrets:
            for enc in ("ascii", "utf-16-le"):
                assert s.encode(enc) not in data, (f, s)
    for text in logs:
        assert not any(s in text for s in secrets)
    # Positive control: with --unmask the report does hold the value (so the grep can fail),
    # the state database still does not.
    r = vmleak(
        "report", "--unmask", "-o", str(tmp_path / "unmasked"), "--state", default_db, str(tree),
        env=env,
    )  # fmt: skip
    assert "--unmask" in r.stderr
    assert PAN in (tmp_path / "unmasked" / "report.json").read_text()
    assert PAN in (tmp_path / "unmasked" / "report.html").read_text()
    for f in written_files(state_home):
        assert PAN.encode() not in open(f, "rb").read()


def test_relative_inputs_are_remembered_absolute(tree, tmp_path, vmleak):
    db = str(tmp_path / "state.db")
    e = dict(os.environ, VMLEAK_FINGERPRINT_KEY=KEY_HEX)
    cmd = [sys.executable, "-m", "scanner", "scan", "--state", db, "--format", "jsonl"]
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    first = subprocess.run(
        [*cmd, "ds"], cwd=tmp_path, capture_output=True, text=True, env=e | {"PYTHONPATH": root}
    )
    assert all(os.path.isabs(x["image"]) for x in jsonl(first))
    r = vmleak("scan", "--state", db, "--fail-on", "new", str(tree))  # another cwd, same images
    assert r.returncode == 0 and "0 scanned, 3 unchanged" in summary_line(r)


@pytest.mark.skipif(os.geteuid() == 0, reason="running as root: file permissions do not stop reads")
def test_unreadable_file_in_tree_is_listed_not_fatal(tree, vmleak):
    locked = tree / "locked.raw"
    raw_with(locked, {100: PAN})
    locked.chmod(0)
    r = vmleak("scan", "-q", str(tree))
    assert r.returncode == 1 and f"cannot read {locked}" in r.stderr


def test_empty_or_missing_datastore_resolves_nothing(tree, tmp_path, vmleak):
    db = str(tmp_path / "state.db")
    vmleak("scan", "--state", db, "-q", str(tree))
    hidden = tmp_path / "hidden"
    tree.rename(hidden)
    tree.mkdir()  # an unmounted mount point: empty
    r = vmleak("scan", "--state", db, "--since-last", str(tree))
    assert r.returncode == 2 and "no memory images" in r.stderr and r.stdout == ""
    tree.rmdir()
    r = vmleak("scan", "--state", db, "--since-last", str(tree))
    assert r.returncode == 2 and r.stdout == ""
    hidden.rename(tree)
    r = vmleak("scan", "--state", db, "--since-last", str(tree))
    assert r.returncode == 0 and "0 scanned, 3 unchanged" in summary_line(r) and r.stdout == ""


def test_companion_files_are_one_image_and_tracked(tmp_path, vmleak):
    from tests import vmware_writer as w

    ds = tmp_path / "ds"
    ds.mkdir()
    vm = w.make_vm(
        ds, "vm-1", memory_size=1 << 20, plants={0x5000: f" {PAN} ".encode()}, regions=None
    )
    db = str(tmp_path / "state.db")
    r = vmleak("scan", "--state", db, "--format", "jsonl", str(ds))
    (f,) = jsonl(r)
    assert f["image"] == vm["checkpoint"] and f["file"] == vm["vmem"]  # scanned once, via .vmss
    assert "1 scanned" in summary_line(r)
    assert "0 scanned, 1 unchanged" in summary_line(vmleak("scan", "--state", db, str(ds)))
    with open(vm["vmem"], "r+b") as fh:  # only the companion changes
        fh.seek(0x9000)
        fh.write(f" {PAN2} ".encode())
    r = vmleak("scan", "--state", db, "--since-last", "--format", "jsonl", str(ds))
    assert r.returncode == 1 and "1 scanned" in summary_line(r)
    assert [(x["change"], x["gpa"]) for x in jsonl(r)] == [("new", 0x9001)]


def test_unchanged_second_run_reads_no_image(tree, tmp_path, monkeypatch):
    """Recorded images whose stat is unchanged are not even opened for format detection; a
    touched one is."""
    from click.testing import CliRunner

    import scanner.runner as runner
    from scanner.cli import main

    db = str(tmp_path / "state.db")
    env = {"VMLEAK_FINGERPRINT_KEY": "00" * 32}
    args = ["scan", "-q", "--no-progress", "-j", "1", "--state", db, str(tree)]
    CliRunner().invoke(main, args, env=env)
    opened = []
    real = runner.detect
    monkeypatch.setattr(runner, "detect", lambda p: opened.append(p) or real(p))
    CliRunner().invoke(main, args, env=env)
    images = [p for p in opened if p.endswith((".raw", ".lime"))]
    assert images == []
    victim = sorted(p for p in (tree.rglob("*.raw")) if not p.is_symlink())[0]
    st = victim.stat()  # a new mtime (one second on, whatever the clock's granularity): it
    os.utime(victim, ns=(st.st_atime_ns, st.st_mtime_ns + 10**9))  # must be looked at again
    CliRunner().invoke(main, args, env=env)
    assert str(victim) in {os.path.abspath(p) for p in opened}


def test_since_last_counts_unchanged_findings_without_reading_them_back(tree, tmp_path, vmleak):
    """--since-last prints only changes: the findings of unchanged images are counted in the
    database for the summary and exit status, and the counts match a run that reads them."""
    db = str(tmp_path / "state.db")
    scan = ("scan", "--state", db, "--format", "jsonl")
    assert vmleak(*scan, str(tree)).returncode == 1
    raw_with(tree / "clean.raw", {7000: f"visa {PAN2}"})  # one image changes
    r = vmleak(*scan, "--since-last", str(tree))
    assert r.returncode == 1 and "1 scanned, 2 unchanged" in summary_line(r)
    counts = summary_line(r).split(" in ")[0]
    assert counts == "vmleak: 1 aws-key, 2 pan, 1 ssn"
    r = vmleak(*scan, "--since-last", "--fail-on", "any", str(tree))
    assert r.returncode == 1 and jsonl(r) == [] and summary_line(r).startswith(counts)
    assert vmleak(*scan, "--since-last", str(tree)).returncode == 0  # nothing new
    full = vmleak(*scan, "--fail-on", "none", str(tree))  # every stored finding read back
    assert summary_line(full).split(" in ")[0] == counts and len(jsonl(full)) == 4
    runs = sqlite3.connect(db).execute("SELECT stats FROM runs ORDER BY id").fetchall()
    assert [json.loads(s)["findings"] for (s,) in runs] == [3, 4, 4, 4, 4]
