"""The scanner: finds inputs, drives parsers and detectors over them, and reports."""

__version__ = "0.1.0"
