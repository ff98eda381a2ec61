#!/usr/bin/env python3
"""Make the QEMU / libvirt fixtures in samples/qemu/ with the real qemu-system-x86_64 (and
libvirt where its daemons run): migration streams, libvirt save files in every compression
libvirt 9 writes, and a qcow2 disk with two internal snapshots.

Known text (Luhn-valid card numbers) is planted at known guest-physical addresses with
``-device loader,file=BLOB,addr=GPA,force-raw=on`` (no guest OS needed; the guest never runs:
``-S``), including one number that straddles a page boundary and, in the 5 GiB guests, numbers
above the 4 GiB boundary. ``manifest.json`` records, for every fixture, the machine, RAM size
and each planted (GPA, text): the tests read their expectations from it.

Usage: ``python samples/gen_qemu.py [--out samples/qemu] [--no-libvirt]``. Rerunnable: every
file is rewritten. libvirt fixtures need root (it starts libvirtd/virtlogd itself, with
``security_driver = "none"`` and ``cgroup_controllers = [ ]`` in /etc/libvirt/qemu.conf).
Large streams (5 GiB guests) are committed xz-compressed; tests unpack them to a temp dir.
"""

from __future__ import annotations

import argparse
import json
import lzma
import os
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from pathlib import Path

MIB = 1 << 20
GIB = 1 << 30
QEMU = "qemu-system-x86_64"
QEMU_ARM = "qemu-system-aarch64"
ARM_RAM_BASE = 0x40000000  # hw/arm/virt.c VIRT_MEM
DOMAIN_UUID = "6b8d0a0e-4f0b-4a4e-9a53-5d1f6c1c2a01"
DOMAIN_NAME = "vmleak-fixture"
QEMU_CONF = Path("/etc/libvirt/qemu.conf")
CONF_MARK = "# vmleak samples/gen_qemu.py"


def luhn_complete(prefix: str) -> str:
    """``prefix`` plus its Luhn check digit."""
    total = 0
    for i, ch in enumerate(reversed(prefix)):
        d = int(ch)
        if i % 2 == 0:
            d *= 2
            d -= 9 if d > 9 else 0
        total += d
    return prefix + str((10 - total % 10) % 10)


def plants(ram: int, tag: str) -> list[tuple[int, bytes]]:
    """(GPA, bytes) to plant in a guest of ``ram`` bytes. Each text holds one card number;
    the second straddles the page boundary at 2 MiB."""
    out = [
        (0x100123, f"{tag} card={luhn_complete('453201511283036')};".encode()),
        (0x200000 - 9, f"x{luhn_complete('554433221100998')}y".encode()),
        # near the top of the RAM below 4 GiB for both pc (3 GiB) and q35 (2 GiB) splits
        (min(ram, 2 * GIB) - 0x2FC0, f"{tag} pan {luhn_complete('601100099990001')}".encode()),
    ]
    if ram > 4 * GIB:  # above-4G RAM: pc 5 GiB -> [4, 6) GiB, q35 5 GiB -> [4, 7) GiB
        out.append((4 * GIB + 0x5010, f"{tag} high={luhn_complete('37828224631000')}".encode()))
        out.append((5 * GIB - 0x2000 - 7, f"X{luhn_complete('402400712345678')}Y".encode()))
    return out


class Qmp:
    """Minimal QMP client over a unix socket."""

    def __init__(self, path: str) -> None:
        for _ in range(100):
            try:
                self.sock = socket.socket(socket.AF_UNIX)
                self.sock.connect(path)
                break
            except OSError:
                time.sleep(0.1)
        else:
            raise RuntimeError(f"no QMP socket at {path}")
        self.f = self.sock.makefile("rw")
        self._reply()
        self.cmd("qmp_capabilities")

    def _reply(self) -> dict:
        while True:
            msg = json.loads(self.f.readline())
            if "event" not in msg:
                return msg

    def cmd(self, name: str, **args: object) -> object:
        self.f.write(json.dumps({"execute": name, "arguments": args}) + "\n")
        self.f.flush()
        msg = self._reply()
        if "error" in msg:
            raise RuntimeError(f"{name}: {msg['error']}")
        return msg["return"]

    def hmp(self, line: str) -> str:
        return str(self.cmd("human-monitor-command", **{"command-line": line}))

    def migrate_to(self, path: Path) -> None:
        self.cmd("migrate", uri=f"exec:cat > {path}")
        for _ in range(6000):
            status = self.cmd("query-migrate").get("status")  # type: ignore[union-attr]
            if status == "completed":
                return
            if status == "failed":
                raise RuntimeError(f"migration to {path} failed")
            time.sleep(0.05)
        raise RuntimeError("migration did not finish")


