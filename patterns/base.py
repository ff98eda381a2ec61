"""The detector interface: what every secret detector looks like to the engine.

A detector is small and uniform (like a detect-secrets plugin):

- ``find(chunk)`` is vectorized: it takes a :class:`Chunk` (a uint8 numpy buffer) and returns
  :class:`Hits` (arrays of start offset, length and encoding, in buffer bytes). No Python loop
  over bytes or candidates; only validated matches come back.
- ``describe(hit)`` runs once per reported match (rare) and turns its bytes into a
  :class:`Described`: the normalized secret (what gets fingerprinted), a masked rendering that
  is safe to show, and ``details`` (brand, confidence, ...). Returning None drops the match.
- ``max_len`` is the longest match in bytes and ``context`` the bytes it looks at on either
  side (keywords, boundaries): the engine overlaps chunks and seams by their sum, so a match is
  found whole, exactly once, wherever it lies.
- ``stage`` names a stage-1 pass the detector shares with others (memoized on the
  :class:`Chunk`): the engine scans detectors of one stage together where guest memory is
  stitched across a seam, so they share that pass there too.

Adding a detector means adding a module here and a line in ``patterns/registry.py``.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, ClassVar

import numpy as np

ENCODINGS = ("ascii", "utf-16le", "binary")
ASCII, UTF16LE, BINARY = 0, 1, 2


class Chunk:
    """A buffer being scanned, with features computed once and shared between detectors.

    ``data`` is a 1-D uint8 array (for ``Detector.may_touch``: 2-D, one row per seam window).
    ``memo(key, fn)`` computes ``fn(self)`` the first time a feature (a digit mask, candidate
    runs ...) is asked for, so sibling detectors that need the same stage-1 pass share it
    instead of each touching every byte again; it lives as long as this chunk.
    """

    __slots__ = ("data", "_memo")

    def __init__(self, data: np.ndarray) -> None:
        self.data = data
        self._memo: dict[str, Any] = {}

    def memo(self, key: str, fn: Callable[[Chunk], Any]) -> Any:
        try:
            return self._memo[key]
        except KeyError:
            value = self._memo[key] = fn(self)
            return value

    def has(self, key: str) -> bool:
        """Whether feature ``key`` was already computed for this chunk (a detector may then
        take its candidates from it instead of running a pass of its own)."""
        return key in self._memo


@dataclass
class Hits:
    """Matches in a buffer: int64 ``start`` and ``length`` (bytes), uint8 ``encoding``
    (index into :data:`ENCODINGS`), and optional per-hit int64 ``tag`` arrays a detector
    uses to pass what it already knows (e.g. a key size) on to ``describe``."""

    start: np.ndarray
    length: np.ndarray
    encoding: np.ndarray
    tag: np.ndarray | None = None

    @classmethod
    def empty(cls) -> Hits:
        z = np.zeros(0, np.int64)
        return cls(z, z.copy(), np.zeros(0, np.uint8))

    @classmethod
    def of(cls, start: Any, length: Any, encoding: Any, tag: Any = None) -> Hits:
        s = np.asarray(start, np.int64).reshape(-1)
        n = s.size
        ln = np.broadcast_to(np.asarray(length, np.int64), (n,)).copy()
        enc = np.broadcast_to(np.asarray(encoding, np.uint8), (n,)).copy()
        tg = None if tag is None else np.broadcast_to(np.asarray(tag, np.int64), (n,)).copy()
        return cls(s, ln, enc, tg)

    @classmethod
    def concat(cls, parts: list[Hits]) -> Hits:
        parts = [p for p in parts if p.start.size]
        if not parts:
            return cls.empty()
        tags = None
        if any(p.tag is not None for p in parts):
            tags = np.concatenate(
                [p.tag if p.tag is not None else np.zeros(p.start.size, np.int64) for p in parts]
            )
        return cls(
            np.concatenate([p.start for p in parts]),
            np.concatenate([p.length for p in parts]),
            np.concatenate([p.encoding for p in parts]),
            tags,
        )

    def __len__(self) -> int:
        return int(self.start.size)

    def select(self, mask: np.ndarray) -> Hits:
        return Hits(
            self.start[mask],
            self.length[mask],
            self.encoding[mask],
            None if self.tag is None else self.tag[mask],
        )


@dataclass
class Hit:
    """One match handed to ``describe``: its bytes, encoding and surrounding context.

    ``raw`` is exactly the matched bytes (as stored, e.g. UTF-16LE); ``before``/``after`` are up
    to ``context`` bytes around it, as far as the buffer reaches; ``tag`` is the detector's own
    per-hit integer from :class:`Hits` (0 when unused).
    """

    raw: bytes
    encoding: str
    before: bytes
    after: bytes
    tag: int = 0

    def text(self) -> str:
        """The matched bytes decoded per encoding (binary hits decode as latin-1)."""
        codec = {"ascii": "latin-1", "utf-16le": "utf-16-le"}.get(self.encoding, "latin-1")
        return self.raw.decode(codec, errors="replace")


@dataclass
class Described:
    """What a match is: ``value`` (normalized bytes, fingerprinted; never printed unless the
    user unmasks), ``masked`` (safe to show), ``details`` (JSON-able; include ``confidence``
    in [0, 1] where the detector can judge it)."""

    value: bytes
    masked: str
    details: dict[str, Any] = field(default_factory=dict)


class Detector(ABC):
    """Base class for detectors; subclasses set the class attributes and implement the two
    methods. Instances must be picklable (they travel to worker processes)."""

    name: ClassVar[str]
    group: ClassVar[str]
    version: ClassVar[str] = "1"
    max_len: ClassVar[int]
    context: ClassVar[int] = 32
    #: names of detectors whose findings lying inside one of ours are the same secret
    #: (a Track 2 contains its PAN): the engine keeps only ours.
    subsumes: ClassVar[tuple[str, ...]] = ()
    #: the shared stage-1 pass this detector uses (``"digits"``, ``"anchors"``, ``"emv"``), None for
    #: its own
    stage: ClassVar[str | None] = None

    #: when set, ``may_touch`` needs only this many bytes on each side of the middle (a
    #: match touching the middle always shows there), so the engine tests that narrow band
    #: before building whole windows
    seam_band: ClassVar[int | None] = None

    def may_touch(self, rows: Chunk) -> np.ndarray:
        """For seam windows (``rows.data``: 2-D, each row's middle is where two pieces of
        guest memory meet; only ``seam_band`` bytes each side when that is set), whether a
        match could touch the middle: a cheap test that lets the engine skip most windows.
        Detectors of one stage share work through ``rows.memo``. The default keeps every
        row."""
        return np.ones(rows.data.shape[0], bool)

    @abstractmethod
    def find(self, chunk: Chunk) -> Hits:
        """Validated matches in ``chunk.data`` (buffer offsets, bytes)."""

    @abstractmethod
    def describe(self, hit: Hit) -> Described | None:
        """Normalize, mask and qualify one match; None drops it."""
