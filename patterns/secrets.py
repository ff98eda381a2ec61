"""Cloud and API credentials in ASCII and UTF-16LE text, each with the strongest check its
issuer's format allows.

- ``aws-key``: ``AKIA``/``ASIA`` + 16 upper-case alphanumerics; a 40-character secret key
  within ``context`` bytes raises confidence.
- ``github-token``: ``gh[pousr]_`` + 30 base62 + 6 checksum characters, verified (CRC32 of the
  30 random characters, base62); fine-grained ``github_pat_`` + 22 + ``_`` + 59 by shape.
- ``slack-token``: ``xox[abposer]-`` digit groups then the secret part, by shape.
- ``stripe-key``: ``sk_live_`` / ``rk_live_`` + base62 (live keys only: test keys are not
  secrets), by shape.
- ``gcp-api-key``: ``AIza`` + 35 URL-safe base64 characters, by shape.
- ``jwt``: three base64url parts; the header decodes to a JSON object with ``alg``, the payload
  to a JSON object.

Stage 1 is the shared anchor pass of patterns/scratch.py (one table lookup per 2 bytes of the
chunk finds every detector's anchors at once); each anchor must then fit the fixed start of
its pattern (``gh[pousr]_``, ``[sr]k_live_`` ...), and token lengths, boundaries and UTF-16LE
high bytes are checked on the candidates as arrays: only tokens of a plausible length reach
the Python checks.
"""

from __future__ import annotations

import base64
import binascii
import json
import re
from abc import abstractmethod
from dataclasses import dataclass
from functools import cached_property
from typing import Any

import numpy as np

from patterns.base import Chunk, Described, Detector, Hit, Hits
from patterns.context import text_around
from patterns.scratch import (
    ALNUM,
    BASE64URL,
    anchor_hits,
    boundary_ok,
    charset,
    gather,
    register_anchor,
    run_lengths,
    texty_near_middle,
    utf16_clean,
)

BASE62 = ALNUM  # 0-9A-Za-z: the alphabet of GitHub's checksum
AWS_SECRET = re.compile(r"(?<![A-Za-z0-9/+=])[A-Za-z0-9/+]{40}(?![A-Za-z0-9/+=])")


#: one character of a pattern's fixed start: a plain character or a class of plain characters,
#: not repeated
HEAD_ITEM = re.compile(r"(?:\[([A-Za-z0-9_]+)\]|([A-Za-z0-9_-]))(?![{*+?])")


def pattern_head(pattern: str) -> tuple[bytes, ...]:
    """The characters allowed at each position of a pattern's fixed start (``gh[pousr]_`` ->
    ``g``, ``h``, ``pousr``, ``_``), up to the first repeat, group or escape."""
    out, pos = [], 0
    while (m := HEAD_ITEM.match(pattern, pos)) is not None:
        out.append((m.group(1) or m.group(2)).encode())
        pos = m.end()
    return tuple(out)


@dataclass(frozen=True)
class Spec:
    """One token shape: the 2-character ``anchor`` searched in stage 1, ``lead`` token
    characters before it, the token character set, the allowed token lengths (characters) and
    the pattern the token must match in full."""

    anchor: bytes
    lead: int
    chars: bytes
    min_len: int
    max_len: int
    pattern: re.Pattern[str]

    def __post_init__(self) -> None:
        register_anchor(self.anchor)

    @cached_property
    def table(self) -> np.ndarray:
        return charset(self.chars)

    @cached_property
    def head(self) -> np.ndarray:
        """(positions, 256) bool: the characters the pattern allows at each position of its
        fixed start; checked on every anchor before runs are measured (most anchors are in
        other words: ``gh`` in ``ghost``, ``_l`` in ``__libc``)."""
        items = pattern_head(self.pattern.pattern)
        return np.stack([charset(chars) for chars in items]) if items else np.ones((0, 256), bool)

    def head_ok(self, data: np.ndarray, pos: np.ndarray, step: int) -> np.ndarray:
        """Mask of token starts ``pos`` (chunk offsets) whose first characters fit the head."""
        width = self.head.shape[0]
        rows = gather(data, pos, width, step)
        return self.head[np.arange(width), rows].all(axis=1)


