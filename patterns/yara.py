"""User YARA rules as a detector (``vmleak scan --yara RULES``).

The rules run through the same engine as the built-in detectors: on every chunk (with
``max_len`` bytes of overlap on each side) and on every seam window, so a string that crosses a
page seam of a QEMU stream or a decompression window is found whole, and each string match is
reported once, at its guest-physical address, as detector ``yara`` with ``details.rule``,
``details.namespace``, ``details.tags`` and ``details.string`` (the string's identifier).

Binding: yara-x, VirusTotal's Rust rewrite of YARA (``pip install 'vmleak[yara]'``). It takes
only ``bytes``, so each chunk is copied once (8 MiB: under a millisecond), and it holds
the GIL while scanning, which costs nothing here (vmleak's workers are processes). yara-python
would scan the buffer in place, but on the 20 string rules of ``benchmarks/bench_yara.py`` it
needs about 7 times the CPU time of yara-x (395 against 2,980 MB/s on the memory-like image).
Compiled rules do not pickle, so the detector carries them *serialized* to bytes and each
worker process deserializes them once: rules are compiled exactly once, in the parent, where a
syntax error is reported before any image is read.

What a rule means here: strings are matched in guest memory; a rule's *condition* is evaluated
on each scanned window (a chunk of at most 8 MiB plus its overlap, or a batch of seam windows),
not on the whole image, so ``filesize``, ``at``/``in`` offsets and conditions joining strings
that lie further apart than a window do not mean what they would on a file.
"""

from __future__ import annotations

import hashlib
import io
import os
from collections.abc import Iterable
from typing import Any

from patterns.base import BINARY, Chunk, Described, Detector, Hit, Hits

INSTALL_HINT = "YARA rules need yara-x: pip install 'vmleak[yara]'"
#: longest match reported whole across a seam or chunk edge (bytes). YARA itself stops regular
#: expressions and hex jumps at 4096 bytes (YR_RE_SCAN_LIMIT in libyara), so the default loses
#: nothing; plain strings longer than this are not found across a seam.
DEFAULT_MAX_LEN = 4096
SHOWN = 2  # bytes shown at each end of a masked match
SHOW_MIN = 8  # shorter matches show only their length (the ends would be most of them)


class RuleError(ValueError):
    """A rule file that cannot be used: ``file:line: message`` (line when YARA gives one)."""


def _yara() -> Any:
    try:
        import yara_x
    except ImportError:
        raise RuleError(INSTALL_HINT) from None
    return yara_x


def rule_files(paths: Iterable[str]) -> list[str]:
    """The rule files named by ``paths``: files as given, directories searched (recursively,
    sorted) for ``*.yar`` / ``*.yara``. RuleError for a missing path or an empty directory."""
    out: list[str] = []
    for path in paths:
        if os.path.isdir(path):
            found = sorted(
                os.path.join(d, f)
                for d, _, files in os.walk(path)
                for f in files
                if f.endswith((".yar", ".yara"))
            )
            if not found:
                raise RuleError(f"{path}: no .yar or .yara files in this directory")
            out += found
        elif os.path.isfile(path):
            out.append(path)
        else:
            raise RuleError(f"{path}: no such rule file or directory")
    return out


def compile_rules(paths: Iterable[str]) -> bytes:
    """Compile the rule files (each in a namespace named after its file) and return the
    compiled rules serialized to bytes. RuleError naming the file and line on an error."""
    yara_x = _yara()
    compiler = yara_x.Compiler()
    namespaces: set[str] = set()
    for f in rule_files(paths):
        ns = os.path.splitext(os.path.basename(f))[0]
        while ns in namespaces:  # two files of one name in different directories
            ns += "_"
        namespaces.add(ns)
        try:
            with open(f, encoding="utf-8", errors="replace") as fh:
                text = fh.read()
        except OSError as err:
            raise RuleError(f"{f}: {err.strerror or err}") from None
        compiler.new_namespace(ns)
        compiler.add_include_dir(os.path.dirname(os.path.abspath(f)))
        try:
            compiler.add_source(text, origin=f)
        except yara_x.CompileError as err:
            raise RuleError(one_line(str(err), f)) from None
    buf = io.BytesIO()
    compiler.build().serialize_into(buf)
    return buf.getvalue()


