"""The state database of nightly scans (SQLite): which images were seen and how they looked,
which runs happened, and each image's findings by keyed fingerprint, so an unchanged image
is not rescanned and a run can say what is NEW and what was RESOLVED since the last one.

**Change detection.** Every file an image uses (companions included) is recorded with its
size, mtime, ctime, inode and a *sample fingerprint*: BLAKE2b over the size and
``SAMPLE_BLOCKS`` blocks of ``SAMPLE_BYTES`` bytes (the first, the last, the rest evenly
spaced between). A file is unchanged when

- size, mtime, ctime and inode are all as recorded (no byte read: ctime cannot be set back by
  ordinary tools, so ``touch -d`` or ``cp -p`` onto the file still shows), or
- size and mtime are as recorded but ctime or inode moved (the file was copied, restored or
  moved back with its times preserved, or chmod-ed) AND the sample fingerprint still matches.

The sample catches any change of size and any change touching a sampled block (headers at the
start, trailers at the end, a spread of blocks between). It does NOT catch a change confined to
unsampled bytes of a file whose size and mtime were deliberately preserved and which was then
copied or restored (for a 4 GiB image the sample covers 1 MiB); ``--full`` rescans regardless.
A changed size or mtime always means a rescan, whatever the sample says.

**What is new.** Findings are compared per image by (detector, keyed fingerprint): the same
secret moving to another address in a new snapshot is not new; a secret no longer found is
resolved — except when the image could not be read wholly this time (it may be in the unread
part) or its detector was not run. An image gone from a scanned tree is removed, its findings
resolved. Findings of images scanned with a different fingerprint key cannot be compared, so the
database remembers a check value of its key and refuses another.

**Safety.** Each image is committed in its own transaction as soon as it is scanned, so a run
killed mid-way keeps everything stored before; the next run marks it interrupted. One run at a
time writes: a lock file beside the database is held for the whole run, and a second run waits
up to ``lock_wait`` seconds, then fails naming the holder. Readers (``diff``, ``baseline``) do
not wait (WAL mode). The database and its lock are created 0600; full secret values are never
stored (``details.value`` from ``--unmask`` is dropped before writing).
"""

from __future__ import annotations

import fcntl
import hashlib
import hmac
import json
import os
import socket
import sqlite3
import time
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from parsers.base import ImageError
from parsers.registry import detect
from scanner import __version__
from scanner.engine import ScanResult
from scanner.findings import Finding, state_dir
from scanner.runner import inside

SAMPLE_BLOCKS = 16  # blocks hashed by the sample fingerprint
SAMPLE_BYTES = 64 * 1024  # bytes per sampled block
SCHEMA_VERSION = "1"

SCHEMA = """
CREATE TABLE IF NOT EXISTS meta (k TEXT PRIMARY KEY, v TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS runs (
    id INTEGER PRIMARY KEY,
    started TEXT NOT NULL,        -- UTC, ISO 8601
    ended TEXT,
    status TEXT NOT NULL,         -- running | complete | interrupted
    argv TEXT NOT NULL,           -- JSON list
    host TEXT NOT NULL,
    version TEXT NOT NULL,
    stats TEXT                    -- JSON counts, set at the end
);
CREATE TABLE IF NOT EXISTS images (
    id INTEGER PRIMARY KEY,
    path TEXT UNIQUE NOT NULL,    -- the primary file, as the user's walk named it
    format TEXT,
    files TEXT NOT NULL,          -- JSON list of file states (see file_state)
    config TEXT NOT NULL,         -- scan configuration it was scanned with (JSON)
    status TEXT NOT NULL,         -- present | removed
    first_run INTEGER NOT NULL,
    last_seen_run INTEGER NOT NULL,
    last_scan_run INTEGER NOT NULL,
    bytes_scanned INTEGER NOT NULL,
    errors TEXT NOT NULL,         -- JSON list of the last scan's errors
    warnings TEXT NOT NULL,
    meta TEXT NOT NULL
);
CREATE TABLE IF NOT EXISTS findings (
    id INTEGER PRIMARY KEY,
    image_id INTEGER NOT NULL REFERENCES images(id),
    detector TEXT NOT NULL,
    fingerprint TEXT NOT NULL,    -- hmac-sha256:..., never the value
    masked TEXT NOT NULL,
    format TEXT NOT NULL,
    gpa INTEGER,
    space INTEGER NOT NULL,
    addr INTEGER NOT NULL,
    file TEXT NOT NULL,
    offset INTEGER,
    length INTEGER NOT NULL,
    encoding TEXT NOT NULL,
    details TEXT NOT NULL,        -- JSON, without any full value
    first_run INTEGER NOT NULL,
    last_run INTEGER NOT NULL,
    resolved_run INTEGER          -- NULL while current
);
CREATE INDEX IF NOT EXISTS findings_current ON findings (image_id, resolved_run);
CREATE TABLE IF NOT EXISTS changes (
    run_id INTEGER NOT NULL,
    image_id INTEGER NOT NULL,
    kind TEXT NOT NULL,           -- new | resolved
    detector TEXT NOT NULL,
    fingerprint TEXT NOT NULL,
    masked TEXT NOT NULL,
    gpa INTEGER,
    PRIMARY KEY (run_id, image_id, kind, detector, fingerprint)
);
"""


