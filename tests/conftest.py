"""What the test modules share: hypothesis settings, readers of a MemoryImage, engine scans,
the command line, generated keys and the optional independent readers.

Test modules never import each other. Builders of image files live in the helper modules
(``tests.plant``, ``tests.qemu_writer``, ``tests.dumpwriter``, ``tests.vmware_writer``,
``tests.samples``), imported as ``from tests.X import ...``; everything that reads or scans is
a fixture here. The fixtures are session-scoped callables, so hypothesis tests can use them.
"""

from __future__ import annotations

import importlib
import os
import subprocess
import sys
import tracemalloc
from collections.abc import Callable
from functools import cache
from pathlib import Path
from types import ModuleType
from typing import Any

import numpy as np
import pytest
from hypothesis import HealthCheck, settings

from parsers import registry
from parsers.base import ImageError, MemoryImage
from tests.plant import memory_image

ROOT = Path(__file__).resolve().parent.parent
CLI_KEY = "00" * 32  # the fingerprint key every command-line test runs with
TEST_KEY = b"k" * 32  # the fingerprint key of in-process scans

# ---- hypothesis -------------------------------------------------------------------------------
# No deadline and no too-slow check: the suite runs on shared machines where one example can
# take seconds for reasons that have nothing to do with the code. Tests that use tmp_path
# overwrite their files in every example, so function-scoped fixtures are fine. By default the
# examples are derived from each test's name, so every run of the suite (a user's, CI's) is
# repeatable and a red run is a real regression; VMLEAK_HYPOTHESIS=explore draws random
# examples instead, as a search for new bugs should. Tests give only max_examples.
settings.register_profile(
    "vmleak",
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture],
    print_blob=True,
)
settings.register_profile("vmleak-explore", settings.get_profile("vmleak"))
settings.register_profile("vmleak-repeatable", settings.get_profile("vmleak"), derandomize=True)
settings.load_profile(
    "vmleak-explore" if os.environ.get("VMLEAK_HYPOTHESIS") == "explore" else "vmleak-repeatable"
)


# ---- optional independent readers ---------------------------------------------------------


def optional_module(name: str, what: str) -> ModuleType:
    """Import ``name`` or skip the test saying why: an absent package, or one whose shared
    library cannot load (ImportError or OSError at import)."""
    try:
        return importlib.import_module(name)
    except (ImportError, OSError) as exc:
        pytest.skip(f"{what} cannot be loaded ({name}: {exc})")


@pytest.fixture(scope="session")
def vol3() -> ModuleType:
    """volatility3's framework (the independent reader of ELF, LiME, QEMU and VMware files)."""
    return optional_module("volatility3.framework", "volatility3")


@pytest.fixture(scope="session")
def leechcore() -> ModuleType:
    """leechcorepyc, MemProcFS' file reader (needs Debian's libusb-1.0-0)."""
    return optional_module("leechcorepyc", "LeechCore")


# ---- reading an image --------------------------------------------------------------------------


def read_gpa(image: MemoryImage, gpa: int, n: int, space: int = 0) -> bytes:
    """Bytes [gpa, gpa+n) of address space ``space`` as the image's extents give them, every
    segment walked (the last copy of a byte wins, as in the guest); bytes no extent covers read
    as zeros (a QEMU zero page is not stored)."""
    out = bytearray(n)
    for seg in image.segments():
        e = seg.extents
        sel = (e.space == space) & (e.addr < gpa + n) & (e.addr + e.length > gpa)
        for i in np.flatnonzero(sel):
            lo = max(gpa, int(e.addr[i]))
            hi = min(gpa + n, int(e.addr[i] + e.length[i]))
            b = int(e.buf_offset[i]) + lo - int(e.addr[i])
            out[lo - gpa : hi - gpa] = seg.data[b : b + hi - lo].tobytes()
    return bytes(out)


def read_ranges(
    image: MemoryImage, ranges: list[tuple[int, int]], space: int = 0, errors: list | None = None
) -> list[bytes | None]:
    """Bytes of each (GPA, length) range of ``space``, read through the image's extent tables
    (copied out of reused windows); None for a range not wholly present. Checks that no guest
    byte is given twice with different values. With an ``errors`` list, an ImageError raised
    by a streaming image after its readable segments is appended there instead of raised."""
    got = [bytearray(n) for _, n in ranges]
    seen = [np.zeros(n, bool) for _, n in ranges]
    try:
        for seg in image.segments():
            e = seg.extents
            for k, (g, n) in enumerate(ranges):
                sel = (e.space == space) & (e.addr < g + n) & (e.addr + e.length > g)
                for i in np.flatnonzero(sel):
                    a, b = int(e.addr[i]), int(e.buf_offset[i])
                    lo, hi = max(g, a), min(g + n, a + int(e.length[i]))
                    piece = seg.data[b + lo - a : b + hi - a].tobytes()
                    prev = seen[k][lo - g : hi - g]
                    assert not prev.any() or bytes(got[k][lo - g : hi - g]) == piece
                    got[k][lo - g : hi - g] = piece
                    prev[:] = True
    except ImageError as err:
        if errors is None:
            raise
        errors.append(err)
    return [bytes(b) if s.all() else None for b, s in zip(got, seen, strict=True)]


def read_present(image: MemoryImage, gpa: int, n: int, space: int = 0) -> bytes | None:
    """``n`` bytes at ``gpa``, or None when any of them is not mapped."""
    return read_ranges(image, [(gpa, n)], space)[0]


