"""Cloud and API secrets: each token shape found once in ASCII and UTF-16LE at any offset,
verified as its issuer allows (GitHub checksum, JWT header); near misses are not reported."""

from __future__ import annotations

import base64
import binascii
import json
import random
import re

import numpy as np
import pytest
from hypothesis import assume, example, given, settings
from hypothesis import strategies as st

from patterns.base import Chunk, Hit
from patterns.secrets import (
    SHOWN_PREFIX,
    AwsKeyDetector,
    GcpApiKeyDetector,
    GithubTokenDetector,
    JwtDetector,
    SlackTokenDetector,
    StripeKeyDetector,
    github_checksum_ok,
    pattern_head,
)

DETS = {d.name: d for d in (AwsKeyDetector(), GithubTokenDetector(), SlackTokenDetector(),
                            StripeKeyDetector(), GcpApiKeyDetector(), JwtDetector())}
SETTINGS = settings(max_examples=40)
B62 = "0123456789ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz"


def rand(r: random.Random, alphabet: str, n: int) -> str:
    return "".join(r.choice(alphabet) for _ in range(n))


def github(r: random.Random, prefix: str = "ghp") -> str:
    """A classic GitHub token with its checksum computed independently here: CRC32 (zlib's,
    via binascii) of the 30 random characters, base62, 6 digits."""
    body = rand(r, B62, 30)
    c = binascii.crc32(body.encode())
    digits = ""
    for _ in range(6):
        c, d = divmod(c, 62)
        digits = B62[d] + digits
    return f"{prefix}_{body}{digits}"


def b64url(obj: object) -> str:
    return base64.urlsafe_b64encode(json.dumps(obj).encode()).rstrip(b"=").decode()


def jwt(r: random.Random, header: object | None = None) -> str:
    head = {"alg": "RS256", "typ": "JWT"} if header is None else header
    sig = rand(r, B62 + "-_", 86)
    return f"{b64url(head)}.{b64url({'sub': rand(r, B62, 8), 'iat': 1700000000})}.{sig}"


def token(kind: str, r: random.Random) -> tuple[str, str]:
    """(detector name, a valid token) of a kind."""
    upper = "ABCDEFGHIJKLMNOPQRSTUVWXYZ234567"
    return {
        "aws": ("aws-key", "AKIA" + rand(r, upper, 16)),
        "aws-temp": ("aws-key", "ASIA" + rand(r, upper, 16)),
        "github": ("github-token", github(r)),
        "github-oauth": ("github-token", github(r, "gho")),
        "github-pat": ("github-token", f"github_pat_{rand(r, B62, 22)}_{rand(r, B62, 59)}"),
        "slack-bot": ("slack-token", f"xoxb-{rand(r, '0123456789', 11)}-"
                                     f"{rand(r, '0123456789', 13)}-{rand(r, B62, 24)}"),
        "slack-user": ("slack-token", f"xoxp-{rand(r, '0123456789', 11)}-"
                                      f"{rand(r, '0123456789', 12)}-{rand(r, '0123456789', 13)}-"
                                      f"{rand(r, '0123456789abcdef', 32)}"),
        "stripe": ("stripe-key", "sk_live_" + rand(r, B62, 24)),
        "stripe-restricted": ("stripe-key", "rk_live_" + rand(r, B62, 99)),
        "gcp": ("gcp-api-key", "AIza" + rand(r, B62 + "-_", 35)),
        "jwt": ("jwt", jwt(r)),
    }[kind]


KINDS = ["aws", "aws-temp", "github", "github-oauth", "github-pat", "slack-bot", "slack-user",
         "stripe", "stripe-restricted", "gcp", "jwt"]


def background(seed: int, size: int, kind: str) -> bytearray:
    rng = np.random.default_rng(seed)
    if kind == "text":
        words = np.frombuffer(b"lorem ipsum: token = 'key' gh eyJ xo AIz IA _l\n", np.uint8)
        return bytearray(words[rng.integers(0, words.size, size)].tobytes())
    return bytearray(rng.integers(0, 256, size, dtype=np.uint8).tobytes())


