"""volatility3 over vmleak's layer, on a real Linux guest (samples/linux: Debian's kernel under
QEMU, ``virsh save`` with a process holding a planted card number and RSA key in its heap):

- ``banners.Banners`` through ``vol -p <vmleak plugins>`` finds the kernel banner at the same
  guest-physical addresses in the ``virsh save`` and in ``vmleak extract``'s flat raw file, and
  in the gzip save, qcow2 snapshot and kdump QEMU makes of the same guest (restored from the
  committed save at test time; skipped without qemu-system-x86_64);
- ``vmleak.Scan`` reports masked findings as JSON/CSV, ``--unmask`` shows values;
- ``vmleak.Scan --attribute`` with the committed ISF of exactly that kernel attributes the
  planted card number and key to the PID and virtual addresses the program printed.
"""

from __future__ import annotations

import csv
import io
import json
import lzma
import shutil
import struct
import subprocess
import sys
import time
from pathlib import Path

import pytest

from parsers import registry
from scanner.vol3 import PLUGIN_DIR

pytest.importorskip("volatility3", reason="volatility3 not installed: pip install 'vmleak[vol3]'",
                    exc_type=ImportError)

ROOT = Path(__file__).resolve().parent.parent
LINUX = ROOT / "samples" / "linux"
MANIFEST = json.loads((LINUX / "manifest.json").read_text())
SAVE = next(iter(MANIFEST["fixtures"]))
GUEST = MANIFEST["fixtures"][SAVE]
CARD_OFFSET = MANIFEST["card_text"].index("4532")  # the PAN within the planted text
VOL = [sys.executable, "-c",
       "import sys; sys.argv[0] = 'vol'; from volatility3.cli import main; sys.exit(main())"]


