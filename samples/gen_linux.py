#!/usr/bin/env python3
"""Make the real-Linux-guest fixture in samples/linux/: Debian's kernel booted by libvirt under
QEMU (TCG) with an initramfs whose only program, ``leaky`` (static, C), holds a planted card
number and an RSA private key in its heap, then ``virsh save`` (raw) of the running domain.

``leaky`` prints its PID and the virtual addresses of the two secrets on the serial console
(never the secrets); ``manifest.json`` records them with the kernel package and release, the
planted card text and the day it was made. The tests restore this save in QEMU to make the
other formats (gzip save, qcow2 snapshot, kdump) from the same guest. The secrets are stored
XORed in the binary, so the only plain copies in guest memory are the heap ones.
``init_on_free=1`` on the kernel command line zeroes freed pages (the unpacked initramfs ...),
so the streams stay smaller.

Usage: ``python samples/gen_linux.py [--kernel-deb linux-image-6.1.0-57-cloud-amd64] [--out DIR]``
(it runs ``apt-get download`` of the package; needs root, qemu-system-x86,
libvirt-daemon-system, gcc with a static libc, and the ``cryptography`` package). The save is
committed xz-compressed (``unpack: xz``).
"""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import tempfile
import time
from datetime import datetime, timezone
from pathlib import Path

from gen_qemu import MIB, Libvirt, luhn_complete, xz_file

RAM = 128 * MIB
DOMAIN = "vmleak-linux"
KEY_XOR = 0x5A
CARD_TEXT = f"card number {luhn_complete('453201511283036')} exp 12/29 cvv 123"
READY = re.compile(rb"LEAKY pid=(\d+) name=(\S+) card_va=0x([0-9a-f]+) key_va=0x([0-9a-f]+)")

LEAKY_C = r"""
/* PID 1 of the fixture guest: forks "leaky", which decodes two secrets into its heap, says
   where they are (never what they are) and sleeps; PID 1 reaps children forever. */
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>
#include <sys/prctl.h>
#include <sys/wait.h>
#include "secrets.h"

static char *decode(const unsigned char *src, size_t n) {
    char *out = malloc(n + 1);
    for (size_t i = 0; i < n; i++) out[i] = (char)(src[i] ^ KEY_XOR);
    out[n] = 0;
    return out;
}

int main(void) {
    if (fork() == 0) {
        prctl(PR_SET_NAME, "leaky", 0, 0, 0);
        char *pad = malloc(3000);           /* the secrets do not start the heap */
        memset(pad, 0, 3000);
        char *card = decode(CARD, sizeof CARD);
        char *key = decode(PEM, sizeof PEM);
        printf("LEAKY pid=%d name=leaky card_va=%p key_va=%p\n", getpid(), card, key);
        fflush(stdout);
        for (;;) pause();
    }
    for (;;) wait(NULL);
}
"""


def c_bytes(name: str, data: bytes) -> str:
    body = ",".join(str(b ^ KEY_XOR) for b in data)
    return f"static const unsigned char {name}[] = {{{body}}};\n"


def rsa_pem() -> str:
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric import rsa

    key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    return key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.TraditionalOpenSSL,
        serialization.NoEncryption(),
    ).decode()


def cpio_newc(entries: list[tuple[str, int, bytes, tuple[int, int]]]) -> bytes:
    """A newc cpio archive of (name, mode, data, (rdev major, minor)) entries."""
    out = bytearray()
    for ino, (name, mode, data, (major, minor)) in enumerate(
        [*entries, ("TRAILER!!!", 0, b"", (0, 0))], start=1
    ):
        nm = name.encode() + b"\0"
        fields = [ino, mode, 0, 0, 1, 0, len(data), 0, 0, major, minor, len(nm), 0]
        out += b"070701" + b"".join(b"%08X" % f for f in fields) + nm
        out += b"\0" * (-len(out) % 4) + data
        out += b"\0" * (-len(out) % 4)
    return bytes(out)