def scan(buf: bytes, name: str) -> list[tuple[int, int, str, str, dict]]:
    det = DETS[name]
    hits = det.find(Chunk(np.frombuffer(bytes(buf), np.uint8)))
    out = []
    tags = [0] * len(hits) if hits.tag is None else hits.tag.tolist()
    for s, n, e, tag in zip(hits.start.tolist(), hits.length.tolist(), hits.encoding.tolist(),
                            tags, strict=True):
        enc = ("ascii", "utf-16le", "binary")[e]
        c = det.context
        d = det.describe(Hit(bytes(buf[s : s + n]), enc, bytes(buf[max(0, s - c) : s]),
                             bytes(buf[s + n : s + n + c]), tag))
        assert d is not None
        out.append((s, n, enc, d.masked, d.details))
    return out


def put(text: str, encoding: str, where: int, seed: int, kind: str = "random") -> bytearray:
    blob = f" {text}\n".encode("utf-16-le" if encoding == "utf-16le" else "ascii")
    buf = background(seed, 4096, kind)
    buf[where : where + len(blob)] = blob
    return buf


@SETTINGS
@given(kind=st.sampled_from(KINDS), seed=st.integers(0, 2**32 - 1),
       encoding=st.sampled_from(["ascii", "utf-16le"]), where=st.integers(0, 3000),
       back=st.sampled_from(["random", "text"]))
def test_token_found_once(kind: str, seed: int, encoding: str, where: int, back: str) -> None:
    name, tok = token(kind, random.Random(seed))
    buf = put(tok, encoding, where, seed, back)
    width = 2 if encoding == "utf-16le" else 1
    found = scan(buf, name)
    assert [(s, n, e) for s, n, e, _, _ in found] == [(where + width, len(tok) * width, encoding)]
    masked = found[0][3]
    assert tok[-8:] not in masked and len(masked) < len(tok)  # the secret part never shown
    for other in DETS:
        if other != name:
            assert scan(buf, other) == [], other


@SETTINGS
@given(seed=st.integers(0, 2**32 - 1), pos=st.integers(4, 39), char=st.sampled_from(B62))
def test_github_checksum_catches_one_changed_character(seed: int, pos: int, char: str) -> None:
    tok = github(random.Random(seed))
    assume(tok[pos] != char)
    bad = tok[:pos] + char + tok[pos + 1 :]
    assert github_checksum_ok(tok) and not github_checksum_ok(bad)
    assert scan(put(bad, "ascii", 10, seed), "github-token") == []


def test_aws_secret_nearby_raises_confidence() -> None:
    r = random.Random(5)
    _, kid = token("aws", r)
    secret = rand(r, B62 + "/+", 40)
    assume_mixed = any(c.islower() for c in secret) and any(c.isupper() for c in secret)
    assert assume_mixed
    for encoding in ("ascii", "utf-16le"):
        alone = scan(put(f"aws_access_key_id = {kid}", encoding, 100, 1, "text"), "aws-key")
        paired = scan(put(f"aws_access_key_id = {kid}\naws_secret_access_key = {secret}",
                          encoding, 100, 1, "text"), "aws-key")
        assert [d["secret_nearby"] for *_, d in alone] == [False]
        # the key id, and the secret itself (named by its keyword)
        assert [(d["kind"], d.get("secret_nearby")) for *_, d in paired] == [
            ("access-key-id", True), ("secret-access-key", None)]
        assert paired[0][4]["confidence"] > alone[0][4]["confidence"]


@pytest.mark.parametrize("text", [
    "AKIAIOSFODNN7EXAMPLEX",  # glued to a longer run
    "XAKIAIOSFODNN7EXAMPLE",
    "AKIAIOSFODNN7EXAMPL",  # too short
    "sk_test_4eC39HqLyjWDarjtT1zdp7dc",  # Stripe test key: not a secret
    "pk_live_4eC39HqLyjWDarjtT1zdp7dc",  # publishable key
    "ghp_" + "a" * 36,  # checksum wrong
    "AIzaSyDaGmWKa4JsXZ-HjGw7ISLn_3namBGew",  # 37 characters
    "xoxb-not-a-token",
])
def test_near_misses_not_reported(text: str) -> None:
    for encoding in ("ascii", "utf-16le"):
        buf = put(text, encoding, 64, 3, "text")
        assert all(scan(buf, name) == [] for name in DETS), (text, encoding)


