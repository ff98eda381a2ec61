"""Fleet scans on Dask with a LocalCluster of 2 workers: the same findings, exit status and
state database as a local ``--jobs 2`` run on a tree of mixed real fixtures; a worker killed
during a run still gives the full, unduplicated result; an unreachable scheduler is exit 2
with a one-line error."""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import sqlite3
import subprocess
import sys
import time

import pytest

from tests.plant import PAGE, PAN, lime, raw_with
from tests.samples import QEMU_DIR, dump_sample, qemu_sample
from tests.vmware_writer import make_vm

distributed = pytest.importorskip("distributed", reason="the dask extra is not installed",
                                  exc_type=ImportError)

PAN2 = "4929000000006"  # a 13-digit Visa test number
SPLIT = 80 << 20  # bytes: above runner.SPLIT_MIN, so the image is cut into RANGE/EDGES units


def state_dump(db: str) -> dict[str, list]:
    """What a run left in the state database, without run numbers, times or row ids."""
    con = sqlite3.connect(db)
    q = {
        "images": "SELECT path, format, files, config, status, bytes_scanned, errors, warnings, "
        "meta FROM images ORDER BY path",
        "findings": "SELECT i.path, f.detector, f.fingerprint, f.masked, f.format, f.gpa, f.space, "
        "f.addr, f.file, f.offset, f.length, f.encoding, f.details, f.resolved_run IS NULL "
        "FROM findings f JOIN images i ON i.id = f.image_id",
        "changes": "SELECT i.path, c.kind, c.detector, c.fingerprint, c.masked, c.gpa "
        "FROM changes c JOIN images i ON i.id = c.image_id",
        "runs": "SELECT status, stats FROM runs",
    }
    out = {k: sorted(map(list, con.execute(v).fetchall()), key=repr) for k, v in q.items()}
    for row in out["runs"]:
        row[1] = json.loads(row[1])
    con.close()
    return out


