"""Bytecode for the timed ``python -m scanner`` runs, as an installed copy has it.

A normal install caches each module's bytecode (``__pycache__``) on first use, so every later
run skips compiling. Where ``PYTHONDONTWRITEBYTECODE`` is set (this project's sandbox sets it)
nothing is cached and each run would compile the ~40 modules again, about 60 ms of every
figure; the benchmarks that time whole runs call :func:`compile_package` first.
"""

from __future__ import annotations

import compileall
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def compile_package() -> None:
    """Write the bytecode of vmleak's packages (what a first run would cache)."""
    for package in ("parsers", "patterns", "scanner"):
        compileall.compile_dir(ROOT / package, quiet=1)