@pytest.mark.parametrize("header", [{"typ": "JWT"}, {"alg": 5}, ["alg"], "alg"])
def test_jwt_needs_json_header_with_alg(header: object) -> None:
    tok = jwt(random.Random(1), header)
    assert scan(put(tok, "ascii", 7, 1), "jwt") == []
    good = jwt(random.Random(1))
    found = scan(put(good, "ascii", 7, 1), "jwt")
    assert [d["alg"] for *_, d in found] == ["RS256"]


def test_jwt_deeply_nested_payload_not_reported() -> None:
    head = b64url({"alg": "HS256"})
    deep = base64.urlsafe_b64encode(b"[" * 3000).rstrip(b"=").decode()
    assert scan(put(f"{head}.{deep}.c2ln", "ascii", 0, 2), "jwt") == []


def test_jwt_not_json_payload_not_reported() -> None:
    head = b64url({"alg": "HS256"})
    junk = base64.urlsafe_b64encode(b"\x93binary junk\x00").rstrip(b"=").decode()
    assert scan(put(f"{head}.{junk}.c2lnbmF0dXJl", "ascii", 0, 2), "jwt") == []


@settings(max_examples=15)
@given(kind=st.sampled_from(KINDS), where=st.integers(2, 20000),
       chunk=st.sampled_from([4096, 4099, 65536]), encoding=st.sampled_from(["ascii", "utf-16le"]),
       shuffle=st.integers(0, 2**32 - 1))
def test_engine_any_offset_any_chunking(kind: str, where: int, chunk: int, encoding: str,
                                        shuffle: int, engine_scan) -> None:
    """Found once at its GPA, in one extent or with the pages stored out of order."""
    name, tok = token(kind, random.Random(where))
    codec = "utf-16-le" if encoding == "utf-16le" else "ascii"
    blob = tok.encode(codec)
    buf = background(where, 24 * 1024, "random")
    sep = b" " if codec == "ascii" else " ".encode(codec)  # a non-token neighbour each side
    end = where + len(blob)
    buf[where - len(sep) : end + len(sep)] = sep + blob + sep
    order = list(range(6))
    np.random.default_rng(shuffle).shuffle(order)
    for layout in (None, order):
        found = engine_scan(bytes(buf), chunk, layout, "secrets")
        assert [(f.detector, f.gpa, f.length, f.encoding) for f in found] == [
            (name, where, len(blob), encoding)
        ]


@pytest.mark.parametrize(
    ("pattern", "head"),
    [
        (r"gh[pousr]_[A-Za-z0-9]{36}", (b"g", b"h", b"pousr", b"_")),
        (r"xox[abposer]-(?:[0-9]{1,14}-){2,3}", (b"x", b"o", b"x", b"abposer", b"-")),
        (r"eyJ[A-Za-z0-9_-]+\.", (b"e", b"y", b"J")),
        (r"ab?c", (b"a",)),  # a repeated character ends the fixed start
        (r"(?:a)b", ()),
    ],
)
def test_pattern_head(pattern: str, head: tuple[bytes, ...]) -> None:
    assert pattern_head(pattern) == head


@SETTINGS
@given(kind=st.sampled_from(KINDS), seed=st.integers(0, 2**32 - 1),
       encoding=st.sampled_from(["ascii", "utf-16le"]))
def test_head_check_keeps_every_valid_token(kind: str, seed: int, encoding: str) -> None:
    """The cheap check of a token's fixed start never rejects a token its pattern accepts."""
    name, tok = token(kind, random.Random(seed))
    matching = [s for s in DETS[name].specs if s.pattern.fullmatch(tok)]
    assert matching
    step = 2 if encoding == "utf-16le" else 1
    data = np.frombuffer(f"  {tok}  ".encode(encoding.replace("ascii", "latin-1")), np.uint8)
    for spec in matching:
        assert spec.head_ok(data, np.array([2 * step]), step).tolist() == [True]


# ---- issue 11: every Slack family, every AWS credential prefix, keyword secrets, placeholders

DIGITS = "0123456789"


