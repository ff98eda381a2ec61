"""The short CI fuzz run (about a minute in all): hypothesis draws mutation plans of the real
fixtures for every parser family (shrinking a failure to its smallest plan), and every
regression kept from long runs (tests/fuzz/regressions) is replayed."""

from __future__ import annotations

import json

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tests.fuzz.harness import BOUNDARY, FAMILIES, REGRESSIONS, Op, apply, check, replay, seed

OPS = st.builds(
    Op,
    kind=st.sampled_from(("flip", "field", "truncate", "delete", "duplicate", "splice", "append")),
    at=st.one_of(st.floats(0, 0.01, exclude_max=True), st.floats(0, 1, exclude_max=True)),
    arg=st.integers(0, 1 << 16),
    width=st.sampled_from((1, 2, 4, 8)),
    big=st.booleans(),
)
assert len(BOUNDARY) > 8


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_mutants_exit_cleanly_and_lose_nothing_silently(family: str, tmp_path) -> None:
    names = FAMILIES[family]

    @settings(max_examples=100, deadline=None, derandomize=True,
              suppress_health_check=list(HealthCheck))  # fmt: skip
    @given(k=st.integers(0, len(names) - 1), plan=st.lists(OPS, min_size=1, max_size=4))
    def run(k: int, plan: list[Op]) -> None:
        data = apply(seed(names[k]), plan, seed(names[(k + 1) % len(names)]))
        assert check(data, str(tmp_path)) is None

    run()


@pytest.mark.parametrize("path", sorted(REGRESSIONS.glob("*.json")), ids=lambda p: p.stem)
def test_kept_regressions_stay_fixed(path, tmp_path) -> None:
    assert replay(json.loads(path.read_text()), str(tmp_path)) is None