def build_initramfs(work: Path, pem: str) -> Path:
    (work / "secrets.h").write_text(
        f"#define KEY_XOR {KEY_XOR}\n" + c_bytes("CARD", CARD_TEXT.encode())
        + c_bytes("PEM", pem.encode())
    )
    (work / "leaky.c").write_text(LEAKY_C)
    subprocess.run(["gcc", "-O1", "-static", "-o", str(work / "init"), str(work / "leaky.c")],
                   check=True)
    cpio = cpio_newc([
        ("dev", 0o40755, b"", (0, 0)),
        ("dev/console", 0o20600, b"", (5, 1)),
        ("init", 0o100755, (work / "init").read_bytes(), (0, 0)),
    ])
    path = work / "initramfs.cpio"
    path.write_bytes(cpio)
    return path


def kernel(work: Path, package: str) -> tuple[Path, str]:
    """Download and unpack the kernel package; (vmlinuz path, release)."""
    subprocess.run(["apt-get", "download", package], cwd=work, check=True,
                   stdout=subprocess.DEVNULL)
    deb = next(work.glob(f"{package}_*.deb"))
    subprocess.run(["dpkg-deb", "-x", str(deb), str(work / "root")], check=True)
    vmlinuz = next((work / "root" / "boot").glob("vmlinuz-*"))
    return vmlinuz, vmlinuz.name.removeprefix("vmlinuz-")


CMDLINE = "console=ttyS0 init_on_free=1 quiet panic=-1"


def wait_ready(console: Path, timeout: float = 600) -> dict:
    """Wait for leaky's line on the serial console; its pid and addresses."""
    end = time.time() + timeout
    while time.time() < end:
        m = READY.search(console.read_bytes()) if console.exists() else None
        if m:
            time.sleep(2)  # let the guest settle into pause()
            return {"pid": int(m[1]), "name": m[2].decode(), "card_va": int(m[3], 16),
                    "key_va": int(m[4], 16)}
        time.sleep(1)
    raise RuntimeError(f"guest did not report ready: {console.read_bytes()[-2000:]!r}")


DOMAIN_XML = """<domain type='qemu'>
  <name>{name}</name>
  <memory unit='KiB'>{kib}</memory>
  <vcpu>1</vcpu>
  <os><type arch='x86_64' machine='pc'>hvm</type><kernel>{kernel}</kernel>
    <initrd>{initrd}</initrd><cmdline>{cmdline}</cmdline></os>
  <devices><emulator>/usr/bin/qemu-system-x86_64</emulator>
    <serial type='file'><source path='{console}'/><target port='0'/></serial></devices>
</domain>
"""


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", default=str(Path(__file__).resolve().parent / "linux"))
    ap.add_argument("--kernel-deb", default="linux-image-6.1.0-57-cloud-amd64")
    opts = ap.parse_args()
    out = Path(opts.out)
    out.mkdir(parents=True, exist_ok=True)
    pem = rsa_pem()
    manifest: dict = {"card_text": CARD_TEXT, "key_pem_first_line": pem.splitlines()[0],
                      "made": datetime.now(timezone.utc).date().isoformat(), "fixtures": {}}
    with tempfile.TemporaryDirectory(prefix="vmleak-linux-") as tmp:
        work = Path(tmp)
        os.chmod(work, 0o755)  # libvirt's qemu reads the kernel and initramfs from here
        vmlinuz, release = kernel(work, opts.kernel_deb)
        manifest["kernel_package"], manifest["kernel_release"] = opts.kernel_deb, release
        initrd = build_initramfs(work, pem)
        console = work / "console.log"
        xml = work / "domain.xml"
        xml.write_text(DOMAIN_XML.format(name=DOMAIN, kib=RAM // 1024, kernel=vmlinuz,
                                         initrd=initrd, cmdline=CMDLINE, console=console))
        lv = Libvirt()
        try:
            lv.start("raw")
            lv.virsh("destroy", DOMAIN, check=False)
            lv.virsh("create", str(xml))
            ready = wait_ready(console)
            path = work / "libvirt-raw.save"
            lv.virsh("save", DOMAIN, str(path))
        finally:
            lv.virsh("destroy", DOMAIN, check=False)
            lv.stop()
            lv.restore_conf()
        packed = xz_file(path, out)
        manifest["fixtures"] = {packed.name: {"kind": "libvirt-save", "compression": "raw",
                                              "unpack": "xz", "domain": DOMAIN, **ready}}
        print(f"wrote {packed} ({packed.stat().st_size} bytes)")
    (out / "manifest.json").write_text(json.dumps(manifest, indent=1, sort_keys=True) + "\n")


if __name__ == "__main__":
    main()