def slack(family: str, r: random.Random) -> str:
    """A token of a Slack family in its documented shape, random where Slack's is."""
    n = lambda k: rand(r, DIGITS, k)  # noqa: E731
    return {
        "bot": f"xoxb-{n(12)}-{n(13)}-{rand(r, B62, 24)}",
        "legacy-bot": f"xoxb-{n(12)}-{rand(r, B62, 24)}",
        "user": f"xoxp-{n(11)}-{n(12)}-{n(12)}-{rand(r, '0123456789abcdef', 32)}",
        "expiring-user": f"xoxe-{n(13)}-{n(13)}-{n(13)}-{rand(r, '0123456789abcdef', 32)}",
        "refresh": f"xoxe-1-{rand(r, B62, 146)}",
        "rotating-access": f"xoxe.xox{r.choice('bp')}-1-{rand(r, B62, 163)}",
        "workspace-access": f"xoxa-2-{n(9)}-{n(11)}-{n(13)}-{rand(r, '0123456789abcdef', 18)}",
        "workspace-refresh": f"xoxr-{rand(r, B62, 40)}",
        "legacy": f"xox{r.choice('os')}-{n(10)}-{n(10)}-{n(10)}-{rand(r, '0123456789abcdef', 10)}",
        "app-level": f"xapp-1-A{rand(r, B62.upper()[:36], 10)}-{n(13)}-"
                     f"{rand(r, '0123456789abcdef', 64)}",
    }[family]


SLACK_FAMILIES = ["bot", "legacy-bot", "user", "expiring-user", "refresh", "rotating-access",
                  "workspace-access", "workspace-refresh", "legacy", "app-level"]


@SETTINGS
@given(family=st.sampled_from(SLACK_FAMILIES), seed=st.integers(0, 2**32 - 1),
       encoding=st.sampled_from(["ascii", "utf-16le"]), where=st.integers(0, 3000),
       end=st.sampled_from(["\n", ". ", "&"]))
def test_every_slack_family_found_with_its_kind(family, seed, encoding, where, end):
    tok = slack(family, random.Random(seed))
    codec = "utf-16-le" if encoding == "utf-16le" else "ascii"
    buf = put(tok, encoding, where, seed)
    blob = f"{tok}{end}".encode(codec)  # what follows a token in prose or a URL
    at = where + len(" ".encode(codec))
    buf[at : at + len(blob)] = blob
    found = scan(buf, "slack-token")
    assert [(s, n, d["kind"]) for s, n, _, _, d in found] == [(at, len(tok.encode(codec)), family)]


@SETTINGS
@given(prefix=st.sampled_from(["AKIA", "ASIA", "ABIA", "ACCA"]), seed=st.integers(0, 2**32 - 1),
       encoding=st.sampled_from(["ascii", "utf-16le"]))
def test_every_aws_credential_prefix_found(prefix, seed, encoding):
    kid = prefix + rand(random.Random(seed), "ABCDEFGHIJKLMNOPQRSTUVWXYZ234567", 16)
    found = scan(put(f"id {kid}", encoding, 40, seed, "text"), "aws-key")
    assert [d["kind"] for *_, d in found] == [AwsKeyDetector.KINDS[prefix]]


@pytest.mark.parametrize("prefix", ["AGPA", "AIDA", "AIPA", "ANPA", "ANVA", "APKA", "AROA",
                                    "ASCA", "A3TX"])
def test_aws_ids_that_are_no_credential_not_reported(prefix):
    kid = prefix + rand(random.Random(1), "ABCDEFGHIJKLMNOPQRSTUVWXYZ234567", 16)
    assert scan(put(f"arn id {kid}", "ascii", 40, 1, "text"), "aws-key") == []


def aws_secret(r: random.Random) -> str:
    while True:
        s = rand(r, B62 + "/+", 40)
        if any(c.islower() for c in s) and any(c.isupper() for c in s):
            return s


KEYWORD_FORMS = [
    "aws_secret_access_key = {}",  # ~/.aws/credentials
    "AWS_SECRET_ACCESS_KEY={}",  # environment
    '"SecretAccessKey": "{}"',  # STS / SDK JSON
    "<SecretAccessKey>{}</SecretAccessKey>",  # STS XML
    "aws_key: '{}'",  # detect-secrets' aws ... key rule
    "secret_access_key => '{}'",  # Ruby SDK options
]


@SETTINGS
@given(form=st.sampled_from(KEYWORD_FORMS), seed=st.integers(0, 2**32 - 1),
       encoding=st.sampled_from(["ascii", "utf-16le"]), where=st.integers(0, 3000))
