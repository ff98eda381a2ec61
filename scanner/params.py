"""The typed parameters of a scan or report run (what ``scan``/``report`` options say).

Adding an option to both commands is two lines: a ``click.option`` in ``scanner.cli``'s
``SCAN_OPTIONS`` and a field here of the same name (``ScanParams.take`` picks it up).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any

from scanner.engine import DEFAULT_CHUNK

#: findings below this confidence are hex- or number-glued digit strings (benchmarks/README.md:
#: on the memory-like image every planted secret scores >= 0.45, chance matches <= 0.25)
DEFAULT_MIN_CONFIDENCE = 0.3


@dataclass(frozen=True)
class ScanParams:
    """What to scan, how, what to compare with, and what to print (sizes in bytes, times in
    seconds)."""

    inputs: tuple[str, ...]
    detectors: str = "all"  # comma-separated names or groups (patterns.registry.select)
    input_format: str | None = None  # forced format, else detected from the content
    snapshot: str | None = None  # only this snapshot (qcow2)
    jobs: int | None = None  # worker processes (None: every core)
    dask: str | None = None  # a Dask scheduler address, or local:N (scanner.fleet)
    dask_timeout: float = 30.0  # seconds to reach the scheduler and see a worker
    min_confidence: float = DEFAULT_MIN_CONFIDENCE
    fingerprint_key_file: str | None = None  # None: $VMLEAK_FINGERPRINT_KEY or the user's key
    unmask: bool = False
    progress: bool = True  # progress bar on stderr when it is a terminal
    quiet: bool = False  # no summary paragraph on stderr
    chunk_size: int = DEFAULT_CHUNK
    include: tuple[str, ...] = ()  # globs (runner.WalkOptions)
    exclude: tuple[str, ...] = ()
    follow_symlinks: bool = False
    state_path: str | None = None  # state database (None: none, unless implied below)
    lock_wait: float = 60.0  # seconds to wait for another run holding the state database
    baseline_file: str | None = None
    allowlist_file: str | None = None
    fail_on: str | None = None  # outcome.FAIL_ON; None: the command's default
    full: bool = False  # --full: rescan every image (implies a state database)
    since_last: bool = False  # --since-last: print only changes (implies a state database)
    yara: tuple[str, ...] = ()  # YARA rule files or directories (patterns.yara)
    yara_max_len: int = 4096  # bytes of a YARA match found whole across a seam
    dormant_days: int = 90  # images saved longer ago are marked dormant (scanner.dormant)

    @classmethod
    def take(cls, opts: dict[str, Any]) -> ScanParams:
        """The parameters among a command's click options, removed from ``opts`` (what is
        left is the command's own: output format, report directory, ...)."""
        names = [f.name for f in dataclasses.fields(cls) if f.name in opts]
        values = {n: opts.pop(n) for n in names}
        for n in ("inputs", "include", "exclude", "yara"):
            if n in values:
                values[n] = tuple(values[n])
        return cls(**values)

    @property
    def image_options(self) -> tuple[tuple[str, Any], ...]:
        """Parser options for every image (runner.ImageSpec.options)."""
        return (("snapshot", self.snapshot),) if self.snapshot else ()

    @property
    def implies_state(self) -> bool:
        """True when the default state database is used though ``--state`` was not given."""
        return self.since_last or self.full or (self.fail_on == "new" and not self.baseline_file)