def github_checksum_ok(token: str) -> bool:
    """Whether a classic-format GitHub token's last 6 characters are the base62 CRC32 of the
    30 random characters after the 4-character prefix."""
    body, check = token[4:-6], token[-6:]
    value = 0
    for c in check:
        value = value * 62 + BASE62.index(c.encode())
    return value == binascii.crc32(body.encode())


def _b64url_json(part: str) -> Any:
    raw = base64.urlsafe_b64decode(part + "=" * (-len(part) % 4))
    return json.loads(raw)


class TokenDetector(Detector):
    """A detector for tokens of one issuer: subclasses set ``specs`` and ``check``."""

    group = "secrets"
    stage = "anchors"  # the shared anchor pass of patterns/scratch.py
    context = 2  # the character glued before/after a token (UTF-16LE: 2 bytes)
    specs: tuple[Spec, ...]

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        cls.max_len = 2 * max(spec.max_len for spec in cls.specs)  # characters, UTF-16LE

    def may_touch(self, rows: Chunk) -> np.ndarray:
        """Rows (engine edge windows) with texty words near the middle: a token crossing it,
        or whose context does, has them."""
        return texty_near_middle(rows, self.context + 64)

    @abstractmethod
    def check(self, token: str, hit: Hit | None) -> dict[str, Any] | None:
        """Details of a token that passes the issuer's check (``hit`` gives context when
        describing), else None."""

    def find(self, chunk: Chunk) -> Hits:
        d = chunk.data
        starts, lengths, encs = [], [], []
        for spec in self.specs:
            table = spec.table
            for enc, step, offsets in anchor_hits(chunk, spec.anchor):
                pos = offsets - spec.lead * step
                pos = pos[pos >= 0]
                pos = pos[spec.head_ok(d, pos, step)]
                run = run_lengths(d, pos, table, spec.max_len + 1, step)
                keep = (run >= spec.min_len) & (run <= spec.max_len)
                pos, run = pos[keep], run[keep]
                if pos.size == 0:
                    continue
                keep = boundary_ok(d, pos, run, step, table) & utf16_clean(d, pos, run, step)
                for p, n in zip(pos[keep].tolist(), run[keep].tolist(), strict=True):
                    token = d[p : p + step * n : step].tobytes().decode("ascii")
                    if spec.pattern.fullmatch(token) and self.check(token, None) is not None:
                        starts.append(p)
                        lengths.append(n * step)
                        encs.append(enc)
        if not starts:
            return Hits.empty()
        return Hits.of(starts, lengths, encs)

    def describe(self, hit: Hit) -> Described | None:
        token = hit.text()
        details = self.check(token, hit)
        if details is None:
            return None
        prefix = re.match(r"[a-z]+_(?:live_|pat_)?|xox[a-z]-|[A-Z][A-Za-z]{3}|eyJ", token)
        shown = prefix.group(0) if prefix else ""
        return Described(
            value=token.encode("ascii"),
            masked=f"{shown}... ({len(token)} chars)",
            details=details,
        )


class AwsKeyDetector(TokenDetector):
    """``aws-key``: AWS access key ids; a 40-character secret key nearby raises confidence."""

    name = "aws-key"
    context = 256
    specs = (Spec(b"IA", 2, ALNUM, 20, 20, re.compile(r"A[KS]IA[A-Z0-9]{16}")),)

    def check(self, token: str, hit: Hit | None) -> dict[str, Any] | None:
        details: dict[str, Any] = {"kind": "access-key-id", "temporary": token.startswith("ASIA")}
        # AWS documentation's sample ids (AKIAIOSFODNN7EXAMPLE ...) fill SDKs and test suites
        details["test"] = token.endswith("EXAMPLE")
        if hit is not None:
            near = [m.group(0) for side in text_around(hit) for m in AWS_SECRET.finditer(side)]
            near = [s for s in near if re.search(r"[a-z]", s) and re.search(r"[A-Z]", s)]
            details["secret_nearby"] = bool(near)
            details["confidence"] = 0.1 if details["test"] else 0.95 if near else 0.7
        return details