# a UTF-16LE keyword at an odd offset less than its window's reach from the buffer's start
@example(form='"SecretAccessKey": "{}"', seed=0, encoding="utf-16le", where=1)
def test_aws_secret_after_its_keyword_found_without_a_key_id(form, seed, encoding, where):
    secret = aws_secret(random.Random(seed))
    text = form.format(secret)
    found = scan(put(text, encoding, where, seed, "text"), "aws-key")
    width = 2 if encoding == "utf-16le" else 1
    at = where + width * (1 + text.index(secret))
    assert [(s, n, d["kind"]) for s, n, _, _, d in found] == [(at, 40 * width, "secret-access-key")]
    assert secret[:4] not in found[0][3] and secret[-4:] not in found[0][3]


@pytest.mark.parametrize("text", [
    "some_value = {}",  # no AWS keyword
    "aws_secret_access_key = {}X",  # 41 characters
    "aws_secret_access_key = " + "0123456789abcdef" * 2 + "01234567",  # hex: a hash
    "aws_secret_access_key = wJalrXUtnFEMI/K7MDENG/bPxRfiCYEXAMPLEKEY",  # AWS documentation
])
def test_aws_keyword_secret_near_misses(text):
    secret = aws_secret(random.Random(2))
    for encoding in ("ascii", "utf-16le"):
        assert scan(put(text.format(secret), encoding, 30, 2, "text"), "aws-key") == []


PLACEHOLDERS = [
    "AKIAXXXXXXXXXXXXXXXX", "AKIAIOSFODNN7EXAMPLE", "ASIAIOSFODNN7EXAMPLE",
    "AKIA" + "7" * 16, "AKIAABCDEFGHIJKLMNOP",
    "github_pat_" + "x" * 22 + "_" + "x" * 59,
    "github_pat_" + "1" * 22 + "_" + "A" * 59,
    "AIzaSyabcdefghijklmnopqrstuvwxyz1234567", "AIzaSyAnLA7NfeLquW1tJFpx_eQCxoX-oo6YyIs",
    "AIza" + "a" * 35, "AIzaSy" + "0" * 33,
    "xoxb-xxxxxxxxx-xxxxxxxxxx-xxxxxxxxxxxx", "xoxb-000000000000-000000000000-" + "0" * 24,
    "xoxp-572370529330-573807301142-572331691188-" + "X" * 32,
    "xoxe.xoxp-1-" + "A" * 163, "xoxa-" + "a" * 30,
    "sk_live_" + "x" * 24, "sk_live_EXAMPLEKEY0123456789abcdef",
]


@pytest.mark.parametrize("text", PLACEHOLDERS)
def test_placeholders_and_samples_not_reported(text):
    for encoding in ("ascii", "utf-16le"):
        buf = put(text, encoding, 64, 3, "text")
        assert all(scan(buf, name) == [] for name in DETS), (text, encoding)


@SETTINGS
@given(kind=st.sampled_from([k for k in KINDS if k not in ("jwt", "github", "github-oauth")]),
       seed=st.integers(0, 2**32 - 1), char=st.sampled_from(B62))
def test_any_token_of_one_repeated_character_not_reported(kind, seed, char):
    name, tok = token(kind, random.Random(seed))
    prefix = SHOWN_PREFIX.match(tok)
    assert prefix is not None
    body = re.sub(r"[A-Za-z0-9]", char, tok[prefix.end() :])  # separators stay
    fake = tok[: prefix.end()] + body
    assert scan(put(fake, "ascii", 10, seed, "text"), name) == []


@settings(max_examples=10)
@given(page=st.integers(1, 4), back=st.integers(1, 60), shuffle=st.integers(0, 2**32 - 1))
def test_engine_keyword_secret_across_a_page_seam(page, back, shuffle, engine_scan):
    """The keyword on one page, the value on the next (or both on one), pages stored in or
    out of order: found once, at the value's GPA."""
    secret = aws_secret(random.Random(shuffle))
    text = f"aws_secret_access_key = {secret}".encode()
    buf = background(shuffle, 24 * 1024, "random")
    at = page * 4096 - back  # the seam falls inside the line
    buf[at - 1 : at + len(text) + 1] = b" " + text + b" "
    order = list(range(6))
    np.random.default_rng(shuffle).shuffle(order)
    gpa = at + text.index(secret.encode())
    for layout in (None, order):
        found = engine_scan(bytes(buf), 65536, layout, "aws-key")
        assert [(f.gpa, f.length, f.details["kind"]) for f in found] == [
            (gpa, 40, "secret-access-key")]