def drain(path: str, fmt: str, peak: int | None = None) -> None:
    """Open ``path`` as ``fmt`` and walk every segment: each extent lies inside its buffer, the
    only way to fail is an ImageError naming the file, and (``peak``) Python allocations stay
    below that many bytes (hostile-input property)."""
    if peak is not None:
        tracemalloc.start()
    try:
        with registry.open_image(path, fmt) as image:
            for seg in image.segments():
                e = seg.extents
                assert np.all(e.buf_offset >= 0)
                assert np.all(e.buf_offset + e.length <= seg.data.size)
    except ImageError as err:
        assert str(err).startswith(path)
    finally:
        if peak is not None:
            used = tracemalloc.get_traced_memory()[1]
            tracemalloc.stop()
    assert peak is None or used < peak


@pytest.fixture(scope="session", name="read_gpa")
def _read_gpa() -> Callable[..., bytes]:
    return read_gpa


@pytest.fixture(scope="session", name="read_ranges")
def _read_ranges() -> Callable[..., list[bytes | None]]:
    return read_ranges


@pytest.fixture(scope="session", name="read_present")
def _read_present() -> Callable[..., bytes | None]:
    return read_present


@pytest.fixture(scope="session", name="drain")
def _drain() -> Callable[[str, str], None]:
    return drain


# ---- scanning ----------------------------------------------------------------------------------


def scan_result(image: MemoryImage | str, detectors: str = "pan", fmt: str | None = None,
                chunk_size: int | None = None) -> Any:
    """The engine's ScanResult for ``image``: an open image, or a path opened as ``fmt``
    (None: by content)."""
    from patterns.registry import select
    from scanner.engine import Engine, ScanConfig

    kw = {} if chunk_size is None else {"chunk_size": chunk_size}
    engine = Engine(ScanConfig(select(detectors), key=TEST_KEY, **kw))
    if isinstance(image, str):
        with registry.open_image(image, fmt) as opened:
            return engine.scan_image(opened)
    return engine.scan_image(image)


def scan(image: MemoryImage | str, detectors: str = "pan", chunk_size: int | None = None) -> list:
    """Findings of :func:`scan_result`, sorted by (GPA, detector); an error fails the test."""
    result = scan_result(image, detectors, chunk_size=chunk_size)
    assert not result.errors, result.errors
    return sorted(result.findings, key=lambda f: (f.gpa is None, f.gpa or 0, f.detector))


def engine_scan(buf: bytes, chunk: int, order: list[int] | None = None,
                detectors: str = "aes-key", junk: int = 0xA5) -> list:
    """Findings of the engine, ``chunk`` bytes at a time, on ``buf`` as guest memory from GPA 0:
    one extent, or (``order``) its pages stored in that order with 8 ``junk`` bytes between
    them (``tests.plant.memory_image``)."""
    from patterns.registry import select
    from scanner.engine import Engine, ScanConfig

    eng = Engine(ScanConfig(select(detectors), key=TEST_KEY, chunk_size=chunk))
    return eng.scan_image(memory_image(buf, order, junk)).findings


@pytest.fixture(scope="session", name="scan")
def _scan() -> Callable[..., list]:
    return scan


@pytest.fixture(scope="session", name="scan_result")
def _scan_result() -> Callable[..., Any]:
    return scan_result


@pytest.fixture(scope="session", name="engine_scan")
def _engine_scan() -> Callable[..., list]:
    return engine_scan


# ---- the command line ------------------------------------------------------------------------


def vmleak(*args: str, env: dict | None = None, cwd: str | Path | None = None,
           timeout: int = 120) -> subprocess.CompletedProcess:
    """``vmleak ARGS`` run as a new process (``python -m scanner``) with the test fingerprint
    key; text output captured."""
    e = dict(os.environ, VMLEAK_FINGERPRINT_KEY=CLI_KEY)
    e.update(env or {})
    return subprocess.run(
        [sys.executable, "-m", "scanner", *args],
        capture_output=True, text=True, env=e, cwd=cwd or ROOT, timeout=timeout,
    )  # fmt: skip


@pytest.fixture(scope="session", name="vmleak")
def _vmleak() -> Callable[..., subprocess.CompletedProcess]:
    return vmleak


# ---- keys ---------------------------------------------------------------------------------------


@cache
def key(kind: str) -> Any:
    """A private key made by ``cryptography`` once per session: ``rsa1024``, ``rsa2048``...,
    ``dsa``, ``ed25519`` or an EC curve (``prime256v1``, ``secp384r1``, ``secp521r1``,
    ``secp256k1``)."""
    from cryptography.hazmat.primitives.asymmetric import dsa, ec, ed25519, rsa

    if kind.startswith("rsa"):
        return rsa.generate_private_key(65537, int(kind[3:]))
    if kind == "dsa":
        return dsa.generate_private_key(1024)
    if kind == "ed25519":
        return ed25519.Ed25519PrivateKey.generate()
    curves = {"prime256v1": ec.SECP256R1, "secp384r1": ec.SECP384R1,
              "secp521r1": ec.SECP521R1, "secp256k1": ec.SECP256K1}
    return ec.generate_private_key(curves[kind]())


@pytest.fixture(scope="session", name="key")
def _key() -> Callable[[str], Any]:
    optional_module("cryptography", "cryptography (keys are generated with it)")
    return key