class StateError(ValueError):
    """The state database cannot be used (busy, another key, not a vmleak database)."""


def default_path() -> Path:
    """The state database used when ``--state`` is not given."""
    return state_dir() / "state.db"


def key_check(key: bytes) -> str:
    """A check value of the fingerprint key (reveals nothing of it): lets a database, a
    baseline or a report say which key made its fingerprints."""
    return hmac.new(key, b"vmleak key check value", hashlib.sha256).hexdigest()[:16]


def sample_fingerprint(path: str, size: int) -> str:
    """BLAKE2b of the size and up to ``SAMPLE_BLOCKS`` blocks of ``SAMPLE_BYTES`` (see module
    docstring for what it catches and misses). Reads at most 1 MiB."""
    h = hashlib.blake2b(size.to_bytes(8, "little"), digest_size=16)
    last = max(0, size - SAMPLE_BYTES)
    n = SAMPLE_BLOCKS
    offsets = sorted({last * k // (n - 1) // 4096 * 4096 for k in range(n)} | {last})
    fd = os.open(path, os.O_RDONLY)
    try:
        for off in offsets:
            h.update(off.to_bytes(8, "little"))
            h.update(os.pread(fd, SAMPLE_BYTES, off))
    finally:
        os.close(fd)
    return "b2s:" + h.hexdigest()


def file_state(path: str) -> dict[str, Any]:
    """What is recorded of one file: path, size (bytes), mtime/ctime (ns), inode, sample."""
    st = os.stat(path)
    return {
        "path": path,
        "size": st.st_size,
        "mtime_ns": st.st_mtime_ns,
        "ctime_ns": st.st_ctime_ns,
        "ino": st.st_ino,
        "sample": sample_fingerprint(path, st.st_size),
    }


def unchanged(files: list[dict[str, Any]]) -> bool:
    """True when every recorded file still looks the same (module docstring's rules)."""
    if not files:
        return False
    for rec in files:
        try:
            st = os.stat(rec["path"])
        except OSError:
            return False
        if st.st_size != rec["size"] or st.st_mtime_ns != rec["mtime_ns"]:
            return False
        if st.st_ctime_ns == rec["ctime_ns"] and st.st_ino == rec["ino"]:
            continue
        try:
            if sample_fingerprint(rec["path"], st.st_size) != rec["sample"]:
                return False
        except OSError:
            return False
    return True


def _still_image(path: str) -> bool:
    try:
        detect(path)
    except ImageError as err:
        # Gone, or no longer an image; but unreadable (no offset: an OS error) is not gone.
        return os.path.lexists(path) and err.offset is None
    return True


def _now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="seconds")


@dataclass
class Change:
    """One new or resolved finding of one image, at (detector, fingerprint) level."""

    run_id: int
    image: str
    kind: str  # "new" | "resolved"
    detector: str
    fingerprint: str
    masked: str
    gpa: int | None

    def to_dict(self) -> dict[str, Any]:
        return {
            "change": self.kind,
            "run": self.run_id,
            "image": self.image,
            "detector": self.detector,
            "gpa": self.gpa,
            "masked": self.masked,
            "fingerprint": self.fingerprint,
        }


@dataclass
class RunInfo:
    """A run row."""

    id: int
    started: str
    ended: str | None
    status: str
    argv: list[str]
    host: str
    version: str
    stats: dict[str, Any] = field(default_factory=dict)


#: the current (unresolved) findings of present images, joined to their image
_CURRENT = (
    "FROM findings f JOIN images i ON i.id = f.image_id "
    "WHERE f.resolved_run IS NULL AND i.status='present'"
)


class StateDB:
    """The state database. ``writer=True`` takes the run lock (waiting up to ``lock_wait``
    seconds) and checks/records the fingerprint key's check value."""

    def __init__(
        self,
        path: str | os.PathLike,
        key: bytes,
        writer: bool = False,
        lock_wait: float = 60.0,
    ) -> None:
        self.path = Path(path)
        self.writer = writer
        self._lock_fd: int | None = None
        if not writer and not self.path.exists():
            raise StateError(f"{self.path}: no state database (run `vmleak scan --state` first)")
        if writer:
            self.path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
            self._lock(lock_wait)
            # Create the file 0600 before SQLite does (it would use the umask).
            os.close(os.open(self.path, os.O_RDWR | os.O_CREAT, 0o600))
        try:
            self.db = sqlite3.connect(self.path, timeout=lock_wait, isolation_level=None)
            self.db.execute("PRAGMA journal_mode=WAL")
            # WAL + NORMAL: a commit survives the process being killed (the requirement); on
            # power loss the last commits may be lost, and those images are simply rescanned.
            self.db.execute("PRAGMA synchronous=NORMAL")
            if writer:
                self.db.executescript(SCHEMA)
            got = dict(self.db.execute("SELECT k, v FROM meta").fetchall())
        except sqlite3.DatabaseError as exc:
            self.close()
            raise StateError(f"{self.path}: not a usable vmleak state database ({exc})") from None
        check = key_check(key)
        if got.get("key_check", check) != check:
            self.close()
            raise StateError(
                f"{self.path}: made with another fingerprint key (check value "
                f"{got['key_check']}, this key {check}); fingerprints cannot be compared — use "
                "the same key (--fingerprint-key-file / $VMLEAK_FINGERPRINT_KEY) or another --state"
            )
        if writer and not got:
            with self.db:
                self.db.execute("BEGIN IMMEDIATE")
                self.db.executemany(
                    "INSERT INTO meta VALUES (?, ?)",
                    [("key_check", check), ("schema", SCHEMA_VERSION), ("created", _now())],
                )

    def _lock(self, wait: float) -> None:
        lock_path = str(self.path) + ".lock"
        fd = os.open(lock_path, os.O_RDWR | os.O_CREAT, 0o600)
        deadline = time.monotonic() + wait
        while True:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except BlockingIOError:
                if time.monotonic() >= deadline:
                    holder = os.pread(fd, 200, 0).decode("utf-8", "replace").strip()
                    os.close(fd)
                    raise StateError(
                        f"{self.path}: another vmleak run holds the state database "
                        f"({holder or 'unknown holder'}); gave up after {wait:g} s "
                        "(--lock-wait to wait longer)"
                    ) from None
                time.sleep(min(0.2, max(0.0, deadline - time.monotonic())))
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"pid {os.getpid()} on {socket.gethostname()} since {_now()}\n".encode(), 0)
        self._lock_fd = fd

    def close(self) -> None:
        db = getattr(self, "db", None)
        if db is not None:
            db.close()
            self.db = None
        if self._lock_fd is not None:
            os.close(self._lock_fd)  # releases the flock
            self._lock_fd = None

    def __enter__(self) -> StateDB:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # ------------------------------------------------------------------ runs

    def begin_run(self, argv: list[str]) -> int:
        """Start a run (earlier runs still marked running were killed: mark them)."""
        with self.db:
            self.db.execute("BEGIN IMMEDIATE")
            self.db.execute("UPDATE runs SET status='interrupted' WHERE status='running'")
            cur = self.db.execute(
                "INSERT INTO runs (started, status, argv, host, version) VALUES (?,?,?,?,?)",
                (_now(), "running", json.dumps(argv), socket.gethostname(), __version__),
            )
        return int(cur.lastrowid)

    def finish_run(self, run_id: int, stats: dict[str, Any], complete: bool = True) -> None:
        """End a run with its counts: ``complete``, or ``interrupted`` when it was cut short
        (images left unscanned; what was stored stays)."""
        with self.db:
            self.db.execute("BEGIN IMMEDIATE")
            self.db.execute(
                "UPDATE runs SET ended=?, status=?, stats=? WHERE id=?",
                (_now(), "complete" if complete else "interrupted", json.dumps(stats), run_id),
            )

    def runs(self) -> list[RunInfo]:
        rows = self.db.execute(
            "SELECT id, started, ended, status, argv, host, version, stats FROM runs ORDER BY id"
        ).fetchall()
        return [
            RunInfo(r[0], r[1], r[2], r[3], json.loads(r[4]), r[5], r[6], json.loads(r[7] or "{}"))
            for r in rows
        ]

    # ------------------------------------------------------------------ images

    def image_row(self, path: str) -> tuple[int, list[dict[str, Any]], str, str] | None:
        """(id, recorded file states, config, status) of an image, or None."""
        row = self.db.execute(
            "SELECT id, files, config, status FROM images WHERE path=?", (path,)
        ).fetchone()
        return None if row is None else (row[0], json.loads(row[1]), row[2], row[3])

    def known_images(self) -> dict[str, tuple[int, int, int, int]]:
        """Primary file of every present image -> its recorded (size, mtime_ns, ctime_ns,
        inode): a directory walk can take such a file as an image without reading it."""
        out = {}
        for path, files in self.db.execute(
            "SELECT path, files FROM images WHERE status='present'"
        ):
            for rec in json.loads(files):
                if rec["path"] == path:
                    out[path] = (rec["size"], rec["mtime_ns"], rec["ctime_ns"], rec["ino"])
        return out

    def is_current(self, path: str, config: str) -> bool:
        """True when ``path`` was scanned before with ``config``, completely (no errors),
        and its files look unchanged."""
        row = self.db.execute(
            "SELECT files, config, errors FROM images WHERE path=? AND status='present'", (path,)
        ).fetchone()
        return (
            row is not None
            and row[1] == config
            and not json.loads(row[2])
            and unchanged(json.loads(row[0]))
        )

    def touch(self, run_id: int, paths: list[str]) -> None:
        """Record that unchanged images were seen by this run."""
        with self.db:
            self.db.execute("BEGIN IMMEDIATE")
            self.db.executemany(
                "UPDATE images SET last_seen_run=? WHERE path=?", [(run_id, p) for p in paths]
            )

    def store(
        self,
        run_id: int,
        result: ScanResult,
        files: list[str],
        config: str,
        detectors: set[str],
    ) -> list[Change]:
        """Record one scanned image in one transaction; returns its changes.

        ``detectors``: the detectors this scan ran (findings of others are left as they were).
        An image whose file was modified during the scan is recorded with an impossible mtime,
        so the next run rescans it."""
        states = []
        for f in files:
            try:
                states.append(file_state(f))
            except OSError:
                states.append({"path": f, "size": -1, "mtime_ns": -1, "ctime_ns": -1, "ino": -1})
        complete = not result.errors
        with self.db:
            self.db.execute("BEGIN IMMEDIATE")
            row = self.db.execute(
                "SELECT id, status FROM images WHERE path=?", (result.image,)
            ).fetchone()
            values = (
                result.format,
                json.dumps(states),
                config,
                run_id,
                run_id,
                result.bytes_scanned,
                json.dumps(result.errors),
                json.dumps(result.warnings),
                json.dumps(result.meta, default=str),
            )
            if row is None:
                cur = self.db.execute(
                    "INSERT INTO images (format, files, config, last_seen_run, last_scan_run, "
                    "bytes_scanned, errors, warnings, meta, path, status, first_run) "
                    "VALUES (?,?,?,?,?,?,?,?,?,?,'present',?)",
                    (*values, result.image, run_id),
                )
                image_id = int(cur.lastrowid)
            else:
                image_id = row[0]
                self.db.execute(
                    "UPDATE images SET format=?, files=?, config=?, last_seen_run=?, "
                    "last_scan_run=?, bytes_scanned=?, errors=?, warnings=?, meta=?, "
                    "status='present' WHERE id=?",
                    (*values, image_id),
                )
            return self._replace_findings(
                run_id, image_id, result.image, result.findings, detectors, complete
            )

    def _replace_findings(
        self,
        run_id: int,
        image_id: int,
        image: str,
        findings: list[Finding],
        detectors: set[str],
        complete: bool,
    ) -> list[Change]:
        old: dict[tuple, tuple[int, str, str, int | None]] = {}
        for fid, det, fp, space, addr, length, masked, gpa in self.db.execute(
            "SELECT id, detector, fingerprint, space, addr, length, masked, gpa FROM findings "
            "WHERE image_id=? AND resolved_run IS NULL",
            (image_id,),
        ):
            old[(det, fp, space, addr, length)] = (fid, det, fp, masked, gpa)
        before = {(v[1], v[2]): v for v in old.values()}
        after: dict[tuple[str, str], Finding] = {}
        for f in findings:
            after.setdefault((f.detector, f.fingerprint), f)
            details = {k: v for k, v in f.details.items() if k != "value"}
            cols = (f.masked, f.format, f.gpa, f.file, f.offset, f.encoding, json.dumps(details))
            hit = old.pop((f.detector, f.fingerprint, f.space, f.addr, f.length), None)
            if hit:
                self.db.execute(
                    "UPDATE findings SET masked=?, format=?, gpa=?, file=?, offset=?, encoding=?, "
                    "details=?, last_run=? WHERE id=?",
                    (*cols, run_id, hit[0]),
                )
            else:
                self.db.execute(
                    "INSERT INTO findings (masked, format, gpa, file, offset, encoding, details, "
                    "image_id, detector, fingerprint, space, addr, length, first_run, last_run) "
                    "VALUES (?,?,?,?,?,?,?,?,?,?,?,?,?,?,?)",
                    (
                        *cols,
                        image_id,
                        f.detector,
                        f.fingerprint,
                        f.space,
                        f.addr,
                        f.length,
                        run_id,
                        run_id,
                    ),
                )
        if complete:
            gone = [v[0] for v in old.values() if v[1] in detectors]
            self.db.executemany(
                "UPDATE findings SET resolved_run=? WHERE id=?", [(run_id, g) for g in gone]
            )
        changes = [
            Change(run_id, image, "new", d, fp, f.masked, f.gpa)
            for (d, fp), f in after.items()
            if (d, fp) not in before
        ]
        if complete:
            changes += [
                Change(run_id, image, "resolved", d, fp, v[3], v[4])
                for (d, fp), v in before.items()
                if d in detectors and (d, fp) not in after
            ]
        self._record_changes(image_id, changes)
        return changes

    def _record_changes(self, image_id: int, changes: list[Change]) -> None:
        self.db.executemany(
            "INSERT OR REPLACE INTO changes VALUES (?,?,?,?,?,?,?)",
            [
                (c.run_id, image_id, c.kind, c.detector, c.fingerprint, c.masked, c.gpa)
                for c in changes
            ],
        )

    def mark_removed(self, run_id: int, roots: list[str], seen: set[str]) -> list[Change]:
        """Images recorded under ``roots`` (directories or files scanned this run) that this
        run did not find because they are gone or no longer memory images: removed, their
        findings resolved. (One merely excluded by a glob, or below a directory that could
        not be read, is left as it was.)"""
        out: list[Change] = []
        rows = self.db.execute("SELECT id, path FROM images WHERE status='present'").fetchall()
        for image_id, path in rows:
            if path in seen or not inside(path, roots) or _still_image(path):
                continue
            with self.db:
                self.db.execute("BEGIN IMMEDIATE")
                self.db.execute(
                    "UPDATE images SET status='removed', last_seen_run=? WHERE id=?",
                    (run_id, image_id),
                )
                cur = self.db.execute(
                    "SELECT DISTINCT detector, fingerprint, masked, gpa FROM findings "
                    "WHERE image_id=? AND resolved_run IS NULL",
                    (image_id,),
                ).fetchall()
                changes: dict[tuple[str, str], Change] = {}
                for d, fp, masked, gpa in cur:
                    changes.setdefault(
                        (d, fp), Change(run_id, path, "resolved", d, fp, masked, gpa)
                    )
                self.db.execute(
                    "UPDATE findings SET resolved_run=? WHERE image_id=? AND resolved_run IS NULL",
                    (run_id, image_id),
                )
                self._record_changes(image_id, list(changes.values()))
            out += changes.values()
        return out

    # ------------------------------------------------------------------ queries

    def current_counts(self, paths: list[str]) -> dict[str, int]:
        """Current (unresolved) findings of the present images ``paths``, counted per
        detector, without reading them back."""
        rows = self.db.execute(
            "SELECT i.path, f.detector, COUNT(*) " + _CURRENT + " GROUP BY i.path, f.detector"
        ).fetchall()
        wanted = set(paths)
        counts: dict[str, int] = {}
        for path, detector, n in rows:
            if path in wanted:
                counts[detector] = counts.get(detector, 0) + n
        return counts

    def current_findings(self, paths: list[str] | None = None) -> list[Finding]:
        """Current (unresolved) findings of present images (of ``paths`` if given), in image
        then address order."""
        rows = self.db.execute(
            "SELECT i.path, f.format, f.detector, f.gpa, f.file, f.offset, f.length, f.encoding, "
            "f.masked, f.fingerprint, f.details, f.space, f.addr " + _CURRENT
            + " ORDER BY i.path, f.space, f.addr, f.detector"
        ).fetchall()
        if paths is not None:
            wanted = set(paths)
            rows = [r for r in rows if r[0] in wanted]
        # one JSON document for every row's details: a nightly run re-reads thousands
        details = json.loads("[" + ",".join(r[10] for r in rows) + "]")
        return [
            Finding(r[0], r[1], r[2], r[3], r[4], r[5], r[6], r[7], r[8], r[9], d, r[11], r[12])
            for r, d in zip(rows, details, strict=True)
        ]

    def image_record(self, path: str) -> dict[str, Any]:
        """What was recorded of an image at its last scan (format, meta, errors, warnings,
        bytes scanned), for results of images this run did not rescan."""
        row = self.db.execute(
            "SELECT format, meta, errors, warnings, bytes_scanned, files FROM images WHERE path=?",
            (path,),
        ).fetchone()
        return {
            "format": row[0] or "",
            "meta": json.loads(row[1]),
            "errors": json.loads(row[2]),
            "warnings": json.loads(row[3]),
            "bytes_scanned": row[4],
            "files": [f["path"] for f in json.loads(row[5])],
        }

    def changes(self, run_id: int) -> list[Change]:
        rows = self.db.execute(
            "SELECT c.run_id, i.path, c.kind, c.detector, c.fingerprint, c.masked, c.gpa "
            "FROM changes c JOIN images i ON i.id = c.image_id WHERE c.run_id=? "
            "ORDER BY i.path, c.kind, c.gpa, c.detector",
            (run_id,),
        ).fetchall()
        return [Change(*r) for r in rows]
