"""Detectors: WHAT does a secret look like? Pure functions over numpy buffers
(:mod:`patterns.base` is the interface, :mod:`patterns.registry` the list)."""
