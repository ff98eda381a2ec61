"""Finding records (the JSON Lines contract, ``docs/architecture.md`` §7) and the keyed fingerprint.

A finding is masked at creation: the full secret exists only as an HMAC-SHA256 fingerprint
under a key kept outside every report, unless the user asked to unmask (then it travels in
``details.value``, and the CLI says so on stderr).
"""

from __future__ import annotations

import hashlib
import hmac
import os
import secrets
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

KEY_ENV = "VMLEAK_FINGERPRINT_KEY"
KEY_BYTES = 32

# Field order of the JSON Lines contract (docs/architecture.md §7), exactly.
FIELDS = (
    "image",
    "format",
    "detector",
    "gpa",
    "file",
    "offset",
    "length",
    "encoding",
    "masked",
    "fingerprint",
    "details",
)


@dataclass
class Finding:
    """One secret found in one image.

    ``gpa``: guest physical address of the first byte (None when the bytes have no GPA, e.g.
    a QEMU VGA RAMBlock: then ``details.block``/``details.block_offset`` say where);
    ``offset``: byte offset of the first byte in ``file`` when stored there uncompressed;
    ``length``: bytes the match spans in guest memory.
    """

    image: str
    format: str
    detector: str
    gpa: int | None
    file: str
    offset: int | None
    length: int
    encoding: str
    masked: str
    fingerprint: str
    details: dict[str, Any] = field(default_factory=dict)
    space: int = 0  # address space index (not part of the contract)
    addr: int = 0  # address within that space (== gpa for space 0)

    def to_dict(self) -> dict[str, Any]:
        """The contract's fields, in order."""
        return {k: getattr(self, k) for k in FIELDS}

    @property
    def confidence(self) -> float:
        return float(self.details.get("confidence", 1.0))


def fingerprint(key: bytes, detector: str, value: bytes) -> str:
    """``hmac-sha256:`` + hex of HMAC(key, detector + ':' + normalized value).

    The detector name is part of the message so a PAN and an SSN that happen to share digits
    never share a fingerprint."""
    mac = hmac.new(key, detector.encode() + b":" + value, hashlib.sha256)
    return "hmac-sha256:" + mac.hexdigest()


def state_dir() -> Path:
    """The user's state directory for vmleak ($XDG_STATE_HOME/vmleak, ~/.local/state/vmleak)."""
    base = os.environ.get("XDG_STATE_HOME") or os.path.join(Path.home(), ".local", "state")
    return Path(base) / "vmleak"


def load_key(key_file: str | None = None) -> bytes:
    """The fingerprint key: from ``key_file`` if given, else $VMLEAK_FINGERPRINT_KEY, else the
    key file in the user's state directory (created 0600 with 32 random bytes on first use).
    Key files hold hex or raw bytes; the environment variable holds hex or text."""
    if key_file:
        return _read_key(Path(key_file))
    env = os.environ.get(KEY_ENV)
    if env:
        return _decode_key(env.encode())
    path = state_dir() / "fingerprint.key"
    if not path.exists():
        path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
        try:
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        except FileExistsError:
            return _read_key(path)  # another run created it first
        with os.fdopen(fd, "w") as fh:
            fh.write(secrets.token_hex(KEY_BYTES) + "\n")
    return _read_key(path)


def _read_key(path: Path) -> bytes:
    try:
        raw = path.read_bytes()
    except OSError as exc:
        raise ValueError(f"{path}: cannot read fingerprint key: {exc.strerror}") from None
    if not raw.strip():
        raise ValueError(f"{path}: fingerprint key file is empty")
    return _decode_key(raw)


def _decode_key(raw: bytes) -> bytes:
    text = raw.strip()
    try:
        key = bytes.fromhex(text.decode("ascii"))
        if len(key) >= 16:
            return key
    except (ValueError, UnicodeDecodeError):
        pass
    return text