@pytest.fixture(scope="module")
def work(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("vol3-linux")


@pytest.fixture(scope="module")
def save(work: Path) -> Path:
    out = work / SAVE.removesuffix(".xz")
    with lzma.open(LINUX / SAVE) as fin, open(out, "wb") as fout:
        shutil.copyfileobj(fin, fout, 1 << 20)
    return out


def vol(work: Path, image: Path, *args: str, plugins: bool = True, symbols: bool = False,
        renderer: str = "json") -> subprocess.CompletedProcess:
    cmd = [*VOL, "-q", "--offline", "-r", renderer,
           "-f", str(image)]
    if plugins:
        cmd += ["-p", str(PLUGIN_DIR)]
    if symbols:
        cmd += ["-s", str(LINUX / "symbols")]
    return subprocess.run([*cmd, *args], capture_output=True, text=True, timeout=600,
                          env={"XDG_CACHE_HOME": str(work / "xdg"), "PATH": "/usr/bin:/bin",
                               "VMLEAK_FINGERPRINT_KEY": "test-key"})


def rows(done: subprocess.CompletedProcess) -> list[dict]:
    assert done.returncode == 0, done.stderr[-3000:]
    return json.loads(done.stdout[done.stdout.index("[") :])


def banners(work: Path, image: Path, plugins: bool = True) -> set[tuple[int, str]]:
    found = {(r["Offset"], r["Banner"]) for r in rows(vol(work, image, "banners.Banners",
                                                          plugins=plugins))}
    assert any(MANIFEST["kernel_release"] in b for _, b in found), found
    return found


@pytest.fixture(scope="module")
def extracted_banners(work: Path, save: Path) -> set[tuple[int, str]]:
    flat = work / "guest.raw"
    done = subprocess.run([sys.executable, "-m", "scanner", "extract", str(save), "-o", str(flat)],
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    return banners(work, flat, plugins=False)  # flat memory: volatility3 reads it as it is


def test_banners_of_the_virsh_save_equal_extracts(work: Path, save: Path,
                                                   extracted_banners: set) -> None:
    assert banners(work, save) == extracted_banners


def test_without_vmleak_volatility3_finds_no_guest_layer(work: Path, save: Path,
                                                          extracted_banners: set) -> None:
    """volatility3 alone does not read a virsh save: banners at file offsets, not GPAs."""
    found = rows(vol(work, save, "banners.Banners", plugins=False))
    plain = {(r["Offset"], r["Banner"]) for r in found}
    assert plain != extracted_banners


# ---- the same guest in the formats QEMU makes of it ---------------------------------------

QEMU = "qemu-system-x86_64"
# the device set libvirt 9.0 gave the domain (its qemu log), so the stream restores
RESTORE_ARGS = [
    "-machine", "pc-i440fx-7.2,usb=off,memory-backend=pc.ram", "-accel", "tcg",
    "-cpu", "qemu64", "-m", "128", "-object", "memory-backend-ram,id=pc.ram,size=134217728",
    "-nodefaults", "-no-acpi", "-display", "none", "-rtc", "base=utc",
    "-device", "piix3-usb-uhci,id=usb,bus=pci.0,addr=0x1.0x2",
    "-chardev", "null,id=s0", "-device", "isa-serial,chardev=s0,id=serial0,index=0",
    "-device", "virtio-balloon-pci,id=balloon0,bus=pci.0,addr=0x2", "-S",
]
LIBVIRT_FORMAT_AT = 28  # byte offset of the header's format field (parsers/libvirt.py)
LIBVIRT_GZIP = 1


@pytest.fixture(scope="module")
def derived(work: Path, save: Path) -> dict[str, Path]:
    """The committed guest restored in QEMU, then: a kdump (dump-guest-memory kdump-zlib), a
    qcow2 internal snapshot (savevm) and a gzip libvirt save (the save's own header with the
    format field libvirt writes for gzip, then the stream QEMU migrates through gzip -c, as
    libvirt's save does)."""
    if shutil.which(QEMU) is None or shutil.which("qemu-img") is None:
        pytest.skip(f"{QEMU}/qemu-img not installed (Debian: qemu-system-x86 qemu-utils)")
    sys.path.insert(0, str(ROOT / "samples"))
    from gen_qemu import Qmp  # the fixtures' own QMP client

    with registry.open_image(str(save)) as image:
        start = image.meta["payload_offset"]
    out = {"kdump": work / "guest.kdump", "qcow2": work / "guest.qcow2",
           "gzip": work / "guest-gzip.save"}
    subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", str(out["qcow2"]), "16M"],
                   check=True)
    sock = work / "qmp.sock"
    proc = subprocess.Popen([QEMU, *RESTORE_ARGS, "-qmp", f"unix:{sock},server=on,wait=off",
                             "-drive", f"file={out['qcow2']},if=none,id=d0,format=qcow2",
                             "-incoming", f"exec:tail -c +{start + 1} {save}"],
                            stdin=subprocess.DEVNULL)
    try:
        qmp = Qmp(str(sock))
        wait_for(qmp, "query-status", "status", "inmigrate")
        qmp.cmd("dump-guest-memory", paging=False, protocol=f"file:{out['kdump']}",
                format="kdump-zlib")
        reply = qmp.hmp("savevm booted")
        assert not reply.strip(), reply
        header = bytearray(save.read_bytes()[:start])
        struct.pack_into("<I", header, LIBVIRT_FORMAT_AT, LIBVIRT_GZIP)
        out["gzip"].write_bytes(header)
        qmp.cmd("migrate", uri=f"exec:gzip -c >> {out['gzip']}")
        assert wait_for(qmp, "query-migrate", "status", "setup", "active") == "completed"
        qmp.cmd("quit")
    finally:
        if proc.poll() is None:
            proc.terminate()
        proc.wait(timeout=60)
    return out


def wait_for(qmp, command: str, key: str, *transient: str) -> str:
    """Poll a QMP query until ``key`` leaves the ``transient`` states; the final state."""
    for _ in range(1200):
        state = qmp.cmd(command).get(key)
        if state not in transient:
            return state
        time.sleep(0.1)
    raise AssertionError(f"{command}: still {state}")


@pytest.mark.parametrize("kind", ["gzip", "qcow2", "kdump"])
def test_banners_of_qemu_formats_equal_extracts(work: Path, derived: dict, kind: str,
                                                extracted_banners: set) -> None:
    with registry.open_image(str(derived[kind])) as image:
        assert image.format == {"gzip": "libvirt-save", "qcow2": "qcow2-snapshot",
                                "kdump": "kdump"}[kind]
    assert banners(work, derived[kind]) == extracted_banners


# ---- the vmleak.Scan plugin ---------------------------------------------------------------

def test_scan_plugin_json_masked(work: Path, save: Path) -> None:
    found = rows(vol(work, save, "vmleak.Scan", "--detectors", "cards,pem-key"))
    pans = [r for r in found if r["Detector"] == "pan"]
    assert [r["Masked"] for r in pans] == ["453201******0366"]
    assert all("value" not in json.loads(r["Details"]) for r in found)
    assert {r["Detector"] for r in found} == {"pan", "pem-key"}
    assert all(r["Fingerprint"].startswith("hmac-sha256:") for r in found)


def test_scan_plugin_csv_unmasked(work: Path, save: Path) -> None:
    done = vol(work, save, "vmleak.Scan", "--detectors", "pan", "--unmask", renderer="csv")
    assert done.returncode == 0, done.stderr[-2000:]
    table = list(csv.DictReader(io.StringIO(done.stdout[done.stdout.index("TreeDepth"):])))
    assert [json.loads(r["Details"])["value"] for r in table] == ["4532015112830366"]


def test_unknown_detector_is_refused(work: Path, save: Path) -> None:
    done = vol(work, save, "vmleak.Scan", "--detectors", "nope")
    assert done.returncode != 0
    assert "unknown detector or group 'nope'" in done.stdout + done.stderr


def test_attribution_to_the_program_that_holds_the_secrets(work: Path, save: Path) -> None:
    found = rows(vol(work, save, "vmleak.Scan", "--attribute", "--detectors", "cards,pem-key",
                     symbols=True))
    where = {(r["Detector"], r["PID"], r["Process"], r["Virtual address"]) for r in found}
    assert where == {
        ("pan", GUEST["pid"], "leaky", GUEST["card_va"] + CARD_OFFSET),
        ("pem-key", GUEST["pid"], "leaky", GUEST["key_va"]),
    }


def test_attribution_without_symbols_says_what_is_missing(work: Path, save: Path) -> None:
    done = vol(work, save, "vmleak.Scan", "--attribute", "--detectors", "pan")
    assert done.returncode != 0
    assert "--attribute needs the guest's Linux kernel symbols" in done.stdout + done.stderr


def test_linux_save_guest_clock_is_the_day_it_was_made(save: Path) -> None:
    with registry.open_image(str(save)) as image:
        assert image.meta["guest_clock"].startswith(MANIFEST["made"] + "T")