def loader_args(work: Path, planted: list[tuple[int, bytes]]) -> list[str]:
    args = []
    for i, (gpa, text) in enumerate(planted):
        blob = work / f"plant{i}.bin"
        blob.write_bytes(text)
        args += ["-device", f"loader,file={blob},addr={gpa:#x},force-raw=on"]
    return args


def run_qemu(
    work: Path, machine: str, ram: int, extra: list[str], binary: str = QEMU
) -> tuple[subprocess.Popen, Qmp]:
    sock = work / "qmp.sock"
    if sock.exists():
        sock.unlink()
    cmd = [
        binary, "-machine", f"{machine},accel=tcg", "-m", f"{ram // MIB}M", "-nodefaults",
        "-display", "none", "-S", "-qmp", f"unix:{sock},server=on,wait=off", *extra,
    ]
    proc = subprocess.Popen(cmd, stdin=subprocess.DEVNULL)
    return proc, Qmp(str(sock))


def stop(proc: subprocess.Popen, qmp: Qmp) -> None:
    try:
        qmp.cmd("quit")
    except (OSError, RuntimeError, ValueError):
        proc.send_signal(signal.SIGTERM)
    proc.wait(timeout=30)


def today() -> str:
    """The UTC day the fixture is made: the guest's RTC (``guest_clock``) starts at it."""
    return time.strftime("%Y-%m-%d", time.gmtime())


def entry(
    kind: str, machine: str, ram: int, planted: list[tuple[int, bytes]], **kw: object
) -> dict:
    return {
        "kind": kind, "machine": machine, "ram_size": ram,
        "plants": [{"gpa": g, "text": t.decode()} for g, t in planted], "made": today(), **kw,
    }


def xz_file(path: Path, out_dir: Path | None = None) -> Path:
    """Compress ``path`` to ``<out_dir or its dir>/<name>.xz`` and remove it."""
    out = (out_dir or path.parent) / (path.name + ".xz")
    with open(path, "rb") as src, lzma.open(out, "wb", preset=6) as dst:
        shutil.copyfileobj(src, dst, 1 << 20)
    path.unlink()
    return out


def migration_fixtures(out: Path, work: Path, manifest: dict) -> None:
    """Raw streams: pc and q35 small guests, zlib-compressed pages, 5 GiB guests, NUMA."""
    specs = [
        # name, machine, RAM, compress capability, extra args, keep raw (else commit .xz)
        ("pc-64m.qevm", "pc", 64 * MIB, False, [], True),
        ("q35-64m-compress.qevm", "q35", 64 * MIB, True, [], False),
        ("pc-5g.qevm", "pc", 5 * GIB, False, [], False),
        ("q35-5g.qevm", "q35", 5 * GIB, False, [], False),
        (
            "q35-numa.qevm", "q35", 64 * MIB, False,
            [
                "-object", "memory-backend-ram,id=ram-node0,size=32M",
                "-numa", "node,nodeid=0,memdev=ram-node0",
                "-object", "memory-backend-ram,id=ram-node1,size=32M",
                "-numa", "node,nodeid=1,memdev=ram-node1",
            ],
            False,
        ),
    ]
    for name, machine, ram, compress, extra, keep_raw in specs:
        planted = plants(ram, name.split(".")[0])
        if name.startswith("q35-numa"):
            text = f"numa node one card={luhn_complete('491748203715902')};".encode()
            planted.append((32 * MIB + 0x7000, text))  # in node 1
        proc, qmp = run_qemu(work, machine, ram, loader_args(work, planted) + extra)
        try:
            if compress:
                qmp.cmd("migrate-set-capabilities",
                        capabilities=[{"capability": "compress", "state": True}])
            path = out / name
            qmp.migrate_to(path)
        finally:
            stop(proc, qmp)
        if not keep_raw:
            path = xz_file(path)
        manifest[path.name] = entry("qemu-migration", machine, ram, planted,
                                    compress_pages=compress, unpack="xz" if not keep_raw else None)
        print(f"wrote {path} ({path.stat().st_size} bytes)")


