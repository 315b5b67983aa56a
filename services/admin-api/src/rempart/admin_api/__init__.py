"""Rempart admin API: the only writer of the directory and the settings (DESIGN.md)."""
