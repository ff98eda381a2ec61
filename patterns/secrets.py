"""Cloud and API credentials in ASCII and UTF-16LE text, each with the strongest check its
issuer's format allows.

- ``aws-key``: access key ids (``AKIA`` long-term, ``ASIA`` temporary STS, ``ABIA`` STS
  service bearer token, ``ACCA`` context-specific credential) + 16 upper-case alphanumerics;
  a 40-character secret key within ``context`` bytes raises confidence. A 40-character secret
  access key right after an AWS keyword (``aws_secret_access_key = ...``,
  ``"SecretAccessKey": "..."``) is reported by itself (``details.kind`` secret-access-key).
- ``github-token``: ``gh[pousr]_`` + 30 base62 + 6 checksum characters, verified (CRC32 of the
  30 random characters, base62); fine-grained ``github_pat_`` + 22 + ``_`` + 59 by shape.
- ``slack-token``: every family Slack documents, in its shape (see ``SLACK``).
- ``stripe-key``: ``sk_live_`` / ``rk_live_`` + base62 (live keys only: test keys are not
  secrets), by shape.
- ``gcp-api-key``: ``AIza`` + 35 URL-safe base64 characters, by shape.
- ``jwt``: three base64url parts; the header decodes to a JSON object with ``alg``, the payload
  to a JSON object.

Placeholders and published samples are not reported (issue 11), as the peers do it:

- an entropy floor: the Shannon entropy (bits per character) of the token must reach
  ``entropy_floor`` — 3 for AWS key ids (gitleaks ``aws-access-token``, trufflehog
  ``RequiredIdEntropy``), GitHub tokens (gitleaks ``github-pat``/``github-fine-grained-pat``)
  and Stripe keys, 4 for Google API keys (gitleaks ``gcp-api-key``), 3 for Slack bot tokens and
  2 for the other Slack families (gitleaks' slack rules), 4.25 for an AWS secret access key
  (trufflehog ``RequiredSecretEntropy``; a 40-hex-digit value is a hash, not a key, as
  trufflehog's ``FalsePositiveSecretPat`` says);
- a placeholder test (:func:`placeholder`) on the token's random part: one character repeated
  (gitleaks' global allowlist; its false positives ``AKIA`` followed by sixteen capital
  X letters, and a ``xoxb-`` token of lower-case x letters),
  a word of trufflehog's ``DefaultFalsePositives`` (example, xxxxxx, aaaaaa, abcde,
  00000, sample, *****), or six characters in alphabet order (gitleaks' stop word
  ``abcdefghijklmnopqrstuvwxyz``: ``AIza`` + the alphabet, ``github_pat_xxxx...``);
- published samples (``SAMPLES``): the AWS documentation's example key pairs (gitleaks'
  ``.+EXAMPLE$`` allowlist catches the ids) and the Firebase SDK's example Google API keys on
  gitleaks' ``gcp-api-key`` allowlist.

Stage 1 is the shared anchor pass of patterns/scratch.py (one table lookup per 2 bytes of the
chunk finds every detector's anchors at once); each anchor must then fit the fixed start of
its pattern (``gh[pousr]_``, ``[sr]k_live_`` ...), and token lengths, boundaries and UTF-16LE
high bytes are checked on the candidates as arrays: only tokens of a plausible length reach
the Python checks. AWS keywords are found the same way (anchors ``ws``/``WS`` of ``aws``,
``sK`` of ``SecretAccessKey``, ``_k``/``_K`` of ``secret_access_key``, each checked against
the literal around it as arrays); the keyword regex runs only on the few that remain.
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
#: an AWS secret access key named just before its value: detect-secrets' AWSKeyDetector rule
#: ("aws", then key/pwd/pw/password/pass/token within 20 characters) and the field name of
#: AWS's credentials file, environment and API responses (aws_secret_access_key,
#: AWS_SECRET_ACCESS_KEY, "SecretAccessKey": ..., <SecretAccessKey>...)
AWS_KEYWORD_SECRET = re.compile(
    r"(?:aws[\w.-]{0,20}?(?:key|pwd|pw|password|pass|token)|secret_?access_?key)[\w.-]{0,20}?"
    r"[\"']?\s{0,3}(?::=|=>|[:=>])\s{0,3}[\"']?([A-Za-z0-9/+]{40})(?![A-Za-z0-9/+=])",
    re.IGNORECASE | re.ASCII,
)
#: (anchor, characters of the keyword literal before the anchor, the literal, lower case,
#: ending with the anchor): where the stage-1 anchors of AWS keywords must stand
AWS_KEYWORD_ANCHORS = (
    (b"ws", 1, b"aws"),
    (b"WS", 1, b"aws"),
    (b"sK", 4, b"ccessk"),
    (b"_k", 5, b"ccess_k"),
    (b"_K", 5, b"ccess_k"),
)
for _anchor, _, _ in AWS_KEYWORD_ANCHORS:
    register_anchor(_anchor)
_KW_WIDTH = max(len(lit) for _, _, lit in AWS_KEYWORD_ANCHORS)
#: per anchor, its literal right-aligned at the anchor's second character in _KW_WIDTH
#: columns, and which columns count
_KW_LIT = np.zeros((len(AWS_KEYWORD_ANCHORS), _KW_WIDTH), np.uint8)
_KW_USE = np.zeros((len(AWS_KEYWORD_ANCHORS), _KW_WIDTH), bool)
for _i, (_, _lead, _lit) in enumerate(AWS_KEYWORD_ANCHORS):
    _KW_LIT[_i, _KW_WIDTH - len(_lit) :] = np.frombuffer(_lit, np.uint8)
    _KW_USE[_i, _KW_WIDTH - len(_lit) :] = True
    assert len(_lit) == _lead + 2
#: characters of window read before a keyword anchor ("secret_access_key": 13 before "_k")
#: and after it (keyword, separator, 40-character value)
AWS_WINDOW_BEFORE, AWS_WINDOW_AFTER = 14, 112
AWS_KEYWORD_REACH = 64  # characters from a keyword's start to its value's, at most 61

# --- public values and placeholders ----------------------------------------------------------

#: trufflehog's DefaultFalsePositives (pkg/detectors/falsepositives.go): a token whose random
#: part holds one of these (any case) is a placeholder
PLACEHOLDER_WORDS = ("example", "xxxxxx", "aaaaaa", "abcde", "00000", "sample", "*****")
ALPHABET_RUN = 6  # characters in alphabet order that make a placeholder ("abcdef", "123456")
#: published sample credentials: the AWS documentation's example key pairs, and the Firebase
#: SDK's example API keys on gitleaks' gcp-api-key allowlist
SAMPLES = frozenset({
    "AKIAIOSFODNN7EXAMPLE", "wJalrXUtnFEMI/K7MDENG/bPxRfiCYEXAMPLEKEY",
    "AKIAI44QH8DHBEXAMPLE", "je7MtGbClwBF/2Zp9Utk/h3yCo8nvbEXAMPLEKEY",
    "AIzaSyabcdefghijklmnopqrstuvwxyz1234567", "AIzaSyAnLA7NfeLquW1tJFpx_eQCxoX-oo6YyIs",
    "AIzaSyCkEhVjf3pduRDt6d1yKOMitrUEke8agEM", "AIzaSyDMAScliyLx7F0NPDEJi1QmyCgHIAODrlU",
    "AIzaSyD3asb-2pEZVqMkmL6M9N6nHZRR_znhrh0", "AIzayDNSXIbFmlXbIE6mCzDLQAqITYefhixbX4A",
    "AIzaSyAdOS2zB6NCsk1pCdZ4-P6GBdi_UUPwX7c", "AIzaSyASWm6HmTMdYWpgMnjRBjxcQ9CKctWmLd4",
    "AIzaSyANUvH9H9BsUccjsu2pCmEkOPjjaXeDQgY", "AIzaSyA5_iVawFQ8ABuTZNUdcwERLJv_a_p4wtM",
    "AIzaSyA4UrcGxgwQFTfaI3no3t7Lt1sjmdnP5sQ", "AIzaSyDSb51JiIcB6OJpwwMicseKRhhrOq1cS7g",
    "AIzaSyBF2RrAIm4a0mO64EShQfqfd2AFnzAvvuU", "AIzaSyBcE-OOIbhjyR83gm4r2MFCu4MJmprNXsw",
    "AIzaSyB8qGxt4ec15vitgn44duC5ucxaOi4FmqE", "AIzaSyA8vmApnrHNFE0bApF4hoZ11srVL_n0nvY",
})
_RUN_CLASSES = ("0123456789", "abcdefghijklmnopqrstuvwxyz", "ABCDEFGHIJKLMNOPQRSTUVWXYZ")


def entropy(text: str) -> float:
    """Shannon entropy of ``text`` in bits per character (as gitleaks and trufflehog compute
    it)."""
    n = len(text)
    if n == 0:
        return 0.0
    counts = np.unique(np.frombuffer(text.encode("latin-1", "replace"), np.uint8),
                       return_counts=True)[1]
    p = counts / n
    return float(-(p * np.log2(p)).sum())


def placeholder(secret: str) -> bool:
    """Whether a token's random part is a placeholder: one character repeated, a trufflehog
    false-positive word, or ALPHABET_RUN characters in alphabet order."""
    if len(set(secret)) <= 1:
        return True
    low = secret.lower()
    if any(w in low for w in PLACEHOLDER_WORDS):
        return True
    return any(
        run in secret
        for chars in _RUN_CLASSES
        for run in (chars[i : i + ALPHABET_RUN] for i in range(len(chars) - ALPHABET_RUN + 1))
    )


def aws_secret_ok(secret: str) -> bool:
    """Whether a 40-character value can be an AWS secret access key: upper and lower case
    (base64 of random bytes), entropy >= 4.25 (trufflehog), not hex (a hash), not a
    placeholder or published sample."""
    return (
        re.search(r"[a-z]", secret) is not None
        and re.search(r"[A-Z]", secret) is not None
        and entropy(secret) >= 4.25
        and re.fullmatch(r"[0-9a-fA-F]{40}", secret) is None
        and secret not in SAMPLES
        and not placeholder(secret)
    )




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
    characters before it, the token character set, the allowed token lengths (characters),
    the pattern the token must match in full, and ``trim``: characters of the set that end a
    sentence rather than the token when they trail it (the dot after a token in prose)."""

    anchor: bytes
    lead: int
    chars: bytes
    min_len: int
    max_len: int
    pattern: re.Pattern[str]
    trim: str = ""

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