def arm_fixture(out: Path, work: Path, manifest: dict) -> None:
    """An aarch64 ``virt`` guest: RAM block ``mach-virt.ram`` at GPA 1 GiB, and a
    CONFIGURATION section with the target-page-bits subsection (x86 streams have none)."""
    if shutil.which(QEMU_ARM) is None:
        print(f"{QEMU_ARM} not installed (Debian: qemu-system-arm): ARM fixture skipped")
        return
    ram = 64 * MIB
    planted = [(ARM_RAM_BASE + gpa, text) for gpa, text in plants(ram, "arm-virt")]
    proc, qmp = run_qemu(work, "virt", ram, ["-cpu", "max", *loader_args(work, planted)],
                         binary=QEMU_ARM)
    path = work / "arm-virt-64m.qevm"
    try:
        qmp.migrate_to(path)
    finally:
        stop(proc, qmp)
    packed = xz_file(path, out)
    manifest[packed.name] = entry("qemu-migration", "virt", ram, planted, unpack="xz")
    print(f"wrote {packed} ({packed.stat().st_size} bytes)")


def qcow2_fixture(out: Path, work: Path, manifest: dict) -> None:
    """A qcow2 disk with two internal snapshots (savevm), each with different planted text."""
    disk = work / "savevm.qcow2"
    subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", str(disk), "16M"], check=True)
    ram = 32 * MIB
    snaps = {}
    for snap in ("first", "second"):
        planted = plants(ram, snap)
        drive = ["-drive", f"file={disk},if=none,id=d0,format=qcow2"]
        proc, qmp = run_qemu(work, "pc", ram, loader_args(work, planted) + drive)
        try:
            reply = qmp.hmp(f"savevm {snap}")
            if reply.strip():
                raise RuntimeError(f"savevm: {reply}")
        finally:
            stop(proc, qmp)
        snaps[snap] = [{"gpa": g, "text": t.decode()} for g, t in planted]
    packed = xz_file(disk, out)
    manifest[packed.name] = {
        "kind": "qcow2-snapshot", "machine": "pc", "ram_size": ram, "snapshots": snaps,
        "unpack": "xz", "made": today(),
    }
    print(f"wrote {packed} ({packed.stat().st_size} bytes)")


# ---- libvirt ----------------------------------------------------------------------------------

DOMAIN_XML = """<domain type='qemu' xmlns:qemu='http://libvirt.org/schemas/domain/qemu/1.0'>
  <name>{name}</name>
  <uuid>{uuid}</uuid>
  <memory unit='KiB'>{kib}</memory>
  <vcpu>1</vcpu>
  <os><type arch='x86_64' machine='{machine}'>hvm</type></os>
  <devices><emulator>/usr/bin/qemu-system-x86_64</emulator></devices>
  <qemu:commandline>
{args}
  </qemu:commandline>
</domain>
"""


