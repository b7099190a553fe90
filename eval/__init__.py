"""Measurement programs: python -m eval.<name>."""