@pytest.fixture(scope="module")
def mixed_tree(tmp_path_factory):
    """Real fixtures of every kind of input (QEMU stream, libvirt save, qcow2 snapshot,
    kdump, ELF core, LiME, VMware .vmss + .vmem, a raw image large enough to be split), a
    damaged save (an input error) and a file that is no image."""
    tmp = tmp_path_factory.mktemp("fleet")
    ds = tmp / "ds"
    (ds / "qemu").mkdir(parents=True)
    (ds / "dumps").mkdir()
    shutil.copy(QEMU_DIR / "pc-64m.qevm", ds / "qemu")
    shutil.copy(QEMU_DIR / "libvirt-gzip.save", ds / "qemu")
    shutil.copy(qemu_sample("savevm.qcow2.xz", tmp), ds / "qemu")
    shutil.copy(dump_sample("pc-64M.kdump-zlib.gz", tmp), ds / "dumps")
    shutil.copy(dump_sample("pc-64M.elf.gz", tmp), ds / "dumps")
    mem = bytearray(8 * PAGE)
    mem[3 * PAGE - 8 : 3 * PAGE + 10] = f" {PAN} ".encode()
    (ds / "guest.lime").write_bytes(lime(bytes(mem), [4, 2, 0, 1, 3, 5, 6, 7]))
    make_vm(ds, "vm-1", memory_size=1 << 20, plants={0x5000: f" {PAN} ".encode()}, regions=None)
    big = ds / "big.raw"
    with open(big, "wb") as fh:  # sparse: cheap to write and to scan
        fh.truncate(SPLIT)
        for off in (0x1000, SPLIT // 2 - 7, SPLIT - 0x2000):
            fh.seek(off)
            fh.write(f" visa {PAN2} ".encode())
    cut = (QEMU_DIR / "libvirt-raw.save").read_bytes()
    (ds / "qemu" / "cut.save").write_bytes(cut[: len(cut) // 2])  # truncated: exit 2
    raw_with(ds / "clean.raw", {})
    (ds / "notes.txt").write_text("not an image")
    return tmp, ds


def findings_and_db(vmleak, ds, db, *how: str):
    r = vmleak("scan", "--format", "jsonl", "--no-progress", "--state", str(db), *how, str(ds))
    return r, sorted(r.stdout.splitlines())


def test_dask_local_2_equals_jobs_2(mixed_tree, vmleak):
    tmp, ds = mixed_tree
    ref, ref_rows = findings_and_db(vmleak, ds, tmp / "jobs.db", "--jobs", "2")
    got, rows = findings_and_db(vmleak, ds, tmp / "dask.db", "--dask", "local:2")
    assert ref.returncode == 2 and "cut.save" in ref.stderr, ref.stderr  # the damaged save
    assert got.returncode == ref.returncode, got.stderr
    assert rows == ref_rows and len(rows) >= 10
    images = {json.loads(x)["image"] for x in rows}
    for name in ("pc-64m.qevm", "libvirt-gzip.save", "savevm.qcow2", "pc-64M.kdump-zlib",
                 "pc-64M.elf", "guest.lime", "vm-1.vmss", "big.raw"):  # fmt: skip
        assert any(i.endswith(name) for i in images), name
    assert [json.loads(x)["gpa"] for x in rows if "big.raw" in x] == [
        0x1006, SPLIT // 2 - 1, SPLIT - 0x2000 + 6
    ]  # fmt: skip
    assert state_dump(str(tmp / "dask.db")) == state_dump(str(tmp / "jobs.db"))
    assert PAN not in got.stdout + got.stderr and PAN2 not in got.stdout  # masked on the wire


@pytest.fixture(scope="module")
def cluster():
    """A LocalCluster of 2 single-threaded worker processes the command line connects to."""
    with distributed.LocalCluster(
        n_workers=2, threads_per_worker=1, processes=True, host="127.0.0.1",
        dashboard_address=None, silence_logs=40,
    ) as c, distributed.Client(c) as client:  # fmt: skip
        yield c, client


def test_killed_worker_still_gives_full_unduplicated_result(cluster, tmp_path, vmleak):
    c, client = cluster
    ds = tmp_path / "ds"
    ds.mkdir()
    for k in range(4):
        raw_with(ds / f"a{k}.raw", {100 + k: f"card {PAN}", 5000: f"visa {PAN2}"})
    # A slow image (digits everywhere, scanned in tiny chunks): its task is running for
    # seconds, long enough to kill the worker running it.
    pattern = bytes(b"0123456789 "[(k * 7) % 11] for k in range(1 << 20))
    (ds / "zz-slow.raw").write_bytes(pattern * 12)
    args = ("scan", "--format", "jsonl", "--no-progress", "--chunk-size", "4096")
    ref = vmleak(*args, "--state", str(tmp_path / "ref.db"), "--jobs", "2", str(ds))
    assert ref.returncode == 1, ref.stderr

    env = dict(os.environ, VMLEAK_FINGERPRINT_KEY="00" * 32)
    cmd = [sys.executable, "-m", "scanner", *args, "--state", str(tmp_path / "dask.db"),
           "--dask", c.scheduler_address, str(ds)]  # fmt: skip
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
    pids = client.run(os.getpid)
    victim = None
    deadline = time.monotonic() + 120
    try:
        while victim is None and proc.poll() is None and time.monotonic() < deadline:
            busy = client.processing()  # scheduler's view: worker -> keys running there
            slow = [w for w, keys in busy.items() if any("zz-slow" in str(k) for k in keys)]
            victim = slow[0] if slow else None
            if victim is None:
                time.sleep(0.02)  # polling the scheduler's state, not waiting for it to change
        assert victim is not None, "the slow image never ran"
        os.kill(pids[victim], signal.SIGKILL)
        out, err = proc.communicate(timeout=180)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert proc.returncode == ref.returncode, err
    rows = out.splitlines()
    assert len(rows) == len(set(rows))  # nothing reported twice
    assert sorted(rows) == sorted(ref.stdout.splitlines())  # nothing lost
    assert state_dump(str(tmp_path / "dask.db")) == state_dump(str(tmp_path / "ref.db"))
    client.wait_for_workers(2, timeout=60)  # the nanny restarted it


def test_unreachable_scheduler_is_exit_2_one_line(tmp_path, vmleak):
    raw_with(tmp_path / "a.raw", {100: PAN})
    with socket.socket() as s:  # a port the OS chose, held (bound, never listening) for the
        s.bind(("127.0.0.1", 0))  # whole run: no other process can take it meanwhile
        port = s.getsockname()[1]
        r = vmleak("scan", "--dask", f"tcp://127.0.0.1:{port}", "--dask-timeout", "1",
                   str(tmp_path / "a.raw"))  # fmt: skip
    assert r.returncode == 2 and r.stdout == ""
    assert r.stderr.count("\n") == 1 and r.stderr.startswith("vmleak: cannot reach the Dask")
    assert f"127.0.0.1:{port}" in r.stderr and "Traceback" not in r.stderr


def test_jobs_and_dask_exclude_each_other(tmp_path, vmleak):
    raw_with(tmp_path / "a.raw", {})
    r = vmleak("scan", "--dask", "local:1", "-j", "2", str(tmp_path / "a.raw"))
    assert r.returncode == 2 and "exclude each other" in r.stderr


def test_scheduler_gone_commits_what_came_back_exit_2(tmp_path):
    """A scheduler and a worker as separate processes (as on storage nodes); the scheduler is
    killed once the first image is stored: the run ends with exit 2, one line saying so, the
    stored images kept and the run marked interrupted."""
    ds = tmp_path / "ds"
    ds.mkdir()
    raw_with(ds / "a-first.raw", {100: f"card {PAN}"})
    pattern = bytes(b"0123456789 "[(k * 7) % 11] for k in range(1 << 20))
    (ds / "z-slow.raw").write_bytes(pattern * 48)
    env = dict(os.environ, VMLEAK_FINGERPRINT_KEY="00" * 32)
    sfile = tmp_path / "scheduler.json"
    dask = [sys.executable, "-m"]
    quiet = {"stdout": subprocess.DEVNULL, "stderr": subprocess.DEVNULL, "env": env}
    sched = subprocess.Popen([*dask, "distributed.cli.dask_scheduler", "--host", "127.0.0.1",
                              "--port", "0", "--no-dashboard", "--scheduler-file", str(sfile)],
                             **quiet)  # fmt: skip
    procs = [sched]
    db = tmp_path / "state.db"
    try:
        worker = subprocess.Popen([*dask, "distributed.cli.dask_worker", "--scheduler-file",
                                   str(sfile), "--nthreads", "1", "--no-dashboard",
                                   "--host", "127.0.0.1"], **quiet)  # fmt: skip
        procs.append(worker)
        deadline = time.monotonic() + 60
        address = None
        while address is None and time.monotonic() < deadline:
            try:  # the file the scheduler writes once it listens, read when whole
                address = json.loads(sfile.read_text())["address"]
            except (OSError, ValueError):
                time.sleep(0.02)
        assert address, "the scheduler did not start"
        cmd = [*dask, "scanner", "scan", "--state", str(db), "--format", "jsonl", "--no-progress",
               "--chunk-size", "4096", "--dask", address, str(ds)]  # fmt: skip
        proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                                env=env)  # fmt: skip
        procs.append(proc)
        stored: list = []
        while not stored and proc.poll() is None and time.monotonic() < deadline + 60:
            time.sleep(0.02)  # polling the database for the first commit
            if db.exists():
                try:
                    stored = sqlite3.connect(db).execute("SELECT path FROM images").fetchall()
                except sqlite3.OperationalError:
                    stored = []  # schema not there yet
        assert proc.poll() is None, "the run ended before the scheduler could be killed"
        sched.kill()
        out, err = proc.communicate(timeout=120)
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
            p.wait()
    assert proc.returncode == 2, err
    lines = [x for x in err.splitlines() if "Dask scheduler" in x]
    assert len(lines) == 1, err
    line = lines[0]
    assert "lost the Dask scheduler" in line and "1 image(s) not scanned" in line
    assert "Traceback" not in err, err
    assert [os.path.basename(p) for (p,) in stored] == ["a-first.raw"]
    con = sqlite3.connect(db)
    assert [os.path.basename(p) for (p,) in con.execute("SELECT path FROM images")] == [
        "a-first.raw"
    ]
    assert con.execute("SELECT status FROM runs").fetchall() == [("interrupted",)]
    assert json.loads(out.splitlines()[0])["image"].endswith("a-first.raw")


def test_report_on_dask_equals_local(cluster, tmp_path, vmleak):
    c, _ = cluster
    ds = tmp_path / "ds"
    ds.mkdir()
    raw_with(ds / "a.raw", {100: f"card {PAN}"})
    mem = bytearray(8 * PAGE)
    mem[5 * PAGE : 5 * PAGE + 18] = f" {PAN} ".encode()
    (ds / "b.lime").write_bytes(lime(bytes(mem), [0, 1, 2, 3, 5, 6]))
    docs = []
    for how in (("-j", "2"), ("--dask", c.scheduler_address)):
        out = tmp_path / how[0].strip("-")
        r = vmleak("report", "-q", "-o", str(out), *how, str(ds))
        assert r.returncode == 1, r.stderr
        doc = json.loads((out / "report.json").read_text())
        for k in ("started", "ended", "command_line"):
            doc.pop(k)
        docs.append(doc)
    assert docs[0] == docs[1]
    (b,) = [i for i in docs[1]["images"] if i["image"].endswith("b.lime")]
    assert b["gpa_ranges"] == [[0, 4 * PAGE], [5 * PAGE, 7 * PAGE]]  # coverage from the worker