def _b64_body(text: str, n: int) -> str:
    """n characters of unpadded base64 of ``text``, the way Slack's configuration and rotation
    tokens look ("Mi0yLT..." is base64 of "2-2-...")."""
    body = base64.b64encode(text.encode()).decode().replace("+", "").replace("/", "")
    return body.rstrip("=")[:n]


#: one token of each family as Slack documents it (api.slack.com "Token types", "Token
#: rotation", "Configuration tokens"): prefix, numeric team / user / app ids, secret; bodies
#: random, made for this test; the peer rule id whose shape and bounds vmleak follows
SLACK_EXAMPLES = [
    ("bot", "slack-bot-token", "xoxb-954255503491-6547912103503-JJqQPDqTdhkgNQxrFsj3ylaG"),
    ("legacy-bot", "slack-legacy-bot-token", "xoxb-23705690295-N600ZBxbh88g1bZCmpjIkHOH"),
    ("user", "slack-user-token",
     "xoxp-20926980676-947703813238-877541098260-c9eeb488c6daa9b7fcd3ce2818f26ff6"),
    ("expiring-user", "slack-user-token",
     "xoxe-7200709312035-6476772793306-1391507116623-c3ee38ae14e8496f2facd5ab3b46f9dd"),
    ("refresh", "slack-config-refresh-token", "xoxe-1-" + _b64_body(
        "3-1-T04MCQMEXQ9-4726837507825-4848681849303-" + "9f2c1e77a0b4d5c3e8f6" * 6, 146)),
    ("rotating-access", "slack-config-access-token", "xoxe.xoxp-1-" + _b64_body(
        "2-2-T04MCQMEXQ9-4726837507825-4848681849303-5158024182979-"
        + "dfcf0ce888a769de910245802c0d4d9b" * 4, 164)),
    ("rotating-access", "slack-config-access-token", "xoxe.xoxb-1-" + _b64_body(
        "2-1-T04MCQMEXQ9-4726837507825-5158152691714-"
        + "4bda6aa51cc5897e3d7f3181025d4378" * 4, 163)),
    ("workspace-access", "slack-legacy-workspace-token",
     "xoxa-2-438166672-55725261433-2948102798916-6620bb96ceaa4d00e7"),
    ("workspace-refresh", "slack-legacy-workspace-token",
     "xoxr-TBat8taoMow424KPWjq6fYL3XYxnw0Yy9m8Aj35A"),
    ("legacy", "slack-legacy-token", "xoxs-7710253904-4115445228-4093457891-a630e91d82"),
    ("legacy", "slack-legacy-token",
     "xoxo-385120947716-219384756-7730194628-3b9f0c6d2e81a7f45c0d9e3b2a6f8c17"),
    ("app-level", "slack-app-token", "xapp-1-AWD5MQDSO3S-5782431850205-"
     "4071dd134cdbcf3ed6276ed60ca4ee46bca4e85015cd13761ac34669eca5ae0a"),
]


@pytest.mark.parametrize(("family", "rule", "tok"), SLACK_EXAMPLES,
                         ids=[f"{f}-{t[:9]}" for f, _, t in SLACK_EXAMPLES])
def test_slack_family_example(family, rule, tok):
    """Each documented family, as it stands in a config file, found once with its kind, in
    ASCII and UTF-16LE (``rule``: gitleaks' rule id for the family, cited in secrets.py)."""
    assert rule.startswith("slack-")
    for encoding in ("ascii", "utf-16le"):
        width = 2 if encoding == "utf-16le" else 1
        line = f'SLACK_TOKEN="{tok}"'
        found = scan(put(line, encoding, 100, 4, "text"), "slack-token")
        at = 100 + width * (1 + line.index(tok))
        assert [(s, n, d["kind"]) for s, n, _, _, d in found] == [
            (at, len(tok) * width, family)], encoding
        assert tok[-6:] not in found[0][3]