def one_line(report: str, path: str) -> str:
    """yara-x's multi-line error report as ``FILE:LINE: error: what``."""
    lines = [ln.strip() for ln in report.splitlines() if ln.strip()]
    where = next((ln[3:].strip() for ln in lines if ln.startswith("-->")), path)
    where = where.rsplit(":", 1)[0] if where.count(":") >= 2 else where  # drop the column
    detail = next((ln.split("^", 1)[1].strip() for ln in lines if "^" in ln), "")
    head = lines[0] if lines else "error"
    return f"{where}: {head}" + (f": {detail}" if detail else "")


class YaraDetector(Detector):
    """Compiled YARA rules as a detector; ``max_len`` is ``--yara-max-len`` (bytes)."""

    name = "yara"
    group = "yara"
    version = "1"
    context = 0

    def __init__(self, compiled: bytes, max_len: int = DEFAULT_MAX_LEN) -> None:
        self.compiled = compiled
        self.max_len = max_len  # type: ignore[misc]  # per instance: the user's --yara-max-len
        # the rules are part of the version: a state database rescans when they change
        self.version = f"1+{hashlib.sha256(compiled).hexdigest()[:16]}"  # type: ignore[misc]
        self._scanner: Any = None
        self._strings: list[tuple[str, str, list[str], str]] = []
        self._ids: dict[tuple[str, str, str], int] = {}

    @classmethod
    def from_files(cls, paths: Iterable[str], max_len: int = DEFAULT_MAX_LEN) -> YaraDetector:
        return cls(compile_rules(paths), max_len)

    def __getstate__(self) -> dict[str, Any]:
        # loaded rules do not pickle: a worker loads its own copy from the saved bytes
        return {"compiled": self.compiled, "max_len": self.max_len}

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__init__(state["compiled"], state["max_len"])  # type: ignore[misc]

    def _loaded(self) -> Any:
        """This process's scanner (deserialized on first use)."""
        if self._scanner is None:
            yara_x = _yara()
            self._scanner = yara_x.Scanner(yara_x.Rules.deserialize_from(io.BytesIO(self.compiled)))
        return self._scanner

    def _string_id(self, namespace: str, rule: str, tags: Iterable[str], ident: str) -> int:
        key = (namespace, rule, ident)
        k = self._ids.get(key)
        if k is None:
            k = self._ids[key] = len(self._strings)
            self._strings.append((namespace, rule, list(tags), ident))
        return k

    def find(self, chunk: Chunk) -> Hits:
        data = chunk.data
        if not data.size:
            return Hits.empty()
        starts: list[int] = []
        lengths: list[int] = []
        tags: list[int] = []
        for rule in self._loaded().scan(data.tobytes()).matching_rules:
            for pattern in rule.patterns:
                k = self._string_id(rule.namespace, rule.identifier, rule.tags, pattern.identifier)
                for m in pattern.matches:
                    starts.append(m.offset)
                    lengths.append(m.length)
                    tags.append(k)
        if not starts:
            return Hits.empty()
        hits = Hits.of(starts, lengths, BINARY, tags)
        return hits.select(hits.length > 0)

    def describe(self, hit: Hit) -> Described | None:
        namespace, rule, tags, ident = self._strings[hit.tag]
        value = f"{namespace}:{rule}:{ident}=".encode() + hit.raw
        return Described(
            value=value,
            masked=mask(hit.raw),
            details={"rule": rule, "namespace": namespace, "tags": tags, "string": ident},
        )


def yara_detectors(paths: Iterable[str], max_len: int = DEFAULT_MAX_LEN) -> list[Detector]:
    """The detector for the rule files ``paths`` (none when there are none): RuleError (a
    ValueError) for a rule that does not compile or yara-python missing."""
    paths = list(paths)
    return [YaraDetector.from_files(paths, max_len)] if paths else []


def mask(raw: bytes) -> str:
    """``raw`` safe to show: its length and, when at least SHOW_MIN bytes long, its first and
    last SHOWN bytes (as text when printable ASCII, else hex)."""
    n = len(raw)
    if n < SHOW_MIN:
        return f"({n} bytes)"
    ends = raw[:SHOWN], raw[-SHOWN:]
    printable = all(32 <= b < 127 for b in ends[0] + ends[1])
    a, b = (e.decode("ascii") if printable else e.hex() for e in ends)
    return f"{a}...{b} ({n} bytes)"