class Libvirt:
    """libvirtd + virtlogd started by hand (they are not running as services here)."""

    def __init__(self) -> None:
        self.procs: list[subprocess.Popen] = []
        self._configure(None)

    def _configure(self, fmt: str | None) -> None:
        lines = [ln for ln in QEMU_CONF.read_text().splitlines() if CONF_MARK not in ln]
        lines += [
            f'security_driver = "none"  {CONF_MARK}',
            f"cgroup_controllers = [ ]  {CONF_MARK}",
        ]
        if fmt:
            lines.append(f'save_image_format = "{fmt}"  {CONF_MARK}')
        QEMU_CONF.write_text("\n".join(lines) + "\n")

    def start(self, fmt: str) -> None:
        self.stop()
        self._configure(fmt)
        self.procs = [
            subprocess.Popen(["virtlogd"], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL),
            subprocess.Popen(["libvirtd"], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL),
        ]
        for _ in range(100):
            if self.virsh("version", check=False).returncode == 0:
                return
            time.sleep(0.2)
        raise RuntimeError("libvirtd did not come up")

    def virsh(self, *args: str, check: bool = True) -> subprocess.CompletedProcess:
        done = subprocess.run(["virsh", "-c", "qemu:///system", *args], capture_output=True,
                              text=True, timeout=120)
        if check and done.returncode:
            raise RuntimeError(f"virsh {' '.join(args)}: {done.stderr.strip()}")
        return done

    def stop(self) -> None:
        for proc in reversed(self.procs):
            proc.terminate()
            proc.wait(timeout=30)
        self.procs = []

    def restore_conf(self) -> None:
        lines = [ln for ln in QEMU_CONF.read_text().splitlines() if CONF_MARK not in ln]
        QEMU_CONF.write_text("\n".join(lines) + "\n")


def libvirt_fixtures(out: Path, work: Path, manifest: dict) -> None:
    """``virsh save`` of a paused q35 guest with every save_image_format libvirt 9 accepts."""
    ram = 32 * MIB
    lv = Libvirt()
    try:
        for fmt in ("raw", "gzip", "bzip2", "xz", "lzop"):
            planted = plants(ram, f"lv-{fmt}")
            args = "\n".join(
                f"    <qemu:arg value='{a}'/>" for a in loader_args(work, planted)
            )
            xml = work / "domain.xml"
            xml.write_text(DOMAIN_XML.format(name=DOMAIN_NAME, uuid=DOMAIN_UUID, kib=ram // 1024,
                                             machine="q35", args=args))
            lv.start(fmt)
            lv.virsh("destroy", DOMAIN_NAME, check=False)
            lv.virsh("create", str(xml), "--paused")
            if fmt == "raw":  # virsh dump without --memory-only: a bare migration stream
                dump = work / "libvirt-dump.qevm"
                lv.virsh("dump", DOMAIN_NAME, str(dump))
                packed = xz_file(dump, out)
                manifest[packed.name] = entry("qemu-migration", "q35", ram, planted,
                                              unpack="xz", made_by="virsh dump")
                print(f"wrote {packed} ({packed.stat().st_size} bytes)")
                # QEMU refuses a second migration of a guest paused by the first one
                lv.virsh("destroy", DOMAIN_NAME)
                lv.virsh("create", str(xml), "--paused")
            path = out / f"libvirt-{fmt}.save"
            if path.exists():
                path.unlink()
            lv.virsh("save", DOMAIN_NAME, str(path))
            path.chmod(0o644)
            manifest[path.name] = entry("libvirt-save", "q35", ram, planted, compression=fmt,
                                        guest_name=DOMAIN_NAME, guest_uuid=DOMAIN_UUID)
            print(f"wrote {path} ({path.stat().st_size} bytes)")
    finally:
        lv.virsh("destroy", DOMAIN_NAME, check=False)
        lv.stop()
        lv.restore_conf()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", default=str(Path(__file__).resolve().parent / "qemu"))
    ap.add_argument("--no-libvirt", action="store_true", help="skip the libvirt save files")
    opts = ap.parse_args()
    out = Path(opts.out)
    out.mkdir(parents=True, exist_ok=True)
    manifest_path = out / "manifest.json"
    manifest = json.loads(manifest_path.read_text()) if manifest_path.exists() else {}
    with tempfile.TemporaryDirectory(prefix="vmleak-gen-") as tmp:
        work = Path(tmp)
        os.chmod(work, 0o755)  # libvirt's qemu reads the plant blobs from here
        migration_fixtures(out, work, manifest)
        arm_fixture(out, work, manifest)
        qcow2_fixture(out, work, manifest)
        if not opts.no_libvirt:
            libvirt_fixtures(out, work, manifest)
    manifest_path.write_text(json.dumps(manifest, indent=1, sort_keys=True) + "\n")
    print(f"wrote {manifest_path}")


if __name__ == "__main__":
    main()
