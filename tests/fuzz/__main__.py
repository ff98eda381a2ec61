"""Long fuzz run: ``python -m tests.fuzz FAMILY --minutes N [--seed S]``.

Draws mutation plans from a seeded random generator, runs each through
:func:`tests.fuzz.harness.check`, prints the figures (inputs, seconds, inputs/s, failures by
kind) and writes every failing plan to ``tests/fuzz/regressions/`` as a JSON regression
fixture that the normal test run replays."""

from __future__ import annotations

import argparse
import collections
import dataclasses
import hashlib
import json
import random
import sys
import tempfile
import time

from tests.fuzz.harness import FAMILIES, REGRESSIONS, apply, check, random_plan, seed


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m tests.fuzz")
    ap.add_argument("family", choices=sorted(FAMILIES))
    ap.add_argument("--minutes", type=float, default=1.0)
    ap.add_argument("--inputs", type=int, default=0, help="stop after this many (0: no limit)")
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args(argv)
    names = FAMILIES[args.family]
    rng = random.Random(args.seed)
    failures: collections.Counter[str] = collections.Counter()
    done = 0
    t0 = time.monotonic()
    with tempfile.TemporaryDirectory(dir="/dev/shm" if sys.platform == "linux" else None) as d:
        while time.monotonic() - t0 < args.minutes * 60 and (not args.inputs or done < args.inputs):
            k, plan = random_plan(rng, len(names))
            other = seed(names[(k + 1) % len(names)])
            problem = check(apply(seed(names[k]), plan, other), d)
            done += 1
            if problem:
                failures[problem.split(":")[0]] += 1
                entry = {"family": args.family, "seed": names[k], "problem": problem,
                         "plan": [dataclasses.asdict(op) for op in plan]}  # fmt: skip
                text = json.dumps(entry, indent=1)
                name = hashlib.sha1(text.encode()).hexdigest()[:12]
                (REGRESSIONS / f"{args.family}-{name}.json").write_text(text + "\n")
                print(f"FAIL {problem}", flush=True)
    secs = time.monotonic() - t0
    print(f"{args.family}: {done} inputs in {secs:.0f} s ({done / secs:.1f}/s), "
          f"{sum(failures.values())} failures {dict(failures)}")  # fmt: skip
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