class GithubTokenDetector(TokenDetector):
    """``github-token``: classic tokens with their CRC32 checksum; fine-grained PATs by shape."""

    name = "github-token"
    specs = (
        Spec(b"gh", 0, ALNUM + b"_", 40, 40, re.compile(r"gh[pousr]_[A-Za-z0-9]{36}")),
        Spec(b"b_", 5, ALNUM + b"_", 93, 93,
             re.compile(r"github_pat_[A-Za-z0-9]{22}_[A-Za-z0-9]{59}")),
    )
    KINDS = {"ghp": "personal", "gho": "oauth", "ghu": "user-to-server",
             "ghs": "server-to-server", "ghr": "refresh", "github": "fine-grained-personal"}

    def check(self, token: str, hit: Hit | None) -> dict[str, Any] | None:
        kind = self.KINDS[token.split("_", 1)[0]]
        if token.startswith("github_pat_"):
            return {"kind": kind, "checksum": False, "confidence": 0.8}
        if not github_checksum_ok(token):
            return None
        return {"kind": kind, "checksum": True, "confidence": 1.0}


class SlackTokenDetector(TokenDetector):
    """``slack-token``: Slack bot/user/app/refresh tokens."""

    name = "slack-token"
    specs = (
        Spec(b"xo", 0, ALNUM + b"-", 32, 160,
             re.compile(r"xox[abposer]-(?:[0-9]{1,14}-){2,3}[A-Za-z0-9]{20,64}")),
    )
    KINDS = {"b": "bot", "p": "user", "a": "app", "o": "legacy", "s": "session",
             "e": "refresh", "r": "refresh"}

    def check(self, token: str, hit: Hit | None) -> dict[str, Any] | None:
        return {"kind": self.KINDS[token[3]], "confidence": 0.9}


class StripeKeyDetector(TokenDetector):
    """``stripe-key``: live secret and restricted keys."""

    name = "stripe-key"
    specs = (Spec(b"_l", 2, ALNUM + b"_", 32, 255,
                  re.compile(r"[sr]k_live_[A-Za-z0-9]{24,247}")),)

    def check(self, token: str, hit: Hit | None) -> dict[str, Any] | None:
        return {"kind": "secret" if token[0] == "s" else "restricted", "live": True,
                "confidence": 0.9}


class GcpApiKeyDetector(TokenDetector):
    """``gcp-api-key``: Google API keys."""

    name = "gcp-api-key"
    specs = (Spec(b"Iz", 1, BASE64URL, 39, 39, re.compile(r"AIza[A-Za-z0-9_-]{35}")),)

    def check(self, token: str, hit: Hit | None) -> dict[str, Any] | None:
        return {"kind": "api-key", "confidence": 0.8}


class JwtDetector(TokenDetector):
    """``jwt``: JSON Web Tokens (JWS compact form)."""

    name = "jwt"
    specs = (Spec(b"yJ", 1, BASE64URL + b".", 24, 4095,
                  re.compile(r"eyJ[A-Za-z0-9_-]+\.[A-Za-z0-9_-]+\.[A-Za-z0-9_-]*")),)

    def check(self, token: str, hit: Hit | None) -> dict[str, Any] | None:
        header, payload, signature = token.split(".")
        try:
            head = _b64url_json(header)
            body = _b64url_json(payload)
        except (ValueError, RecursionError):  # bad base64/UTF-8/JSON, or absurd nesting
            return None
        if not isinstance(head, dict) or not isinstance(head.get("alg"), str):
            return None
        if not isinstance(body, dict) or (not signature and head["alg"] != "none"):
            return None
        return {"alg": head["alg"], "signed": bool(signature), "confidence": 0.9}
