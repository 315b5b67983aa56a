"""R-PWD-1: the password policy, checked on every change, naming each rule that fails."""

from __future__ import annotations

import asyncio

from zxcvbn import zxcvbn

from rempart.common.config import PasswordSettings

MAX_PASSWORD_LENGTH = 1024
# zxcvbn's matching grows fast with length; past this, a password is long enough that the
# prefix decides its score (and an attacker cannot make the check itself expensive).
STRENGTH_CHECK_CHARS = 100
# A user or domain name shorter than this is too common a substring to forbid ("al", "io").
MIN_NAME_PART = 3


def _name_parts(account: str) -> tuple[list[str], list[str]]:
    local, _, domain = account.lower().rpartition("@")
    users = [local] if len(local) >= MIN_NAME_PART else []
    domains = [domain] if domain else []
    # "example" of example.org is the domain name as users think of it; the TLD is not.
    domains += [label for label in domain.split(".")[:-1] if len(label) >= MIN_NAME_PART]
    return users, domains


def _strength(password: str, hints: list[str]) -> int:
    result = zxcvbn(password[:STRENGTH_CHECK_CHARS], user_inputs=hints)
    return int(result["score"])


async def policy_violations(password: str, account: str, policy: PasswordSettings) -> list[str]:
    """Every rule ``password`` breaks, in words; empty when it is acceptable."""
    violations: list[str] = []
    if len(password) < policy.min_length:
        violations.append(f"must be at least {policy.min_length} characters long")
    if policy.require_digit and not any(c.isdigit() for c in password):
        violations.append("must contain at least one digit")
    if policy.require_non_alnum and all(c.isalnum() for c in password):
        violations.append("must contain at least one character that is not a letter or a digit")
    if policy.require_upper and not any(c.isupper() for c in password):
        violations.append("must contain at least one upper-case letter")
    if policy.require_lower and not any(c.islower() for c in password):
        violations.append("must contain at least one lower-case letter")
    users, domains = _name_parts(account)
    folded = password.lower()
    if policy.forbid_user_or_domain:
        if any(u in folded for u in users):
            violations.append("must not contain the user name")
        if any(d in folded for d in domains):
            violations.append("must not contain the domain name")
    if policy.min_strength > 0 and password:
        score = await asyncio.to_thread(_strength, password, [*users, *domains])
        if score < policy.min_strength:
            violations.append(f"is too easy to guess (strength {score} of 4, at least {policy.min_strength} required)")
    return violations
