"""Worker processes that die: the pool fails only the task a dead worker ran and goes on; an
image file truncated on the datastore while a worker scans it (SIGBUS on its mapping) is a
one-line input error of that image, and the run goes on with the others."""

from __future__ import annotations

import faulthandler
import json
import os
import signal
import sqlite3
import subprocess
import sys
import time
from pathlib import Path

import pytest

from scanner.pool import Pool, RemoteTraceback, WorkerDied
from tests.plant import PAN, raw_with

SLOW = bytes(b"0123456789 "[(k * 7) % 11] for k in range(1 << 20))  # digits everywhere: slow


def _square(x: int) -> int:
    return x * x


def _die(sig: int) -> None:
    # pytest's faulthandler, inherited through fork, would print this worker's stack on SIGBUS
    faulthandler.disable()
    os.kill(os.getpid(), sig)


def _fail(msg: str) -> None:
    raise ValueError(msg)


def test_pool_fails_only_the_dead_workers_task():
    pool = Pool(2, _square, (0,))  # the initializer runs once per worker
    try:
        futs = [pool.submit(_square, k) for k in range(3)]
        futs += [pool.submit(_die, signal.SIGBUS), pool.submit(_fail, "boom")]
        futs += [pool.submit(_square, k) for k in range(3, 6)]
        while not all(f.done() for f in futs):
            pool.wait()
    finally:
        pool.shutdown()
    assert [f.result() for f in futs[:3] + futs[5:]] == [0, 1, 4, 9, 16, 25]
    died = futs[3].exception()
    assert isinstance(died, WorkerDied) and died.signal == "SIGBUS"
    assert str(died) == "killed by SIGBUS"
    err = futs[4].exception()
    assert isinstance(err, ValueError) and str(err) == "boom"
    assert isinstance(err.__cause__, RemoteTraceback) and "_fail" in str(err.__cause__)


def _children(pid: int) -> list[int]:
    """The processes whose parent is ``pid``."""
    out = []
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                stat = Path(f"/proc/{entry}/stat").read_text()
            except OSError:
                continue  # ended meanwhile
            if int(stat.rsplit(")", 1)[1].split()[1]) == pid:
                out.append(int(entry))
    return out


def _mapped_by_child(pid: int, path: Path) -> bool:
    """True when a child process of ``pid`` has ``path`` mapped (a worker scanning it)."""
    for child in _children(pid):
        try:
            if str(path) in Path(f"/proc/{child}/maps").read_text():
                return True
        except OSError:
            continue
    return False


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc")
@pytest.mark.parametrize("jobs", ["1", "2"])
def test_image_truncated_while_scanned_is_an_input_error(tmp_path, jobs):
    ds = tmp_path / "ds"
    ds.mkdir()
    raw_with(ds / "a-first.raw", {100: f"card {PAN}"})
    slow = ds / "m-slow.raw"
    slow.write_bytes(SLOW * 24)
    raw_with(ds / "z-after.raw", {200: f"card {PAN}"})  # -j 1: scanned after the death
    db = tmp_path / "state.db"
    env = dict(os.environ, VMLEAK_FINGERPRINT_KEY="00" * 32)
    cmd = [sys.executable, "-m", "scanner", "scan", "-j", jobs, "--chunk-size", "4096",
           "--format", "jsonl", "--state", str(db), str(ds)]  # fmt: skip
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env=env)  # fmt: skip
    try:
        deadline = time.monotonic() + 60
        while not _mapped_by_child(proc.pid, slow) and proc.poll() is None:
            assert time.monotonic() < deadline, "no worker mapped the slow image"
            time.sleep(0.01)  # polling the workers' mappings, not waiting for them to change
        assert proc.poll() is None, "the run ended before the image could be truncated"
        os.truncate(slow, 4096)
        out, err = proc.communicate(timeout=120)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert proc.returncode == 2, err
    assert "Traceback" not in err, err
    (line,) = [x for x in err.splitlines() if "m-slow.raw" in x]
    assert line == (
        f"vmleak: {slow}: open unit not completed: the worker process reading it died (killed "
        f"by SIGBUS: file truncated during the scan?); it is now 4,096 bytes, "
        f"{len(SLOW) * 24:,} when the scan began"
    )
    rows = [json.loads(x) for x in out.splitlines()]
    assert sorted((os.path.basename(r["image"]), r["gpa"]) for r in rows) == [
        ("a-first.raw", 106), ("z-after.raw", 206)
    ]  # fmt: skip
    con = sqlite3.connect(db)
    stored = con.execute("SELECT path FROM images ORDER BY path").fetchall()
    # the truncated image was never scanned: not recorded, so the next run scans it
    assert [os.path.basename(p) for (p,) in stored] == ["a-first.raw", "z-after.raw"]
    assert con.execute("SELECT count(*) FROM findings").fetchone() == (2,)
