"""Signalgraph."""
