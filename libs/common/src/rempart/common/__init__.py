"""Rempart's shared library: what every service needs once (DESIGN.md, "Layout")."""
