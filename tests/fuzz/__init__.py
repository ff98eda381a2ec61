"""Fuzzing kept in the repository (issue 13): see harness.py and docs/fuzzing.md."""
