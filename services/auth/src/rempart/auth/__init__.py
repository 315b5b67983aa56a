"""Rempart auth service: the only owner of credentials, lockout and password policy."""