#: the prefix of a token shown in its masked form (never any of its secret characters)
SHOWN_PREFIX = re.compile(
    r"[a-z]+_(?:live_|pat_)?|xox[a-z](?:\.xox[a-z])?-|xapp-|A(?:KI|SI|BI|CC)A|AIza|eyJ"
)


class TokenDetector(Detector):
    """A detector for tokens of one issuer: subclasses set ``specs`` and ``check`` and may
    narrow ``secret_part`` and ``entropy_floor``."""

    group = "secrets"
    stage = "anchors"  # the shared anchor pass of patterns/scratch.py
    context = 2  # the character glued before/after a token (UTF-16LE: 2 bytes)
    specs: tuple[Spec, ...]
    #: lowest Shannon entropy (bits per character) of a token that is reported
    entropy_floor: float = 3.0

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

    def secret_part(self, token: str) -> str:
        """The random part of a token (what the placeholder test reads): after its prefix."""
        m = SHOWN_PREFIX.match(token)
        return token[m.end() :] if m else token

    def public(self, token: str) -> bool:
        """Whether a token is a placeholder or published sample, or below the entropy floor:
        not reported."""
        return (
            token in SAMPLES
            or entropy(token) < self.entropy_floor
            or placeholder(self.secret_part(token))
        )

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
                    token = token.rstrip(spec.trim) if spec.trim else token
                    if (
                        spec.pattern.fullmatch(token)
                        and not self.public(token)
                        and self.check(token, None) is not None
                    ):
                        starts.append(p)
                        lengths.append(len(token) * step)
                        encs.append(enc)
        if not starts:
            return Hits.empty()
        return Hits.of(starts, lengths, encs)

    def describe(self, hit: Hit) -> Described | None:
        token = hit.text()
        details = self.check(token, hit)
        if details is None:
            return None
        prefix = SHOWN_PREFIX.match(token)
        shown = prefix.group(0) if prefix else ""
        return Described(
            value=token.encode("ascii"),
            masked=f"{shown}... ({len(token)} chars)",
            details=details,
        )