#: the false positives gitleaks' own rules are tested against (cmd/generate/config/rules/
#: slack.go, aws.go, gcp.go: each rule's FPs), none of which vmleak may report
GITLEAKS_FPS = [
    # slack-bot-token, slack-legacy-bot-token
    "xoxb-xxxxxxxxx-xxxxxxxxxx-xxxxxxxxxxxx", "xoxb-xxx", "xoxb-12345-abcd234",
    "xoxb-xoxb-my-bot-token", "xoxb-xxxxxxxxxxx-xxxxxxxxxxxxxxxxxxxxxxxx", "xoxb-Slack_BOT_TOKEN",
    "xoxb-abcdef-abcdef", "xoxb-0000000000-xxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxx",
    # slack-user-token
    '"token1": "xoxp-1234567890"',
    '"token2": "xoxp-XXXXXXXXXX-XXXXXXXXXX-XXXXXXXXXXX-XXXXXXXXXXXXXXXXXXXXXXXXXXXXXXXX"',
    '"token3": "xoxp-1234-1234-1234-4ddbc191d40ee098cbaae6f3523ada2d"',
    '"token4": "xoxp-572370529330-573807301142-572331691188-####################"',
    "xoxp-000000000000-000000000000-000000000000-" + "0" * 32,
    # slack-config-access-token, slack-config-refresh-token
    "xoxe.xoxp-1-SlackAppConfigurationAccessTokenHere", "xoxe.xoxp-1-RANDOMSTRINGHERE",
    "xoxe.xoxp-1-initial", "xoxe-1-xxx", "XOxE-RROAmw, Home and Garden, 5:24, 20120323",
    # slack-legacy-workspace-token, slack-legacy-token
    "https://github.com/xoxa-nyc/xoxa-nyc.github.io/blob/master/README.md",
    "https://indieweb.org/images/3/35/2018-250-xoxo-indieweb-1.jpg",
    "xoxa-access-token-string",
    # aws-access-token
    "key = AKIAXXXXXXXXXXXXXXXX", "aws_access_key: AKIAIOSFODNN7EXAMPLE",
    "TODAYINASIAASACKOFRICEFELLOVER",
    # gcp-api-key
    "GWw4hjABFzZCGiRpmlDyDdo87Jn9BN9THUA47muVRNunLxsa82tMAdvmrhOqNkRKiYMEAFbTJAIzaTesb6Tscfcni8"
    "vIpWZqNCXFDFslJtVSvFDq",
    "AIzaTesb6Tscfcni8vIpWZqNCXFDFslJtVSvFDqabcd123",
    'apiKey: "AIzaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaa"', "AIZASYCO2CXRMC9ELSKLHLHRMBSWDEVEDZTLO2O",
]


@pytest.mark.parametrize("text", GITLEAKS_FPS)
def test_gitleaks_false_positives_not_reported(text):
    for encoding in ("ascii", "utf-16le"):
        buf = put(text, encoding, 64, 3, "text")
        assert all(scan(buf, name) == [] for name in DETS), (text, encoding)


def test_xoxa_word_token_reported_as_gitleaks_does():
    """``xoxa-faketoken`` has the legacy workspace token's shape and 2.9 bits/character:
    gitleaks reports it too (its rule's FP list has it commented out); vmleak uses no English
    word list (a random secret holds short words by chance), so it is reported."""
    assert [d["kind"] for *_, d in scan(put("xoxa-faketoken", "ascii", 64, 3, "text"),
                                        "slack-token")] == ["workspace-access"]


@SETTINGS
@given(family=st.sampled_from(SLACK_FAMILIES), seed=st.integers(0, 2**32 - 1),
       char=st.sampled_from(B62))
def test_any_slack_family_with_one_repeated_character_not_reported(family, seed, char):
    """gitleaks' repeated-character allowlist: whatever the family, a secret part that is one
    character repeated is never reported (ids before it stay numeric)."""
    tok = slack(family, random.Random(seed))
    head, _, secret = tok.rpartition("-")
    fake = f"{head}-{char * len(secret)}"
    assert scan(put(fake, "ascii", 10, seed, "text"), "slack-token") == []


@SETTINGS
@given(prefix=st.sampled_from(sorted(AwsKeyDetector.KINDS)), char=st.sampled_from(B62.upper()),
       encoding=st.sampled_from(["ascii", "utf-16le"]))
def test_any_aws_key_id_of_one_repeated_character_not_reported(prefix, char, encoding):
    """``AKIAXXXXXXXXXXXXXXXX`` and its kin, for every credential prefix (gitleaks
    aws-access-token entropy 3, trufflehog RequiredIdEntropy)."""
    assert scan(put(f"id = {prefix}{char * 16}", encoding, 10, 1, "text"), "aws-key") == []
