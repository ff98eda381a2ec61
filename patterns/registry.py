"""Every detector, and selection by name or group (``--detectors pan,pii``)."""

from __future__ import annotations

from patterns import aes, der, emv, pem, secrets
from patterns.base import Detector
from patterns.pan import PanDetector
from patterns.ssn import SsnDetector
from patterns.track import Track1Detector, Track2Detector

DETECTORS: list[Detector] = [
    PanDetector(),
    Track1Detector(),
    Track2Detector(),
    SsnDetector(),
    aes.AesKeyDetector(),
    der.RsaKeyDetector(),
    der.EcKeyDetector(),
    pem.PemKeyDetector(),
    pem.SshKeyDetector(),
    secrets.AwsKeyDetector(),
    secrets.GithubTokenDetector(),
    secrets.SlackTokenDetector(),
    secrets.StripeKeyDetector(),
    secrets.GcpApiKeyDetector(),
    secrets.JwtDetector(),
    # after the key and secret detectors: when they run, the EMV detectors take their binary
    # candidates from the anchor pass those already ran on the chunk
    emv.EmvPanDetector(),
    emv.EmvTrack2Detector(),
]


def groups() -> dict[str, list[str]]:
    """Group name -> detector names."""
    out: dict[str, list[str]] = {}
    for d in DETECTORS:
        out.setdefault(d.group, []).append(d.name)
    return out


def select(spec: str | None) -> list[Detector]:
    """Detectors named by a comma-separated list of detector and group names ('all' or None:
    every detector), in the order of DETECTORS (which detectors can reuse another's stage-1
    pass depends on it). Raises ValueError naming an unknown entry."""
    if not spec or spec.strip() == "all":
        return list(DETECTORS)
    by_name = {d.name: d for d in DETECTORS}
    grp = groups()
    chosen: list[str] = []
    for word in (w.strip() for w in spec.split(",")):
        if not word:
            continue
        if word in by_name:
            names = [word]
        elif word in grp:
            names = grp[word]
        else:
            known = ", ".join(sorted(by_name) + sorted(grp))
            raise ValueError(f"unknown detector or group {word!r} (known: {known})")
        chosen.extend(n for n in names if n not in chosen)
    return [d for d in DETECTORS if d.name in chosen]