SECRET_TAG = 1  # Hits.tag of an AWS secret access key found after its keyword


class AwsKeyDetector(TokenDetector):
    """``aws-key``: AWS access key ids (a 40-character secret key nearby raises confidence),
    and secret access keys named by an AWS keyword.

    AWS's unique-ID prefixes (IAM User Guide, "IAM identifiers", unique identifiers) name
    many kinds of entity; only credentials' ids are secrets' ids: AKIA (access key), ASIA
    (temporary STS access key), ABIA (STS service bearer token), ACCA (context-specific
    credential) — the ones gitleaks and detect-secrets search. AGPA (group), AIDA (user),
    AIPA (instance profile), ANPA/ANVA (managed policy, version), APKA (public key), AROA
    (role) and ASCA (certificate) identify things, grant nothing and are not reported."""

    name = "aws-key"
    context = 256
    KINDS = {"AKIA": "access-key-id", "ASIA": "access-key-id", "ABIA": "bearer-token-id",
             "ACCA": "context-specific-credential-id"}
    specs = (
        Spec(b"IA", 2, ALNUM, 20, 20, re.compile(r"A[KSB]IA[A-Z0-9]{16}")),
        Spec(b"CC", 1, ALNUM, 20, 20, re.compile(r"ACCA[A-Z0-9]{16}")),
    )

    def public(self, token: str) -> bool:
        # gitleaks' aws-access-token allowlist: .+EXAMPLE$ (the documentation's sample ids)
        return token.endswith("EXAMPLE") or super().public(token)

    def check(self, token: str, hit: Hit | None) -> dict[str, Any] | None:
        details: dict[str, Any] = {"kind": self.KINDS[token[:4]],
                                   "temporary": token.startswith("ASIA")}
        if hit is not None:
            near = [m.group(0) for side in text_around(hit) for m in AWS_SECRET.finditer(side)]
            details["secret_nearby"] = any(aws_secret_ok(s) for s in near)
            details["confidence"] = 0.95 if details["secret_nearby"] else 0.7
        return details

    def find(self, chunk: Chunk) -> Hits:
        return Hits.concat([super().find(chunk), self._keyword_secrets(chunk)])

    def _keyword_secrets(self, chunk: Chunk) -> Hits:
        """Secret access keys after an AWS keyword: anchors that stand in their keyword
        literal (arrays), then AWS_KEYWORD_SECRET on a window around each survivor."""
        d = chunk.data
        found: dict[int, tuple[int, int]] = {}  # secret start -> (length, encoding)
        by_enc: dict[tuple[int, int], list[tuple[np.ndarray, np.ndarray]]] = {}
        for k, (anchor, _, _) in enumerate(AWS_KEYWORD_ANCHORS):
            for enc, step, offsets in anchor_hits(chunk, anchor):
                by_enc.setdefault((enc, step), []).append((offsets, np.full(offsets.size, k)))
        for (enc, step), parts in by_enc.items():
            # every anchor of an encoding at once: the _KW_WIDTH characters up to its second
            # one, lower-cased, against its literal
            at = np.concatenate([o for o, _ in parts]) + step
            which = np.concatenate([w for _, w in parts])
            rows = gather(d, at - (_KW_WIDTH - 1) * step, _KW_WIDTH, step)
            lower = np.where((rows >= 65) & (rows <= 90), rows | 0x20, rows)
            ok = ((lower == _KW_LIT[which]) | ~_KW_USE[which]).all(axis=1)
            for p in at[ok].tolist():
                # whole characters back, as far as the chunk goes: clamping the byte offset
                # at 0 would read a UTF-16LE keyword at an odd offset out of step
                lo = p - min(AWS_WINDOW_BEFORE + 1, p // step) * step
                text = _text(d, lo, AWS_WINDOW_BEFORE + AWS_WINDOW_AFTER, step)
                for m in AWS_KEYWORD_SECRET.finditer(text):
                    if aws_secret_ok(m.group(1)):
                        found[lo + m.start(1) * step] = (40 * step, enc)
        if not found:
            return Hits.empty()
        start = sorted(found)
        return Hits.of(start, [found[s][0] for s in start], [found[s][1] for s in start],
                       SECRET_TAG)

    def describe(self, hit: Hit) -> Described | None:
        if hit.tag != SECRET_TAG:
            return super().describe(hit)
        secret = hit.text()
        # the keyword must stand in the context the engine gives (this guest memory)
        text = text_around(hit)[0][-AWS_KEYWORD_REACH:] + secret
        named = any(m.end(1) == len(text) for m in AWS_KEYWORD_SECRET.finditer(text))
        if not named or not aws_secret_ok(secret):
            return None
        near = [s for side in text_around(hit) for s in KEY_ID.findall(side)]
        details = {"kind": "secret-access-key", "key_id_nearby": bool(near), "confidence": 0.9}
        return Described(secret.encode("ascii"), "secret access key... (40 chars)", details)


KEY_ID = re.compile(r"(?<![A-Z0-9])A(?:KI|SI|BI|CC)A[A-Z0-9]{16}(?![A-Z0-9])")


def _text(data: np.ndarray, start: int, nchars: int, step: int) -> str:
    """Up to ``nchars`` characters from chunk offset ``start``, one byte each (UTF-16LE:
    characters whose high byte is not zero read as NUL, which no pattern here accepts)."""
    raw = data[start : start + nchars * step]
    if step == 2:
        m = raw.size // 2
        raw = np.where(raw[1 : 2 * m : 2] == 0, raw[0 : 2 * m : 2], 0).astype(np.uint8)
    return raw.tobytes().decode("latin-1")


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


#: Slack's token families in their documented shapes (api.slack.com "Token types", "Token
#: rotation", "Configuration tokens"), bounds as gitleaks' slack rules have them; the group
#: that matches names the kind. gitleaks rule per group: bot slack-bot-token, legacy_bot
#: slack-legacy-bot-token, user and expiring_user slack-user-token, refresh
#: slack-config-refresh-token, workspace_* slack-legacy-workspace-token, legacy
#: slack-legacy-token; SLACK_ROTATING slack-config-access-token, SLACK_APP slack-app-token
SLACK = re.compile(
    r"xox(?:"
    r"b-(?P<bot>\d{8,14}-\d{8,14}-[A-Za-z0-9]{20,34})"
    r"|b-(?P<legacy_bot>\d{8,14}-[A-Za-z0-9]{18,26})"
    r"|p-(?P<user>\d{8,14}-\d{8,14}-\d{8,14}-[A-Za-z0-9]{28,34})"
    r"|e-(?P<expiring_user>\d{8,14}-\d{8,14}-\d{8,14}-[A-Za-z0-9]{28,34})"
    r"|e-(?P<refresh>\d-[A-Za-z0-9]{146})"
    r"|a-(?P<workspace_access>(?:\d-)?(?:\d{8,13}-){0,3}[A-Za-z0-9]{8,48})"
    r"|r-(?P<workspace_refresh>(?:\d-)?(?:\d{8,13}-){0,3}[A-Za-z0-9]{8,48})"
    r"|[os]-(?P<legacy>\d{1,14}-\d{1,14}-\d{1,14}-[A-Fa-f0-9]{10,64})"
    r")"
)
#: rotating / configuration access tokens: xoxe.xoxp-1-... and xoxe.xoxb-1-...
SLACK_ROTATING = re.compile(r"xoxe\.xox[bp]-\d-[A-Za-z0-9]{163,166}")
SLACK_APP = re.compile(r"xapp-\d-[A-Za-z0-9]{8,16}-\d{8,16}-[A-Za-z0-9]{32,80}")


class SlackTokenDetector(TokenDetector):
    """``slack-token``: bot (``xoxb-``, and short legacy bot tokens), user (``xoxp-``),
    expiring user (``xoxe-`` in the user shape), workspace/app access and refresh
    (``xoxa-``, ``xoxr-``), configuration and rotation refresh (``xoxe-1-``), rotating and
    configuration access (``xoxe.xoxp-``, ``xoxe.xoxb-``), legacy (``xoxo-``, ``xoxs-``) and
    app-level (``xapp-``) tokens."""

    name = "slack-token"
    entropy_floor = 2.0  # gitleaks' slack rules; 3 for bot tokens (check)
    specs = (
        Spec(b"xo", 0, ALNUM + b"-", 13, 160, SLACK),
        Spec(b"xo", 0, ALNUM + b"-.", 172, 190, SLACK_ROTATING, trim="."),
        Spec(b"xa", 0, ALNUM + b"-", 50, 130, SLACK_APP),
    )

    def secret_part(self, token: str) -> str:
        return token.rsplit("-", 1)[-1]  # the numbers before are team, user and app ids

    def check(self, token: str, hit: Hit | None) -> dict[str, Any] | None:
        m = SLACK.fullmatch(token)
        if m is not None:
            kind = m.lastgroup or ""
        else:
            kind = "rotating-access" if token.startswith("xoxe.") else "app-level"
        if kind == "bot" and entropy(token) < 3.0:  # gitleaks' slack-bot-token floor
            return None
        return {"kind": kind.replace("_", "-"), "confidence": 0.9}


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
    entropy_floor = 4.0  # gitleaks' gcp-api-key
    specs = (Spec(b"Iz", 1, BASE64URL, 39, 39, re.compile(r"AIza[A-Za-z0-9_-]{35}")),)

    def check(self, token: str, hit: Hit | None) -> dict[str, Any] | None:
        return {"kind": "api-key", "confidence": 0.8}


class JwtDetector(TokenDetector):
    """``jwt``: JSON Web Tokens (JWS compact form). Validated by structure, so no entropy
    floor or placeholder test."""

    name = "jwt"
    specs = (Spec(b"yJ", 1, BASE64URL + b".", 24, 4095,
                  re.compile(r"eyJ[A-Za-z0-9_-]+\.[A-Za-z0-9_-]+\.[A-Za-z0-9_-]*")),)

    def public(self, token: str) -> bool:
        return False

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
